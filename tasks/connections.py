"""Airflow connections resolved for the tasks: the one place that reads them (``dashclip_core`` never imports Airflow).

Airflow and the library are imported inside each function, so importing ``tasks`` stays cheap and Airflow-free.
Every password or key read here is registered for masking (:mod:`tasks.masking`) before it is used, in its raw
and percent-encoded forms: the URL built from a connection carries the encoded one, which Airflow's masker
would not recognise by itself.
"""

from __future__ import annotations

import logging

from dashclip_core.redaction import secrets_in_config
from tasks.masking import protect

logger = logging.getLogger(__name__)


def credentials_from_airflow_connection(conn_id: str) -> tuple[str, str | None]:
    """``(base_url, api_key)`` of the LLM API from an Airflow connection: host/schema/port -> URL, password -> key.

    Example: ``AIRFLOW_CONN_OPENAI_LABELER='{"conn_type": "http", "host": "api.openai.com", "schema": "https",
    "password": "sk-..."}'`` gives ``("https://api.openai.com/v1", "sk-...")``; see
    :func:`dashclip_core.labeling.openai_backend.base_url_from_connection` for the URL rules.

    Args:
        conn_id: the Airflow connection id (``labeling.llm_connection_id``).

    Returns:
        The API base URL and the key (None when the connection has no password).

    Raises:
        airflow.sdk.exceptions.AirflowNotFoundException: no connection ``conn_id``.
        ValueError: the connection has no host.
    """
    from airflow.sdk import Connection

    from dashclip_core.labeling.openai_backend import base_url_from_connection

    conn = Connection.get(conn_id)
    protect([conn.password])  # the Task SDK's Connection does not mask its password itself
    return base_url_from_connection(conn.host, conn.schema, conn.port, conn.extra_dejson), (conn.password or None)


def catalog_url(cfg) -> str:
    """Catalog DB URL: an Airflow connection when configured, else the config (embedded DB by default)."""
    from dashclip_core.catalog.snapshot import ensure_source_catalog

    if cfg.catalog.airflow_conn_id:
        from airflow.sdk import Connection

        conn = Connection.get(cfg.catalog.airflow_conn_id)
        protect([conn.password])
        url = sqlalchemy_url(conn)
        protect(secrets_in_config({"sqlalchemy_url": url}))  # a password inside extra.sqlalchemy_url too
        return url
    return ensure_source_catalog(cfg)


_DIALECTS = {"postgres": "postgresql", "postgresql": "postgresql", "mysql": "mysql", "sqlite": "sqlite", "mssql": "mssql"}


def sqlalchemy_url(conn) -> str:
    """SQLAlchemy URL of an Airflow connection (Airflow URIs are not SQLAlchemy URLs: 'postgres://',
    percent-encoded sqlite paths). ``extra: {"sqlalchemy_url": ...}`` wins when set."""
    from urllib.parse import quote

    if conn.extra_dejson.get("sqlalchemy_url"):
        return conn.extra_dejson["sqlalchemy_url"]
    dialect = _DIALECTS.get(conn.conn_type)
    if dialect is None:
        raise ValueError(f"connection {conn.conn_id!r}: type {conn.conn_type!r} has no known SQLAlchemy dialect; "
                         f"set extra {{\"sqlalchemy_url\": ...}}")
    if dialect == "sqlite":
        return f"sqlite:///{conn.schema or conn.host}"
    auth = f"{quote(conn.login or '', safe='')}:{quote(conn.password or '', safe='')}@" if conn.login else ""
    port = f":{conn.port}" if conn.port else ""
    return f"{dialect}://{auth}{conn.host}{port}/{conn.schema or ''}"


def llm_endpoint(lc):
    """The LLM API's URL and key: the Airflow connection ``labeling.llm_connection_id`` when it exists, else
    ``$DASHCLIP_LLM_BASE_URL`` (or ``labeling.llm_base_url``) and ``$OPENAI_API_KEY``. None for offline labelers."""
    import os

    from dashclip_core.labeling.build import LLMEndpoint

    if lc.labeler != "openai":
        return None
    protect([os.environ.get("OPENAI_API_KEY")])
    if lc.llm_connection_id:
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            base_url, key = credentials_from_airflow_connection(lc.llm_connection_id)
            return LLMEndpoint(base_url, key or os.environ.get("OPENAI_API_KEY"))
        except AirflowNotFoundException:
            logger.info("no Airflow connection %r; using $DASHCLIP_LLM_BASE_URL / labeling.llm_base_url", lc.llm_connection_id)
    return LLMEndpoint(os.environ.get("DASHCLIP_LLM_BASE_URL") or lc.llm_base_url, os.environ.get("OPENAI_API_KEY"))
