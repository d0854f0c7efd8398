"""LLM relevance labeler over any OpenAI-compatible REST API (OpenAI, Azure-style gateways, vLLM, ...).

DashCLIP labels (query, product) pairs 0/1/2 with a GPT model fine-tuned on human judgements. This
module covers the three HTTP paths that recipe needs, all with the prompt of
:mod:`dashclip_core.labeling.prompt`:

1. Online: :meth:`OpenAICompatibleLabeler.label` sends one chat completion per pair, ``concurrency`` at a time.
2. Batch API (half price, up to 24 h): :meth:`~OpenAICompatibleLabeler.submit_batch` →
   :meth:`~OpenAICompatibleLabeler.poll_batch` → :meth:`~OpenAICompatibleLabeler.batch_results`
   (or :meth:`~OpenAICompatibleLabeler.label_via_batch` for all three).
3. Fine-tuning on human labels: :meth:`~OpenAICompatibleLabeler.fine_tuning_jsonl` →
   :meth:`~OpenAICompatibleLabeler.start_fine_tune` → :meth:`~OpenAICompatibleLabeler.wait_fine_tune`,
   whose model id is then the ``model`` of a new labeler.

Every HTTP call goes through one helper with one retry policy: 408, 429, 5xx, timeouts and
connection errors are retried up to ``max_retries`` times with exponential backoff and full jitter
(a random wait in [0, min(backoff_max, backoff_base * 2**attempt)]), or after the server's
``Retry-After`` / ``retry-after-ms`` when it sends one (capped at ``backoff_max``). Other 4xx fail at
once. An answer that is not the schema's JSON, a refusal and a content-filter stop are asked again
up to ``max_retries`` times and then returned as a failed result: a pair is never guessed.

Creating a batch or a fine-tuning job costs money, so a retry after an ambiguous failure (timeout,
dropped connection, 5xx: the server may have created it) first looks the object up by its input file
and reuses it instead of creating a second one. A chat completion cannot be looked up: a timed-out
request the server finished anyway is paid twice; keep ``timeout`` well above the model's latency.

The API key comes from the ``api_key`` argument or ``OPENAI_API_KEY``. In the DAG it comes from an
Airflow connection (:func:`credentials_from_airflow_connection`), whose password Airflow masks in
task logs. The key is sent only in the ``Authorization`` header; it is not in ``repr``, log lines or
exception messages (error bodies that echo it are scrubbed).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from datetime import UTC
from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit, urlunsplit

import httpx

from dashclip_core.labeling.base import LABELS, LabelRequest, LabelResult
from dashclip_core.labeling.prompt import (
    LABEL_MEANINGS,
    PROMPT_VERSION,
    MalformedAnswer,
    answer_json,
    build_messages,
    parse_answer,
    response_format,
)

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429})  # plus every 5xx
BATCH_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
BATCH_ENDPOINT = "/v1/chat/completions"
MAX_BATCH_REQUESTS = 50_000  # OpenAI Batch API limit per input file
_PRODUCT_FIELDS = ("title", "description", "category", "aisle")


class OpenAIAPIError(RuntimeError):
    """An HTTP call failed for good (not retryable, or retries exhausted); carries no request headers.

    Attributes:
        status_code: the HTTP status, or None for a timeout / connection error.
    """

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class AuthenticationError(OpenAIAPIError):
    """401/403: the key is wrong or lacks access. Every pair would fail the same way, so this raises."""


class Refusal(MalformedAnswer):
    """The model refused (``message.refusal``) or the content filter stopped the answer."""


class FineTuneFailed(RuntimeError):
    """The fine-tuning job ended failed or cancelled; the message has the job's error."""


class _Secret:
    """Holds the API key so that repr(), vars() and debuggers show '***'."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value

    def get(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "'***'" if self._value else "None"


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (delta seconds or an HTTP date), else None.

    Args:
        headers: response headers (case-insensitive mapping, e.g. ``httpx.Headers``).
        now: the current Unix time for HTTP dates (tests pin it); defaults to ``time.time()``.
    """
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        value = float(raw)
        return max(0.0, value) if math.isfinite(value) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def base_url_from_connection(host: str | None, schema: str | None = None, port: int | None = None, extra: Mapping | None = None) -> str:
    """The API base URL (ending in e.g. ``/v1``) from Airflow connection fields.

    ``host`` may be a full URL (``https://api.openai.com/v1``) or a bare host name; ``schema`` is the
    URL scheme as in Airflow's HTTP connections (default https); ``port`` is added when the host has
    none; the path is ``extra["base_path"]`` if set, else the host URL's path, else ``/v1``.

    Raises:
        ValueError: the connection has no host.
    """
    if not host:
        raise ValueError("the Airflow connection has no host; set it to the API base URL, e.g. https://api.openai.com/v1")
    parts = urlsplit(host if "://" in host else f"{schema or 'https'}://{host}")
    netloc = parts.netloc
    if port and parts.port is None:
        netloc = f"{netloc}:{int(port)}"
    path = (extra or {}).get("base_path") or parts.path.rstrip("/") or "/v1"
    return urlunsplit((parts.scheme, netloc, "/" + path.strip("/"), "", ""))


def credentials_from_airflow_connection(conn_id: str) -> tuple[str, str | None]:
    """``(base_url, api_key)`` from an Airflow connection: host/schema/port → URL, password → key.

    Airflow is imported here, not at module level: ``dashclip_core`` runs without it.
    Example: ``AIRFLOW_CONN_OPENAI_LABELER='{"conn_type": "http", "host": "api.openai.com", "schema": "https",
    "password": "sk-..."}'`` gives ``("https://api.openai.com/v1", "sk-...")``.
    """
    try:
        from airflow.sdk import BaseHook  # Airflow 3
    except ImportError:  # Airflow 2
        from airflow.hooks.base import BaseHook

    conn = BaseHook.get_connection(conn_id)
    return base_url_from_connection(conn.host, conn.schema, conn.port, conn.extra_dejson), (conn.password or None)


def _answer_from_completion(completion: Mapping) -> tuple[int, str]:
    """``(label, reason)`` of a chat completion body; raises Refusal / MalformedAnswer."""
    choices = completion.get("choices") or []
    if not choices or not isinstance(choices[0], Mapping):
        raise MalformedAnswer("completion has no choices")
    choice = choices[0]
    message = choice.get("message") or {}
    if message.get("refusal"):
        raise Refusal(f"model refused: {str(message['refusal'])[:200]}")
    if choice.get("finish_reason") == "content_filter":
        raise Refusal("answer withheld by the content filter (finish_reason content_filter)")
    return parse_answer(message.get("content"))


def _usage(completion: Mapping) -> tuple[int, int]:
    usage = completion.get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


class OpenAICompatibleLabeler:
    """Grades pairs with a chat model behind an OpenAI-compatible API (implements ``Labeler``).

    Args:
        base_url: API root including the version path, e.g. ``https://api.openai.com/v1`` or ``http://vllm:8000/v1``.
        model: model id; a fine-tuned one (``ft:gpt-4o-mini-2024-07-18:org:dashclip:abc``) after :meth:`wait_fine_tune`.
        api_key: bearer token; None reads ``OPENAI_API_KEY``; if both are missing no Authorization header is sent
            (local servers without auth).
        concurrency: chat completions in flight at once in :meth:`label`.
        max_retries: retries per HTTP call on 408/429/5xx/timeouts/connection errors, and extra attempts per pair
            for malformed answers and refusals.
        backoff_base: first backoff ceiling in seconds; attempt k waits U(0, min(backoff_max, backoff_base * 2**k)).
        backoff_max: cap on any single wait, ``Retry-After`` included.
        timeout: seconds per HTTP request (connect, write, read each).
        prompt_version: the prompt sent and recorded in ``labeler_id``; must be a version ``prompt.py`` knows.
        client: an ``httpx.Client`` to use (not closed by :meth:`close`); by default one is created.

    Raises:
        ValueError: a non-positive concurrency, negative retries or backoff, or an unknown prompt version.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        concurrency: int = 8,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        timeout: float = 30.0,
        prompt_version: str = PROMPT_VERSION,
        client: httpx.Client | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0 or backoff_base < 0 or backoff_max < 0 or timeout <= 0:
            raise ValueError(f"max_retries, backoff_base, backoff_max must be >= 0 and timeout > 0, got "
                             f"{max_retries}, {backoff_base}, {backoff_max}, {timeout}")
        build_messages(LabelRequest(query="q", product_id="p"), prompt_version)  # fail now on an unknown version
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.prompt_version = prompt_version
        self.labeler_id = f"openai:{model}:{prompt_version}"
        self._api_key = _Secret(api_key or os.environ.get("OPENAI_API_KEY") or None)
        self._owns_client = client is None
        self._client = client or httpx.Client(
            timeout=timeout, limits=httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        )
        self._rng = random.Random()
        self._sleep = time.sleep
        # After a 429 every worker waits until this monotonic time, so a rate limit does not become a retry storm.
        self._pause_until = 0.0
        self._pause_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, api_key={self._api_key!r}, "
                f"concurrency={self.concurrency}, max_retries={self.max_retries}, prompt_version={self.prompt_version!r})")

    def close(self) -> None:
        """Close the HTTP client if this labeler created it."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ HTTP with the retry policy

    def _headers(self) -> dict[str, str]:
        key = self._api_key.get()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _scrub(self, text: str) -> str:
        key = self._api_key.get()
        return text.replace(key, "***") if key else text

    def _status_error(self, method: str, path: str, response: httpx.Response) -> OpenAIAPIError:
        try:
            detail = response.json().get("error") or {}
            detail = detail.get("message") if isinstance(detail, Mapping) else str(detail)
        except (ValueError, AttributeError):
            detail = None
        detail = self._scrub(str(detail or response.text or response.reason_phrase)[:300])
        cls = AuthenticationError if response.status_code in (401, 403) else OpenAIAPIError
        return cls(f"{method} {path}: HTTP {response.status_code}: {detail}", response.status_code)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max)
        return self._rng.uniform(0.0, min(self.backoff_max, self.backoff_base * 2**attempt))

    def _wait_for_pause(self) -> None:
        with self._pause_lock:
            delay = self._pause_until - time.monotonic()
        if delay > 0:
            self._sleep(delay)

    def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: dict | None = None,
        files: dict | None = None,
        data: dict | None = None,
        params: dict | None = None,
        reconcile: Callable[[], dict | None] | None = None,
    ) -> httpx.Response:
        """Send one API call with the retry policy; return the 2xx response.

        Args:
            reconcile: for calls that create a paid object; after an ambiguous failure (anything but
                a 429) it looks the object up and, when found, its JSON is returned instead of a retry.

        Raises:
            AuthenticationError: 401/403.
            OpenAIAPIError: a non-retryable status, or the last error once ``max_retries`` retries are spent.
        """
        url = f"{self.base_url}{path}"
        attempt = 0
        while True:
            self._wait_for_pause()
            retry_after = None
            rate_limited = False
            try:
                response = self._client.request(method, url, json=json_body, files=files, data=data, params=params,
                                                headers=self._headers(), timeout=self.timeout)
            except httpx.TransportError as exc:  # timeouts, refused/reset connections, protocol errors
                error = OpenAIAPIError(f"{method} {path}: {type(exc).__name__}: {self._scrub(str(exc))[:200]}")
            else:
                if response.is_success:
                    return response
                error = self._status_error(method, path, response)
                if response.status_code not in RETRYABLE_STATUS and response.status_code < 500:
                    raise error
                retry_after = parse_retry_after(response.headers)
                rate_limited = response.status_code == 429
            if attempt >= self.max_retries:
                raise OpenAIAPIError(f"{error} (gave up after {attempt + 1} attempts)", error.status_code)
            delay = self._backoff(attempt, retry_after)
            if rate_limited:
                with self._pause_lock:
                    self._pause_until = max(self._pause_until, time.monotonic() + delay)
            logger.warning("%s; retry %d/%d in %.2f s", error, attempt + 1, self.max_retries, delay)
            self._sleep(delay)
            attempt += 1
            if reconcile is not None and not rate_limited:
                found = reconcile()
                if found is not None:
                    logger.info("%s %s: the earlier attempt had succeeded (found %s); not creating it again",
                                method, path, found.get("id"))
                    return httpx.Response(200, json=found)

    def _find_in_list(self, path: str, field: str, value: str) -> dict | None:
        """The newest object of a list endpoint (``/batches``, ``/fine_tuning/jobs``) whose ``field`` equals ``value``."""
        for item in self._request("GET", path, params={"limit": 100}).json().get("data") or []:
            if item.get(field) == value:
                return item
        return None

    def _upload(self, content: bytes, purpose: str, filename: str) -> str:
        files = {"file": (filename, content, "application/jsonl")}
        file_id = self._request("POST", "/files", files=files, data={"purpose": purpose}).json()["id"]
        logger.info("uploaded %s (%d bytes, purpose %s) as %s", filename, len(content), purpose, file_id)
        return file_id

    # ------------------------------------------------------------------ online labelling

    def _chat_body(self, request: LabelRequest) -> dict:
        return {"model": self.model, "messages": build_messages(request, self.prompt_version),
                "response_format": response_format(), "temperature": 0}

    def _result(self, request: LabelRequest, label: int | None, reason: str, tokens: tuple[int, int]) -> LabelResult:
        return LabelResult(query=request.query, product_id=request.product_id, label=label,
                           status="ok" if label is not None else "failed", labeler_id=self.labeler_id,
                           reason=reason, input_tokens=tokens[0], output_tokens=tokens[1])

    def label_one(self, request: LabelRequest) -> LabelResult:
        """Grade one pair (blocking). Token counts add up every answer paid for, retried ones included.

        Raises:
            AuthenticationError: the key was rejected (every other pair would fail too).
        """
        body = self._chat_body(request)
        paid_in = paid_out = 0
        problem = ""
        for _ in range(self.max_retries + 1):
            try:
                completion = self._request("POST", "/chat/completions", json_body=body).json()
            except AuthenticationError:
                raise
            except OpenAIAPIError as exc:
                return self._result(request, None, str(exc), (paid_in, paid_out))
            except ValueError:  # 2xx whose body is not JSON
                problem = "response body is not JSON"
                continue
            tokens_in, tokens_out = _usage(completion)
            paid_in, paid_out = paid_in + tokens_in, paid_out + tokens_out
            try:
                label, reason = _answer_from_completion(completion)
            except MalformedAnswer as exc:
                problem = str(exc)
                logger.warning("pair (%r, %r): %s; asking again", request.query, request.product_id, problem)
                continue
            return self._result(request, label, reason, (paid_in, paid_out))
        return self._result(request, None, f"no valid answer in {self.max_retries + 1} attempts: {problem}", (paid_in, paid_out))

    def label(self, requests: Iterable[LabelRequest]) -> Iterator[LabelResult]:
        """One result per request, in completion order, with at most ``concurrency`` requests in flight.

        Requests are read lazily (at most 2 x concurrency ahead), so an iterator over millions of pairs is fine.

        Raises:
            AuthenticationError: the key was rejected; queued pairs are dropped.
        """
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai-labeler")
        pending: set = set()
        try:
            for request in requests:
                pending.add(pool.submit(self.label_one, request))
                if len(pending) >= 2 * self.concurrency:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ Batch API

    def custom_id(self, request: LabelRequest) -> str:
        """Stable id of a pair for this labeler: a hash of (labeler_id, query, product_id)."""
        key = json.dumps([self.labeler_id, request.query, request.product_id], ensure_ascii=False)
        return "pair-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]

    def batch_input_jsonl(self, requests: Iterable[LabelRequest]) -> bytes:
        """The Batch API input file: one ``/v1/chat/completions`` request per distinct pair (duplicates dropped)."""
        lines, seen = [], set()
        for request in requests:
            cid = self.custom_id(request)
            if cid in seen:
                continue
            seen.add(cid)
            line = {"custom_id": cid, "method": "POST", "url": BATCH_ENDPOINT, "body": self._chat_body(request)}
            lines.append(json.dumps(line, ensure_ascii=False))
        return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""

    def submit_batch(self, requests: Iterable[LabelRequest]) -> str:
        """Upload the pairs as a batch input file and create the batch; return the batch id.

        Raises:
            ValueError: no requests, or more than ``MAX_BATCH_REQUESTS`` distinct pairs (use :meth:`label_via_batch`).
        """
        content = self.batch_input_jsonl(requests)
        n = content.count(b"\n")
        if n == 0:
            raise ValueError("submit_batch: no requests to submit")
        if n > MAX_BATCH_REQUESTS:
            raise ValueError(f"submit_batch: {n} pairs exceed the Batch API limit of {MAX_BATCH_REQUESTS} per batch; "
                             "split them (label_via_batch does)")
        file_id = self._upload(content, "batch", "dashclip-labels.jsonl")
        body = {"input_file_id": file_id, "endpoint": BATCH_ENDPOINT, "completion_window": "24h",
                "metadata": {"labeler_id": self.labeler_id}}
        batch = self._request("POST", "/batches", json_body=body,
                              reconcile=lambda: self._find_in_list("/batches", "input_file_id", file_id)).json()
        logger.info("batch %s created for %d pairs (%s)", batch["id"], n, self.labeler_id)
        return batch["id"]

    def _poll(self, path: str, what: str, finished, poll_interval: float, timeout: float, still_running: str = "") -> dict:
        """GET ``path`` every ``poll_interval`` s until ``finished(status)``; return the object (status changes are logged).

        Raises:
            TimeoutError: still not finished after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        last_status = None
        while True:
            obj = self._request("GET", path).json()
            status = obj.get("status")
            if status != last_status:
                logger.info("%s: %s %s", what, status, obj.get("request_counts") or "")
                last_status = status
            if finished(status):
                return obj
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{what} is still {status!r} after {timeout:.0f} s{still_running}")
            self._sleep(min(poll_interval, remaining))

    def poll_batch(self, batch_id: str, poll_interval: float = 60.0, timeout: float = 25 * 3600.0) -> dict:
        """Wait until the batch is completed, failed, expired or cancelled; return the batch object.

        Raises:
            TimeoutError: still running after ``timeout`` seconds (the batch keeps running; poll again later).
        """
        return self._poll(f"/batches/{batch_id}", f"batch {batch_id}", BATCH_TERMINAL.__contains__, poll_interval, timeout,
                          still_running="; it keeps running, poll it again later")

    def batch_results(self, batch_id: str, requests: Iterable[LabelRequest]) -> Iterator[LabelResult]:
        """One result per request from a finished batch's output and error files.

        Pairs that errored, answered malformed or are missing from the output (expired, failed or
        cancelled batch) come back failed with the reason.

        Raises:
            ValueError: the batch is not finished yet.
        """
        batch = self._request("GET", f"/batches/{batch_id}").json()
        status = batch.get("status")
        if status not in BATCH_TERMINAL:
            raise ValueError(f"batch {batch_id} is {status!r}, not finished; call poll_batch first")
        records: dict[str, dict] = {}
        for key in ("error_file_id", "output_file_id"):  # output last: it wins if a pair is in both
            file_id = batch.get(key)
            if not file_id:
                continue
            content = self._request("GET", f"/files/{file_id}/content").content
            for i, line in enumerate(content.decode("utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    records[record["custom_id"]] = record
                except (ValueError, KeyError, TypeError):
                    logger.warning("batch %s: %s line %d is not a batch result; its pair will fail", batch_id, key, i + 1)
        errors = (batch.get("errors") or {}).get("data") or []
        missing = f"not in the output of batch {batch_id} ({status}" + (f": {errors[0].get('message')}" if errors else "") + ")"
        for request in requests:
            record = records.get(self.custom_id(request))
            yield self._result(request, None, missing, (0, 0)) if record is None else self._batch_line_result(request, record)

    def _batch_line_result(self, request: LabelRequest, record: dict) -> LabelResult:
        response = record.get("response") or {}
        body = response.get("body") or {}
        error = record.get("error")
        if error:
            return self._result(request, None, f"batch error {error.get('code')}: {error.get('message')}", (0, 0))
        if response.get("status_code") != 200:
            detail = (body.get("error") or {}).get("message") if isinstance(body, Mapping) else None
            return self._result(request, None, f"batch HTTP {response.get('status_code')}: {detail}", (0, 0))
        tokens = _usage(body)
        try:
            label, reason = _answer_from_completion(body)
        except MalformedAnswer as exc:
            return self._result(request, None, str(exc), tokens)
        return self._result(request, label, reason, tokens)

    def label_via_batch(self, requests: Iterable[LabelRequest], poll_interval: float = 60.0,
                        timeout: float = 25 * 3600.0) -> Iterator[LabelResult]:
        """Submit, poll and read back through the Batch API (split into batches of ``MAX_BATCH_REQUESTS``)."""
        requests = list(requests)
        chunks = [requests[i : i + MAX_BATCH_REQUESTS] for i in range(0, len(requests), MAX_BATCH_REQUESTS)]
        batch_ids = [self.submit_batch(chunk) for chunk in chunks]  # all submitted first: they run in parallel
        for batch_id, chunk in zip(batch_ids, chunks):
            self.poll_batch(batch_id, poll_interval, timeout)
            yield from self.batch_results(batch_id, chunk)

    # ------------------------------------------------------------------ fine-tuning

    def fine_tuning_jsonl(self, human_labels: pd.DataFrame) -> bytes:
        """Chat-format fine-tuning examples: the labelling prompt plus the human grade as the assistant answer.

        Args:
            human_labels: columns ``query`` and ``label`` (0/1/2), product fields ``title``, ``description``,
                ``category``, ``aisle`` (missing columns or values are shown as null) and optionally ``reason``
                (else the label's meaning, e.g. "highly relevant", is the target reason).

        Raises:
            ValueError: a required column is missing or a label is not 0, 1 or 2 (names the row).
        """
        for column in ("query", "label"):
            if column not in human_labels.columns:
                raise ValueError(f"fine_tuning_jsonl: column {column!r} is missing; got {list(human_labels.columns)}")
        lines = []
        for i, row in enumerate(human_labels.to_dict("records")):
            label = row["label"]
            if isinstance(label, bool) or label not in LABELS:
                raise ValueError(f"fine_tuning_jsonl: row {i} (query {row['query']!r}): label {label!r} is not one of {LABELS}")
            request = LabelRequest(query=str(row["query"]), product_id=str(row.get("product_id", "")),
                                   **{f: row.get(f) if isinstance(row.get(f), str) else None for f in _PRODUCT_FIELDS})
            reason = row.get("reason") if isinstance(row.get("reason"), str) else LABEL_MEANINGS[int(label)]
            messages = build_messages(request, self.prompt_version)
            messages.append({"role": "assistant", "content": answer_json(int(label), reason)})
            lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
        return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""

    def start_fine_tune(self, training_bytes: bytes, base_model: str, suffix: str) -> str:
        """Upload the training file and create a fine-tuning job; return the job id."""
        file_id = self._upload(training_bytes, "fine-tune", "dashclip-human-labels.jsonl")
        body = {"training_file": file_id, "model": base_model, "suffix": suffix}
        job = self._request("POST", "/fine_tuning/jobs", json_body=body,
                            reconcile=lambda: self._find_in_list("/fine_tuning/jobs", "training_file", file_id)).json()
        logger.info("fine-tuning job %s: %s on %s", job["id"], base_model, file_id)
        return job["id"]

    def wait_fine_tune(self, job_id: str, poll_interval: float = 60.0, timeout: float = 48 * 3600.0) -> str:
        """Wait for the job to succeed; return its ``fine_tuned_model`` id.

        Raises:
            FineTuneFailed: the job failed or was cancelled (with the job's error).
            TimeoutError: still running after ``timeout`` seconds.
        """
        job = self._poll(f"/fine_tuning/jobs/{job_id}", f"fine-tuning job {job_id}", lambda st: st in ("succeeded", "failed", "cancelled"),
                         poll_interval, timeout)
        if job["status"] != "succeeded":
            error = job.get("error") or {}
            raise FineTuneFailed(f"fine-tuning job {job_id} {job['status']}: {error.get('code')}: {error.get('message')}")
        return job["fine_tuned_model"]
