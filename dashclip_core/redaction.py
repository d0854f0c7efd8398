"""One redaction rule for everything that leaves the process: MLflow params, logs, XComs, reports, errors.

Three parts, applied together by :func:`redact_text` (and by the helpers built on it):

(a) **URL passwords.** ``scheme://user:password@host`` becomes ``scheme://user:***@host``, for any scheme
    (SQLAlchemy's ``postgresql+psycopg://`` too), whether the password is raw or percent-encoded.
(b) **Secret-named keys.** In a mapping (:func:`redacted_config`, :func:`redact_value`) the value of a key
    that names a secret (``password``, ``secret``, ``token``, ``api_key``, ``access_key``, ...) becomes
    ``***``; in text, ``password=...`` / ``"api_key": "..."`` pairs are masked the same way.
(c) **Known secret values.** A process-wide set of values registered with :func:`register_secret` (the
    values a config expanded from secret-looking ``${VAR}``s, URL passwords, connection passwords,
    ``$OPENAI_API_KEY``) is masked anywhere in any text, in its raw, percent-encoded
    (``quote``/``quote_plus``, upper- or lower-case hex), JSON- and repr-escaped forms.

Standard library only and the bottom layer of ``dashclip_core``: every other module may use it, and it
never imports Airflow (``tasks/masking.py`` also hands the known values to Airflow's secrets masker).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from itertools import pairwise
from typing import Any
from urllib.parse import quote, quote_plus, unquote

__all__ = ["MASK", "MIN_SECRET_LENGTH", "RedactingFilter", "is_secret_name", "known_secrets", "redact_text", "redact_url",
           "redact_value", "redacted_config", "register_config_secrets", "register_secret", "secrets_in_config"]

MASK = "***"
# Shorter values are not masked in free text: a 1-3 character "secret" would blank out every occurrence
# of those letters in every log line (Airflow's masker has the same kind of floor).
MIN_SECRET_LENGTH = 4

# Words that make a key or an environment variable name a secret. Whole words only: ``max_tokens``,
# ``input_tokens`` and ``TOKENIZERS_PARALLELISM`` are not secrets, ``llm_api_key`` and ``PGPASS`` are.
_SECRET_WORDS = {"password", "passwd", "pwd", "pass", "secret", "secrets", "token", "credential", "credentials",
                 "passphrase", "authorization", "apikey", "accesskey", "privatekey", "secretkey"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("client", "secret"),
                 ("access", "token"), ("auth", "token")}
_SECRET_SUFFIXES = ("password", "passwd", "pass", "secret")  # PGPASS, DBPASSWORD, JWTSECRET
_NOT_SECRET_ENV = {"PWD", "OLDPWD"}  # the shell's working folders, not passwords

# (a) scheme://user:password@ inside one whitespace/quote-free token. The password is greedy up to the
# token's last '@', so a raw password holding '@', '/' or ':' is masked whole.
_URL_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#@'\"<>:]*:)(?P<password>[^\s'\"<>]*)@")
# (b) in text: key=value, key: value, "key": "value" (the key checked with is_secret_name).
_TEXT_PAIR = re.compile(
    r"(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)(?P<q1>[\"']?)(?P<sep>\s*[=:]\s*)"
    r"(?:(?P<q2>[\"'])(?P<quoted>[^\"'\n]*)(?P=q2)|(?P<bare>[^\s,;&'\"}\])]+))"
)

_lock = threading.Lock()
_known: set[str] = set()
_known_pattern: re.Pattern[str] | None = None


def _words(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)  # camelCase -> camel_Case
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_name(name: str) -> bool:
    """Whether a config key, dict key or environment variable name names a secret (rule b)."""
    words = _words(str(name))
    if any(w in _SECRET_WORDS or w.endswith(_SECRET_SUFFIXES) for w in words):
        return True
    return any(pair in _SECRET_PAIRS for pair in pairwise(words))


def _forms(secret: str) -> set[str]:
    """How a secret may appear in text: raw, percent-encoded (both hex cases, both quote flavours), escaped."""
    forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret), json.dumps(secret)[1:-1], repr(secret)[1:-1]}
    forms |= {re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), f) for f in list(forms)}
    return {f for f in forms if len(f) >= MIN_SECRET_LENGTH}


def register_secret(value: Any) -> bool:
    """Add ``value`` to the known secrets masked in every text (rule c). Returns False for empty or too short values."""
    if not isinstance(value, str) or len(value) < MIN_SECRET_LENGTH:
        return False
    global _known_pattern
    with _lock:
        if value in _known:
            return True
        _known.add(value)
        forms = sorted({f for s in _known for f in _forms(s)}, key=len, reverse=True)  # longest first: no partial masks
        _known_pattern = re.compile("|".join(map(re.escape, forms)))
    return True


def known_secrets() -> frozenset[str]:
    """The registered secret values (for handing them to another masker, e.g. Airflow's)."""
    with _lock:
        return frozenset(_known)


def _mask_url(m: re.Match[str]) -> str:
    return f"{m.group('head')}{MASK}@" if m.group("password") else m.group(0)


def _mask_pair(m: re.Match[str]) -> str:
    value = m.group("quoted") if m.group("q2") else m.group("bare")
    if not is_secret_name(m.group("key")) or not value or value == MASK:
        return m.group(0)
    q2 = m.group("q2") or ""
    return f"{m.group('key')}{m.group('q1')}{m.group('sep')}{q2}{MASK}{q2}"


def redact_text(text: Any) -> Any:
    """``text`` with every known secret, URL password and secret-named ``key=value`` masked; non-strings unchanged."""
    if not isinstance(text, str) or not text:
        return text
    pattern = _known_pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    text = _URL_USERINFO.sub(_mask_url, text)
    return _TEXT_PAIR.sub(_mask_pair, text)


def redact_url(url: Any) -> Any:
    """A URL (or a DSN, or any text holding one) safe to show: its password is ``***`` (same rule as :func:`redact_text`)."""
    return redact_text(url)


def redact_value(value: Any, key: str | None = None) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples, strings, numbers) with the rule applied throughout:
    the values of secret-named keys become ``***``, every string goes through :func:`redact_text`."""
    if key is not None and is_secret_name(key) and isinstance(value, str) and value:
        return MASK
    if isinstance(value, Mapping):
        return {k: redact_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return redact_text(value)


def redacted_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict (``PipelineConfig.to_dict()``) safe to log or to store as MLflow params."""
    return redact_value(dict(cfg))


def _strings(value: Any, key: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(v, str(k))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v, key)
    elif isinstance(value, str) and value:
        yield key, value


def secrets_in_config(cfg: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> set[str]:
    """The secret values inside a resolved config: values of secret-named keys, URL passwords (as written and
    decoded), and the values of secret-looking environment variables that the config expanded (``${PGPASS}``)."""
    environ = os.environ if environ is None else environ
    env_secrets = {v for k, v in environ.items()
                   if is_secret_name(k) and k not in _NOT_SECRET_ENV and len(v) >= MIN_SECRET_LENGTH}
    found: set[str] = set()
    for key, text in _strings(cfg):
        if is_secret_name(key):
            found.add(text)
        for m in _URL_USERINFO.finditer(text):
            if m.group("password"):
                found |= {m.group("password"), unquote(m.group("password"))}
        found |= {s for s in env_secrets if s in text}
    return {s for s in found if len(s) >= MIN_SECRET_LENGTH and s != MASK}


def register_config_secrets(cfg: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> set[str]:
    """Register every secret of a resolved config (:func:`secrets_in_config`); return them."""
    found = secrets_in_config(cfg, environ)
    for secret in found:
        register_secret(secret)
    return found


class RedactingFilter(logging.Filter):
    """A logging filter that applies the rule to a record's message and traceback before any handler formats it.

    Install it on handlers (a filter on a logger does not see records propagated from child loggers).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 (a bad format string: leave the record as it is for logging to report)
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True
