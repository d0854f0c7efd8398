"""The tasks' side of the redaction rule (:mod:`dashclip_core.redaction`): secret values found in a run's config
or read from a connection are registered with the library's rule *and* with Airflow's secrets masker, and
log records pass through :class:`~dashclip_core.redaction.RedactingFilter`.

Airflow's masker only knows the values it is told about (the Task SDK does not even mask a connection's
password by itself), and it misses a password's percent-encoded form inside a URL; so every form the
library masks is handed to it. Airflow is imported lazily: without it (library use, unit tests) only the
library's rule applies.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from dashclip_core import redaction

_FILTER = redaction.RedactingFilter()


def protect(values: Iterable[Any]) -> None:
    """Mask these secret values from now on: in this process's logs (both maskers) and in everything
    :mod:`dashclip_core.redaction` redacts (summaries/XComs, MLflow params, errors)."""
    for value in values:
        if not redaction.register_secret(value):
            continue
        _airflow_mask(value)


def protect_config(cfg) -> None:
    """Register the secrets of a resolved run config (URL passwords, secret-named keys, expanded secret
    ``${VAR}``s) and ``$OPENAI_API_KEY``; install the log filter."""
    protect(redaction.secrets_in_config(cfg.to_dict()))
    protect([os.environ.get("OPENAI_API_KEY")])
    install_log_filter()


def _airflow_mask(value: str) -> None:
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # the library without Airflow
        return
    from urllib.parse import quote, quote_plus

    for form in dict.fromkeys((value, quote(value, safe=""), quote(value), quote_plus(value))):
        if len(form) >= redaction.MIN_SECRET_LENGTH:
            mask_secret(form)


def install_log_filter() -> None:
    """Put the redacting filter on every handler of the root logger (idempotent). A filter on a handler sees
    every record that reaches it, whichever logger it came from."""
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
