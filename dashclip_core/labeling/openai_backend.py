"""LLM relevance labeler over any OpenAI-compatible REST API (OpenAI, Azure-style gateways, vLLM, ...).

DashCLIP labels (query, product) pairs 0/1/2 with a GPT model fine-tuned on human judgements. This
module covers the three API paths that recipe needs, all with the prompt of
:mod:`dashclip_core.labeling.prompt`:

1. Online: :meth:`OpenAICompatibleLabeler.label` sends one chat completion per pair, ``concurrency`` at a time.
2. Batch API (half price, up to 24 h): :meth:`~OpenAICompatibleLabeler.submit_batch` →
   :meth:`~OpenAICompatibleLabeler.poll_batch` → :meth:`~OpenAICompatibleLabeler.batch_results`
   (or :meth:`~OpenAICompatibleLabeler.label_via_batch` for all three).
3. Fine-tuning on human labels: :meth:`~OpenAICompatibleLabeler.fine_tuning_jsonl` →
   :meth:`~OpenAICompatibleLabeler.start_fine_tune` → :meth:`~OpenAICompatibleLabeler.wait_fine_tune`,
   whose model id is then the ``model`` of a new labeler.

What the official ``openai`` client does (``openai.OpenAI(base_url=...)`` reaches any compatible
server): HTTP, connection pooling, the per-request ``timeout``, multipart file upload, the typed
``chat.completions`` / ``files`` / ``batches`` / ``fine_tuning.jobs`` calls and the retries. It retries
408, 409, 429, 5xx, timeouts and dropped connections up to ``max_retries`` times, honours the server's
``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date) and ``x-should-retry``, and gives up at
once on a ``Retry-After`` over 2 minutes. Only the wait between its retries is ours: exponential
backoff with full jitter, U(0, min(backoff_max, backoff_base * 2**attempt)), or the server's
``Retry-After`` capped at ``backoff_max`` (:class:`Backoff`, hooked into the client's retry loop).

What stays ours: the ``concurrency`` cap (a thread pool); per-pair failure semantics (an answer that is
not the schema's JSON, a refusal and a content-filter stop are asked again up to ``max_retries`` times,
then returned as a failed result, as is a pair whose HTTP retries are spent: a pair is never guessed
and never raises; a rejected key raises :class:`AuthenticationError`, since every pair would fail);
the token usage of every answer paid for; ``labeler_id`` (``openai:<model>:<prompt_version>``, so label
caches stay valid); and key hygiene (below).

Creating a batch or a fine-tuning job costs money, so the client does not retry those calls: after an
ambiguous failure (timeout, dropped connection, 5xx: the server may have created it) we first look the
object up by its input file and reuse it instead of creating a second one. A chat completion cannot be
looked up: a timed-out request the server finished anyway is paid twice; keep ``timeout`` well above
the model's latency.

The API key comes from the ``api_key`` argument or ``OPENAI_API_KEY``; with neither, no Authorization
header is sent (local servers without auth). In the DAG it comes from an Airflow connection, resolved
at the edge by ``tasks.connections.credentials_from_airflow_connection`` (Airflow masks its password in
task logs). The client sends the key only in the ``Authorization`` header; it is not in ``repr``, our
log lines or exception messages (error bodies that echo it are scrubbed).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import openai

from dashclip_core.labeling.base import LABELS, PRODUCT_FIELDS, LabelRequest, LabelResult
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

BATCH_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
FINE_TUNE_TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
BATCH_ENDPOINT = "/v1/chat/completions"
MAX_BATCH_REQUESTS = 50_000  # OpenAI Batch API limit per input file
# openai.OpenAI refuses to start without a key; with none, every call omits the Authorization header instead.
_NO_KEY = "no-key"

T = TypeVar("T")


class OpenAIAPIError(RuntimeError):
    """An API call failed for good (not retryable, or retries exhausted); carries no request headers.

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


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (delta seconds or an HTTP date), else None.

    Args:
        headers: response headers (case-insensitive mapping, e.g. ``httpx2.Headers``).
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


def base_url_from_connection(host: str | None, schema: str | None = None, port: int | None = None,
                             extra: Mapping | None = None) -> str:
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


@dataclass(frozen=True)
class Backoff:
    """How long to wait before retry ``attempt`` (0-based): the server's Retry-After, else full jitter.

    Args:
        base: first backoff ceiling in seconds; attempt k waits U(0, min(cap, base * 2**k)).
        cap: the longest single wait, ``Retry-After`` included.
    """

    base: float
    cap: float

    def delay(self, attempt: int, headers: Mapping[str, str] | None = None) -> float:
        retry_after = parse_retry_after(headers) if headers is not None else None
        if retry_after is not None:
            return min(retry_after, self.cap)
        return random.uniform(0.0, min(self.cap, self.base * 2.0 ** min(attempt, 64)))


class _OpenAI(openai.OpenAI):
    """``openai.OpenAI`` whose waits between its own retries follow :class:`Backoff`.

    The client has no public setting for its backoff (0.5 s doubling to 8 s, Retry-After honoured up to
    2 min); ``_calculate_retry_timeout`` is the one hook its retry loop calls for the wait, so only the
    wait is replaced and the decision what to retry stays the client's. A copy made by ``with_options``
    has no ``backoff`` and keeps the client's own waits.
    """

    def __init__(self, *, backoff: Backoff | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backoff = backoff

    def _calculate_retry_timeout(self, remaining_retries: int, options: Any, response_headers: Any = None) -> float:
        if self.backoff is None:
            return super()._calculate_retry_timeout(remaining_retries, options, response_headers)
        return self.backoff.delay(self.max_retries - remaining_retries, response_headers)


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


def _retryable(status_code: int | None) -> bool:
    """Worth another try: a timeout / dropped connection (no status), 408, 429 or 5xx."""
    return status_code is None or status_code in (408, 429) or status_code >= 500


class OpenAICompatibleLabeler:
    """Grades pairs with a chat model behind an OpenAI-compatible API (implements ``Labeler``).

    Args:
        base_url: API root including the version path, e.g. ``https://api.openai.com/v1`` or ``http://vllm:8000/v1``.
        model: model id; a fine-tuned one (``ft:gpt-4o-mini-2024-07-18:org:dashclip:abc``) after :meth:`wait_fine_tune`.
        api_key: bearer token; None reads ``OPENAI_API_KEY``; if both are missing no Authorization header is sent
            (local servers without auth).
        concurrency: chat completions in flight at once in :meth:`label`.
        max_retries: the client's retries per API call (408/409/429/5xx/timeouts/connection errors), and extra
            attempts per pair for malformed answers and refusals.
        backoff_base: first backoff ceiling in seconds; retry k waits U(0, min(backoff_max, backoff_base * 2**k)).
        backoff_max: cap on any single wait, ``Retry-After`` included.
        timeout: seconds per HTTP request (connect, write, read each).
        prompt_version: the prompt sent and recorded in ``labeler_id``; must be a version ``prompt.py`` knows.

    Raises:
        ValueError: a non-positive concurrency or timeout, negative retries or backoff, or an unknown prompt version.
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
        self.backoff = Backoff(backoff_base, backoff_max)
        self.timeout = timeout
        self.prompt_version = prompt_version
        self.labeler_id = f"openai:{model}:{prompt_version}"
        key = api_key or os.environ.get("OPENAI_API_KEY") or None
        self._has_key = key is not None
        # Sent with every call: None keeps the client's Authorization header, Omit() drops it when there is no key.
        self._extra_headers = None if self._has_key else {"Authorization": openai.Omit()}
        self._client = _OpenAI(base_url=self.base_url, api_key=key or _NO_KEY, max_retries=max_retries,
                               timeout=timeout, backoff=self.backoff)
        # Creating a batch or a job must not be retried blindly (see _create_once); same connection pool.
        self._client_no_retry = self._client.with_options(max_retries=0)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key={'***' if self._has_key else None!r}, concurrency={self.concurrency}, "
                f"max_retries={self.max_retries}, prompt_version={self.prompt_version!r})")

    def close(self) -> None:
        """Close the client's connection pool."""
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calls through the client

    def _scrub(self, text: str) -> str:
        return text.replace(self._client.api_key, "***") if self._has_key else text

    def _api_error(self, exc: openai.APIError, attempts: int | None = None) -> OpenAIAPIError:
        """Our error for a client error: method, path, status and the server's message, without the key.

        Args:
            attempts: requests sent; None reads it from the last request's ``x-stainless-retry-count``.
        """
        request = exc.request
        if attempts is None:
            attempts = int(request.headers.get("x-stainless-retry-count") or 0) + 1
        status = getattr(exc, "status_code", None)
        if isinstance(exc, openai.APIStatusError):
            detail = exc.body.get("message") if isinstance(exc.body, Mapping) else exc.body
            detail = f"HTTP {status}: {str(detail or exc.response.reason_phrase)[:300]}"
        else:  # timeout, connection error, unparsable 2xx
            cause = exc.__cause__
            detail = f"{type(exc).__name__}: {exc.message}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
        message = f"{request.method} {request.url.path}: {detail}"
        if attempts > 1:
            message += f" (gave up after {attempts} attempts)"
        cls = AuthenticationError if status in (401, 403) else OpenAIAPIError
        return cls(self._scrub(message)[:600], status)

    def _call(self, method: Callable[..., T], **kwargs: Any) -> T:
        """One client call (with its retries) with our Authorization override.

        Raises:
            AuthenticationError: 401/403.
            OpenAIAPIError: a non-retryable status, or the last error once the client's retries are spent.
        """
        try:
            return method(**kwargs, extra_headers=self._extra_headers)
        except openai.APIError as exc:
            raise self._api_error(exc) from None

    def _create_once(self, create: Callable[..., T], find: Callable[[], T | None], **kwargs: Any) -> T:
        """Create a paid object (batch, fine-tuning job) without creating it twice.

        The client's own retry would send the create again after a timeout, a dropped connection or a 5xx,
        when the server may already have created it; so ``create`` runs without client retries, and after
        such a failure ``find`` looks the object up and it is reused when found. A 429 means nothing was
        created: it is simply retried after the wait.

        Raises:
            AuthenticationError: 401/403.
            OpenAIAPIError: a non-retryable status, or the last error after ``max_retries`` retries.
        """
        attempt = 0
        while True:
            try:
                return create(**kwargs, extra_headers=self._extra_headers)
            except (openai.APIStatusError, openai.APIConnectionError) as exc:  # APITimeoutError is an APIConnectionError
                status = getattr(exc, "status_code", None)
                if not _retryable(status) or attempt >= self.max_retries:
                    raise self._api_error(exc, attempts=attempt + 1) from None
                delay = self.backoff.delay(attempt, exc.response.headers if status is not None else None)
                logger.warning("%s; retry %d/%d in %.2f s", self._api_error(exc, attempts=1), attempt + 1,
                               self.max_retries, delay)
            time.sleep(delay)
            attempt += 1
            if status != 429:
                found = find()
                if found is not None:
                    logger.info("the earlier attempt had created %s; not creating it again", getattr(found, "id", found))
                    return found

    def _find_in_list(self, list_method: Callable[..., Any], field: str, value: str) -> Any | None:
        """The newest object on the first page of a list call (batches, fine-tuning jobs) whose ``field`` is ``value``."""
        page = self._call(list_method, limit=100)
        return next((item for item in page.data if getattr(item, field, None) == value), None)

    def _upload(self, content: bytes, purpose: str, filename: str) -> str:
        uploaded = self._call(self._client.files.create, file=(filename, content, "application/jsonl"), purpose=purpose)
        logger.info("uploaded %s (%d bytes, purpose %s) as %s", filename, len(content), purpose, uploaded.id)
        return uploaded.id

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
                completion = self._call(self._client.chat.completions.create, **body)
            except AuthenticationError:
                raise
            except OpenAIAPIError as exc:
                return self._result(request, None, str(exc), (paid_in, paid_out))
            except ValueError:  # a 2xx with a JSON content type whose body is not JSON
                completion = None
            if not isinstance(completion, openai.BaseModel):  # the client returns the text of a non-JSON 2xx as is
                problem = "response body is not JSON"
                continue
            completion = completion.to_dict()
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
            AuthenticationError: the key was rejected.
            OpenAIAPIError: the upload or the creation failed for good.
        """
        content = self.batch_input_jsonl(requests)
        n = content.count(b"\n")
        if n == 0:
            raise ValueError("submit_batch: no requests to submit")
        if n > MAX_BATCH_REQUESTS:
            raise ValueError(f"submit_batch: {n} pairs exceed the Batch API limit of {MAX_BATCH_REQUESTS} per batch; "
                             "split them (label_via_batch does)")
        file_id = self._upload(content, "batch", "dashclip-labels.jsonl")
        batch = self._create_once(self._client_no_retry.batches.create,
                                  lambda: self._find_in_list(self._client.batches.list, "input_file_id", file_id),
                                  input_file_id=file_id, endpoint=BATCH_ENDPOINT, completion_window="24h",
                                  metadata={"labeler_id": self.labeler_id})
        logger.info("batch %s created for %d pairs (%s)", batch.id, n, self.labeler_id)
        return batch.id

    def _poll(self, retrieve: Callable[[], T], what: str, finished: Callable[[str], bool], poll_interval: float,
              timeout: float, still_running: str = "") -> T:
        """Call ``retrieve`` every ``poll_interval`` s until ``finished(obj.status)``; return the object.

        Raises:
            TimeoutError: still not finished after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        last_status = None
        while True:
            obj = retrieve()
            status = obj.status
            if status != last_status:
                logger.info("%s: %s %s", what, status, getattr(obj, "request_counts", None) or "")
                last_status = status
            if finished(status):
                return obj
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{what} is still {status!r} after {timeout:.0f} s{still_running}")
            time.sleep(min(poll_interval, remaining))

    def poll_batch(self, batch_id: str, poll_interval: float = 60.0, timeout: float = 25 * 3600.0) -> dict:
        """Wait until the batch is completed, failed, expired or cancelled; return the batch object as a dict.

        Raises:
            TimeoutError: still running after ``timeout`` seconds (the batch keeps running; poll again later).
            OpenAIAPIError: a poll failed for good.
        """
        batch = self._poll(lambda: self._call(self._client.batches.retrieve, batch_id=batch_id), f"batch {batch_id}",
                           BATCH_TERMINAL.__contains__, poll_interval, timeout,
                           still_running="; it keeps running, poll it again later")
        return batch.to_dict()

    def batch_results(self, batch_id: str, requests: Iterable[LabelRequest]) -> Iterator[LabelResult]:
        """One result per request from a finished batch's output and error files.

        Pairs that errored, answered malformed or are missing from the output (expired, failed or
        cancelled batch) come back failed with the reason.

        Raises:
            ValueError: the batch is not finished yet.
            OpenAIAPIError: reading the batch or its files failed for good.
        """
        batch = self._call(self._client.batches.retrieve, batch_id=batch_id)
        if batch.status not in BATCH_TERMINAL:
            raise ValueError(f"batch {batch_id} is {batch.status!r}, not finished; call poll_batch first")
        records: dict[str, dict] = {}
        for key in ("error_file_id", "output_file_id"):  # output last: it wins if a pair is in both
            file_id = getattr(batch, key)
            if not file_id:
                continue
            content = self._call(self._client.files.content, file_id=file_id).content
            for i, line in enumerate(content.decode("utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    records[record["custom_id"]] = record
                except (ValueError, KeyError, TypeError):
                    logger.warning("batch %s: %s line %d is not a batch result; its pair will fail", batch_id, key, i + 1)
        errors = (batch.errors.data if batch.errors else None) or []
        missing = (f"not in the output of batch {batch_id} ({batch.status}"
                   + (f": {errors[0].message}" if errors else "") + ")")
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
        """Submit, poll and read back through the Batch API (split into batches of ``MAX_BATCH_REQUESTS``).

        Raises:
            TimeoutError: a batch is still running after ``timeout`` seconds.
            OpenAIAPIError: an API call failed for good.
        """
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
                                   **{f: row.get(f) if isinstance(row.get(f), str) else None for f in PRODUCT_FIELDS})
            reason = row.get("reason") if isinstance(row.get("reason"), str) else LABEL_MEANINGS[int(label)]
            messages = build_messages(request, self.prompt_version)
            messages.append({"role": "assistant", "content": answer_json(int(label), reason)})
            lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
        return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""

    def start_fine_tune(self, training_bytes: bytes, base_model: str, suffix: str) -> str:
        """Upload the training file and create a fine-tuning job; return the job id.

        Raises:
            AuthenticationError: the key was rejected.
            OpenAIAPIError: the upload or the creation failed for good.
        """
        file_id = self._upload(training_bytes, "fine-tune", "dashclip-human-labels.jsonl")
        job = self._create_once(self._client_no_retry.fine_tuning.jobs.create,
                                lambda: self._find_in_list(self._client.fine_tuning.jobs.list, "training_file", file_id),
                                training_file=file_id, model=base_model, suffix=suffix)
        logger.info("fine-tuning job %s: %s on %s", job.id, base_model, file_id)
        return job.id

    def wait_fine_tune(self, job_id: str, poll_interval: float = 60.0, timeout: float = 48 * 3600.0) -> str:
        """Wait for the job to succeed; return its ``fine_tuned_model`` id.

        Raises:
            FineTuneFailed: the job failed or was cancelled (with the job's error).
            TimeoutError: still running after ``timeout`` seconds.
            OpenAIAPIError: a poll failed for good.
        """
        job = self._poll(lambda: self._call(self._client.fine_tuning.jobs.retrieve, fine_tuning_job_id=job_id),
                         f"fine-tuning job {job_id}", FINE_TUNE_TERMINAL.__contains__, poll_interval, timeout)
        if job.status != "succeeded":
            error = job.error
            raise FineTuneFailed(f"fine-tuning job {job_id} {job.status}: {getattr(error, 'code', None)}: "
                                 f"{getattr(error, 'message', None)}")
        return job.fine_tuned_model
