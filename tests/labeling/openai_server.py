"""A small OpenAI-compatible REST server on 127.0.0.1 for testing the LLM labeler over real HTTP.

It speaks the request/response shapes the labeler uses: chat completions with structured output,
multipart file upload and download, the Batch API and fine-tuning jobs. Answers come from a
pluggable ``grader(query, product_text) -> label`` (default: a word-overlap rule, so tests know the
exact labels). Faults are injected deterministically, per route and request number
(``script(route, [...])``), per query (``fault_by_query``), or with a seeded probability
(``fault_rate``). Every request is recorded (route, path, body, headers, arrival time) and every
generated completion is billed, so tests can check retries, waits and that nothing is paid twice.

Usage::

    with FakeOpenAIServer(api_key="sk-test") as server:
        server.script("chat", [Fault.status(429, retry_after="0.2"), None])
        labeler = OpenAICompatibleLabeler(server.base_url, "gpt-test", api_key="sk-test")
"""

from __future__ import annotations

import email.utils
import json
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

_WORD = re.compile(r"[a-z0-9]+")
ROUTES = [  # (method, pattern, route name)
    ("POST", re.compile(r"^/v1/chat/completions$"), "chat"),
    ("POST", re.compile(r"^/v1/files$"), "files_upload"),
    ("GET", re.compile(r"^/v1/files/(?P<id>[^/]+)/content$"), "file_content"),
    ("POST", re.compile(r"^/v1/batches$"), "batches_create"),
    ("GET", re.compile(r"^/v1/batches$"), "batches_list"),
    ("GET", re.compile(r"^/v1/batches/(?P<id>[^/]+)$"), "batches_get"),
    ("POST", re.compile(r"^/v1/fine_tuning/jobs$"), "ft_create"),
    ("GET", re.compile(r"^/v1/fine_tuning/jobs$"), "ft_list"),
    ("GET", re.compile(r"^/v1/fine_tuning/jobs/(?P<id>[^/]+)$"), "ft_get"),
]


def overlap_grader(query: str, product_text: str) -> int:
    """2 if every query word is in the product text, 1 if some are, 0 if none."""
    q = set(_WORD.findall(query.lower()))
    hits = len(q & set(_WORD.findall(product_text.lower())))
    return 2 if q and hits == len(q) else 1 if hits else 0


@dataclass(frozen=True)
class Fault:
    """One injected fault.

    kind: "status" (answer ``status`` with an OpenAI error body, nothing generated or billed), "delay"
    (do the work, bill it, then wait ``seconds`` before answering: the client may have timed out),
    "malformed" / "refusal" / "content_filter" (a billed completion whose answer is unusable).
    """

    kind: str
    status: int = 500
    retry_after: str | None = None  # sent verbatim as Retry-After
    retry_after_date_in: float | None = None  # send Retry-After as an HTTP date this many seconds ahead
    seconds: float = 0.0

    @classmethod
    def http(cls, status: int, retry_after: str | None = None, retry_after_date_in: float | None = None) -> Fault:
        return cls("status", status=status, retry_after=retry_after, retry_after_date_in=retry_after_date_in)

    @classmethod
    def delay(cls, seconds: float) -> Fault:
        return cls("delay", seconds=seconds)

    @classmethod
    def malformed(cls) -> Fault:
        return cls("malformed")

    @classmethod
    def refusal(cls) -> Fault:
        return cls("refusal")

    @classmethod
    def content_filter(cls) -> Fault:
        return cls("content_filter")


@dataclass
class Recorded:
    route: str
    method: str
    path: str
    headers: dict[str, str]
    body: object  # parsed JSON, the multipart form as a dict, or None
    t: float  # time.monotonic() at arrival


@dataclass
class Billed:
    query: str
    title: str | None
    label: int | None
    prompt_tokens: int
    completion_tokens: int
    via: str  # "chat" | "batch"


@dataclass
class _State:
    files: dict[str, dict] = field(default_factory=dict)
    batches: dict[str, dict] = field(default_factory=dict)
    batch_polls: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, dict] = field(default_factory=dict)
    job_polls: dict[str, int] = field(default_factory=dict)
    next_id: int = 0


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error", headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class FakeOpenAIServer:
    """Threaded HTTP server with OpenAI REST shapes, fault injection and request/billing records.

    Args:
        api_key: the only accepted bearer token; anything else gets 401 (whose message echoes the given key,
            worse than OpenAI's masked echo, so tests can check the client scrubs it).
        grader: ``(query, product_text) -> 0|1|2``; product_text joins title, description, category, aisle with ". ".
        latency: seconds every chat completion takes (in-flight requests are counted during it).
        batch_polls: GET /batches/{id} calls until a batch completes.
        fine_tune_polls: GET /fine_tuning/jobs/{id} calls until a job ends.
        fine_tune_error: if set, jobs end "failed" with this error object instead of "succeeded".
        batch_drop_queries: queries whose batch lines are left out of the output (like an expired batch).
    """

    def __init__(self, api_key: str = "sk-test-key", grader: Callable[[str, str], int] = overlap_grader, *,
                 latency: float = 0.0, batch_polls: int = 2, fine_tune_polls: int = 2,
                 fine_tune_error: dict | None = None, batch_drop_queries: set[str] | None = None) -> None:
        self.api_key = api_key
        self.grader = grader
        self.latency = latency
        self.batch_polls = batch_polls
        self.fine_tune_polls = fine_tune_polls
        self.fine_tune_error = fine_tune_error
        self.batch_drop_queries = set(batch_drop_queries or ())
        self.requests: list[Recorded] = []
        self.billed: list[Billed] = []
        self.fault_by_query: dict[str, list[Fault | None]] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.state = _State()
        self._script: dict[str, list[Fault | None]] = {}
        self._rate: tuple[float, random.Random, list[Fault], set[str]] | None = None
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control

    def start(self) -> FakeOpenAIServer:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def script(self, route: str, faults: list[Fault | None]) -> None:
        """Faults for the next requests of ``route`` in arrival order (None = answer normally)."""
        with self._lock:
            self._script[route] = list(faults)

    def fault_rate(self, probability: float, seed: int, faults: list[Fault], routes: set[str] = frozenset({"chat"})) -> None:
        """Each request of ``routes`` gets a fault with ``probability``, drawn from ``faults`` by a seeded RNG."""
        with self._lock:
            self._rate = (probability, random.Random(seed), list(faults), set(routes))

    def count(self, route: str) -> int:
        return sum(r.route == route for r in self.requests)

    def of(self, route: str) -> list[Recorded]:
        return [r for r in self.requests if r.route == route]

    # ------------------------------------------------------------------ request handling

    def _next_fault(self, route: str, body: object) -> Fault | None:
        with self._lock:
            queue = self._script.get(route)
            if queue:
                return queue.pop(0)
            if route == "chat" and isinstance(body, dict):
                per_query = self.fault_by_query.get(_pair_of(body)[0])
                if per_query:
                    return per_query.pop(0)
            if self._rate is not None and route in self._rate[3]:
                probability, rng, faults, _ = self._rate
                if rng.random() < probability:
                    return rng.choice(faults)
        return None

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            self.state.next_id += 1
            return f"{prefix}-{self.state.next_id:04d}"

    def handle(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, str], bytes, float]:
        """(status, headers, body, seconds to wait before sending) for one request."""
        route, params = "unknown", {}
        clean = path.split("?", 1)[0]
        for m, pattern, name in ROUTES:
            match = pattern.match(clean)
            if m == method and match:
                route, params = name, match.groupdict()
                break
        body = _parse_body(headers, raw)
        with self._lock:
            self.requests.append(Recorded(route, method, path, headers, body, time.monotonic()))
        try:
            if headers.get("authorization") != f"Bearer {self.api_key}":
                given = headers.get("authorization", "").removeprefix("Bearer ")
                raise ApiError(401, f"Incorrect API key provided: {given}.", "invalid_api_key")
            if route == "unknown":
                raise ApiError(404, f"no route for {method} {clean}", "not_found")
            fault = self._next_fault(route, body)
            if fault is not None and fault.kind == "status":
                extra = {}
                if fault.retry_after is not None:
                    extra["Retry-After"] = fault.retry_after
                if fault.retry_after_date_in is not None:
                    extra["Retry-After"] = email.utils.formatdate(time.time() + fault.retry_after_date_in, usegmt=True)
                raise ApiError(fault.status, f"injected HTTP {fault.status}", "injected", extra)
            payload = getattr(self, f"_{route}")(body, params, fault)
            wait = fault.seconds if fault is not None and fault.kind == "delay" else 0.0
            if isinstance(payload, bytes):
                return 200, {"Content-Type": "application/octet-stream"}, payload, wait
            return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode(), wait
        except ApiError as exc:
            error = {"error": {"message": exc.message, "type": "invalid_request_error", "code": exc.code, "param": None}}
            return exc.status, {"Content-Type": "application/json", **exc.headers}, json.dumps(error).encode(), 0.0

    # ------------------------------------------------------------------ chat completions

    def _complete(self, body: dict, fault: Fault | None, via: str) -> dict:
        """A chat completion for a request body (billed), shaped like OpenAI's."""
        for key in ("model", "messages"):
            if key not in body:
                raise ApiError(400, f"missing required parameter: {key!r}")
        fmt = body.get("response_format") or {}
        if fmt.get("type") != "json_schema" or not fmt.get("json_schema", {}).get("strict"):
            raise ApiError(400, "this server only answers strict json_schema response formats")
        query, product = _pair_of(body)
        product_text = ". ".join(product[f] for f in ("title", "description", "category", "aisle") if product.get(f))
        label = int(self.grader(query, product_text))
        content, refusal, finish = json.dumps({"label": label, "reason": f"graded {label}"}), None, "stop"
        if fault is not None and fault.kind == "malformed":
            content, label = '{"label": 2, "reason": "cut o', None
        elif fault is not None and fault.kind == "refusal":
            content, refusal, label = None, "I'm sorry, I can't help with that.", None
        elif fault is not None and fault.kind == "content_filter":
            content, finish, label = None, "content_filter", None
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
        completion_tokens = max(1, len((content or refusal or "").split()))
        with self._lock:
            self.billed.append(Billed(query, product.get("title"), label, prompt_tokens, completion_tokens, via))
        return {
            "id": f"chatcmpl-{len(self.billed)}", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": refusal}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
        }

    def _chat(self, body: object, params: dict, fault: Fault | None) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency:
                time.sleep(self.latency)
            return self._complete(body, fault, "chat")
        finally:
            with self._lock:
                self.in_flight -= 1

    # ------------------------------------------------------------------ files

    def _files_upload(self, body: object, params: dict, fault: Fault | None) -> dict:
        if not isinstance(body, dict) or "file" not in body or body.get("purpose") not in ("batch", "fine-tune"):
            raise ApiError(400, "expected multipart form fields 'file' and 'purpose' (batch | fine-tune)")
        file_id = self._new_id("file")
        content, filename = body["file"]
        obj = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
               "filename": filename, "purpose": body["purpose"]}
        with self._lock:
            self.state.files[file_id] = {**obj, "content": content}
        return obj

    def _file_content(self, body: object, params: dict, fault: Fault | None) -> bytes:
        stored = self.state.files.get(params["id"])
        if stored is None:
            raise ApiError(404, f"No such File object: {params['id']}", "not_found")
        return stored["content"]

    def _file_lines(self, file_id: str, purpose: str) -> list[dict]:
        stored = self.state.files.get(file_id)
        if stored is None or stored["purpose"] != purpose:
            raise ApiError(400, f"file {file_id!r} does not exist or its purpose is not {purpose!r}")
        try:
            return [json.loads(line) for line in stored["content"].decode().splitlines() if line.strip()]
        except ValueError as exc:
            raise ApiError(400, f"file {file_id} is not JSONL: {exc}") from None

    # ------------------------------------------------------------------ batches

    def _batches_create(self, body: object, params: dict, fault: Fault | None) -> dict:
        body = body if isinstance(body, dict) else {}
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            raise ApiError(400, "endpoint must be /v1/chat/completions and completion_window 24h")
        lines = self._file_lines(body.get("input_file_id"), "batch")
        ids = [line.get("custom_id") for line in lines]
        if len(set(ids)) != len(ids) or None in ids:
            raise ApiError(400, "every line needs a unique custom_id")
        if any(line.get("method") != "POST" or line.get("url") != body["endpoint"] or "body" not in line for line in lines):
            raise ApiError(400, "every line needs method POST, url = the batch endpoint and a body")
        batch_id = self._new_id("batch")
        batch = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"], "input_file_id": body["input_file_id"],
                 "completion_window": "24h", "status": "validating", "output_file_id": None, "error_file_id": None,
                 "errors": None, "created_at": int(time.time()), "metadata": body.get("metadata"),
                 "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}
        with self._lock:
            self.state.batches[batch_id] = batch
            self.state.batch_polls[batch_id] = 0
        return dict(batch)

    def _batches_list(self, body: object, params: dict, fault: Fault | None) -> dict:
        with self._lock:
            data = [dict(b) for b in reversed(self.state.batches.values())]  # newest first, like OpenAI
        return {"object": "list", "data": data, "has_more": False}

    def _batches_get(self, body: object, params: dict, fault: Fault | None) -> dict:
        batch_id = params["id"]
        with self._lock:
            batch = self.state.batches.get(batch_id)
            if batch is None:
                raise ApiError(404, f"No such Batch: {batch_id}", "not_found")
            self.state.batch_polls[batch_id] += 1
            polls = self.state.batch_polls[batch_id]
            run = batch["status"] in ("validating", "in_progress") and polls >= self.batch_polls
            if not run and batch["status"] == "validating":
                batch["status"] = "in_progress"
        if run:
            self._run_batch(batch)
        return dict(batch)

    def _run_batch(self, batch: dict) -> None:
        out, err = [], []
        for line in self._file_lines(batch["input_file_id"], "batch"):
            query = _pair_of(line["body"])[0]
            if query in self.batch_drop_queries:
                continue
            fault = self._next_fault("batch_line", line["body"])
            if fault is None:
                with self._lock:
                    per_query = self.fault_by_query.get(query)
                    fault = per_query.pop(0) if per_query else None
            record = {"id": self._new_id("batch_req"), "custom_id": line["custom_id"], "error": None}
            if fault is not None and fault.kind == "status":
                record["response"] = {"status_code": fault.status, "request_id": record["id"],
                                      "body": {"error": {"message": f"injected HTTP {fault.status}", "code": "injected"}}}
                err.append(record)
                continue
            record["response"] = {"status_code": 200, "request_id": record["id"], "body": self._complete(line["body"], fault, "batch")}
            out.append(record)
        output_id = self._new_id("file") if out else None
        error_id = self._new_id("file") if err else None
        with self._lock:
            for file_id, records in ((output_id, out), (error_id, err)):
                if file_id:
                    content = ("\n".join(json.dumps(r) for r in records) + "\n").encode()
                    self.state.files[file_id] = {"id": file_id, "purpose": "batch_output", "content": content}
            batch.update(status="completed", output_file_id=output_id, error_file_id=error_id,
                         request_counts={"total": batch["request_counts"]["total"], "completed": len(out), "failed": len(err)})

    # ------------------------------------------------------------------ fine-tuning

    def _ft_create(self, body: object, params: dict, fault: Fault | None) -> dict:
        body = body if isinstance(body, dict) else {}
        lines = self._file_lines(body.get("training_file"), "fine-tune")
        for i, line in enumerate(lines):
            messages = line.get("messages")
            if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
                raise ApiError(400, f"training line {i + 1}: needs 'messages' ending with an assistant message")
        if not body.get("model"):
            raise ApiError(400, "missing required parameter: 'model'")
        job_id = self._new_id("ftjob")
        job = {"id": job_id, "object": "fine_tuning.job", "model": body["model"], "training_file": body["training_file"],
               "suffix": body.get("suffix"), "status": "validating_files", "fine_tuned_model": None, "error": None,
               "created_at": int(time.time())}
        with self._lock:
            self.state.jobs[job_id] = job
            self.state.job_polls[job_id] = 0
        return dict(job)

    def _ft_list(self, body: object, params: dict, fault: Fault | None) -> dict:
        with self._lock:
            data = [dict(j) for j in reversed(self.state.jobs.values())]
        return {"object": "list", "data": data, "has_more": False}

    def _ft_get(self, body: object, params: dict, fault: Fault | None) -> dict:
        job_id = params["id"]
        with self._lock:
            job = self.state.jobs.get(job_id)
            if job is None:
                raise ApiError(404, f"No such fine-tuning job: {job_id}", "not_found")
            self.state.job_polls[job_id] += 1
            if job["status"] in ("validating_files", "running"):
                if self.state.job_polls[job_id] < self.fine_tune_polls:
                    job["status"] = "running"
                elif self.fine_tune_error is not None:
                    job.update(status="failed", error=dict(self.fine_tune_error))
                else:
                    job.update(status="succeeded", fine_tuned_model=f"ft:{job['model']}:{job['suffix']}:abc")
            return dict(job)


def _pair_of(body: dict) -> tuple[str, dict]:
    """(query, product fields) from the JSON object in the last user message of a chat request."""
    try:
        content = [m for m in body["messages"] if m.get("role") == "user"][-1]["content"]
        pair = json.loads(content[content.index("{"):])
        return pair["query"], pair.get("product") or {}
    except (KeyError, IndexError, ValueError, TypeError, AttributeError):
        return "", {}


def _parse_body(headers: dict[str, str], raw: bytes) -> object:
    ctype = headers.get("content-type", "")
    if not raw:
        return None
    if ctype.startswith("application/json"):
        try:
            return json.loads(raw)
        except ValueError:
            return None
    if ctype.startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
        form: dict[str, object] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            filename = part.get_filename()
            payload = part.get_payload(decode=True)
            form[name] = (payload, filename) if filename is not None else payload.decode()
        return form
    return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeOpenAIServer

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, out_headers, body, wait = self.fake.handle(method, self.path, headers, raw)
        if wait:
            time.sleep(wait)
        try:
            self.send_response(status)
            for key, value in out_headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up
            self.close_connection = True

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def log_message(self, format: str, *args: object) -> None:
        pass
