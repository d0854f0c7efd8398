"""Airflow connections resolved for the tasks: the one place that reads them (``dashclip_core`` never imports Airflow).

Airflow and the library are imported inside each function, so importing ``tasks`` stays cheap and Airflow-free.
"""

from __future__ import annotations


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
    return base_url_from_connection(conn.host, conn.schema, conn.port, conn.extra_dejson), (conn.password or None)
