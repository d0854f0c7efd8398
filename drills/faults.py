"""A fault-injecting HTTP proxy for S3 on 127.0.0.1 (standard library only).

It sits between boto3 and a real S3 server (moto's, in the drills and tests) and forwards every request
unchanged, except that it can:

- answer a share of requests with S3's own throttling error (HTTP 503, ``<Error><Code>SlowDown</Code>``),
  without forwarding them;
- drop a share of connections mid-response: the request *is* forwarded (a PUT may have been applied),
  then only part of the response headers, or the headers and half the body, are sent before the socket
  is closed, as a load balancer resetting a connection does;
- delay chosen requests (a slow link), to widen a window a drill wants to hit;
- fail every request after ``outage_after_puts`` forwarded PUTs (an outage in the middle of a publish).

Every request is logged (:attr:`FaultProxy.log`), so a drill can count the faults it injected and check
what was read when.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

SLOWDOWN_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    "<RequestId>{rid}</RequestId><HostId>dashclip-fault-proxy</HostId></Error>"
)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


@dataclass
class Entry:
    """One request as the proxy saw it."""

    seq: int
    method: str
    path: str  # path and query as sent, e.g. /bucket/runs/.../products.parquet
    fault: str  # "" (forwarded intact), "slowdown", "drop_headers", "drop_body", "outage"
    status: int | None  # upstream's status when forwarded
    t_done: float = field(default_factory=time.monotonic)

    @property
    def key_path(self) -> str:
        return self.path.split("?", 1)[0]


class FaultProxy:
    """Forward HTTP to ``upstream`` with injected S3 faults; ``with FaultProxy(...) as proxy: proxy.url``.

    Args:
        upstream: ``http://host:port`` of the real server.
        slowdown_share: share of requests answered 503 SlowDown (not forwarded).
        drop_share: share of requests whose response connection is cut short (after forwarding).
        seed: the fault sequence is a function of the seed and the request order.
        delay_s, delay_methods: sleep ``delay_s`` before forwarding requests with these methods.
        outage_after_puts: after this many forwarded PUTs every request gets 503 (None = never).
    """

    def __init__(self, upstream: str, *, slowdown_share: float = 0.0, drop_share: float = 0.0, seed: int = 0,
                 delay_s: float = 0.0, delay_methods: tuple[str, ...] = ("PUT",), outage_after_puts: int | None = None) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.slowdown_share, self.drop_share = slowdown_share, drop_share
        self.delay_s, self.delay_methods = delay_s, delay_methods
        self.outage_after_puts = outage_after_puts
        self.log: list[Entry] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._puts = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- control --------------------------------------------------------------------------------

    def configure(self, **settings) -> None:
        """Change fault settings between phases (same names as the constructor's keywords)."""
        with self._lock:
            for name, value in settings.items():
                if name not in {"slowdown_share", "drop_share", "delay_s", "delay_methods", "outage_after_puts"}:
                    raise TypeError(f"unknown fault setting {name!r}")
                setattr(self, name, value)
            self._puts = 0

    def faults(self, since: int = 0) -> dict[str, int]:
        """How many requests of each fault kind were injected (log entries from ``since`` on)."""
        counts: dict[str, int] = {}
        for entry in self.log[since:]:
            if entry.fault:
                counts[entry.fault] = counts.get(entry.fault, 0) + 1
        return counts

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- per request ----------------------------------------------------------------------------

    def _decide(self, method: str) -> tuple[str, float]:
        """(fault kind or "", delay in seconds) for the next request."""
        with self._lock:
            if self.outage_after_puts is not None and self._puts >= self.outage_after_puts:
                fault = "outage"
            else:
                draw = self._rng.random()
                if draw < self.slowdown_share:
                    fault = "slowdown"
                elif draw < self.slowdown_share + self.drop_share:
                    fault = "drop_body" if method == "GET" and self._rng.random() < 0.5 else "drop_headers"
                else:
                    fault = ""
            delay = self.delay_s if method in self.delay_methods else 0.0
            return fault, delay

    def _count_put(self, method: str, status: int) -> None:
        if method == "PUT" and status < 300:
            with self._lock:
                self._puts += 1

    def _record(self, method: str, path: str, fault: str, status: int | None) -> None:
        with self._lock:
            self.log.append(Entry(len(self.log), method, path, fault, status))


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3's connection pool expects
    owner: FaultProxy

    def log_message(self, format, *args) -> None:
        return

    def do_GET(self) -> None:
        self._proxy()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _proxy(self) -> None:
        owner = self.owner
        body = self._read_body()
        fault, delay = owner._decide(self.command)
        if fault in ("slowdown", "outage"):
            self._send_slowdown()
            owner._record(self.command, self.path, fault, None)
            return
        if delay:
            time.sleep(delay)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(owner.upstream_host, owner.upstream_port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            resp = upstream.getresponse()
            payload = resp.read()
            status, reason, resp_headers = resp.status, resp.reason, resp.getheaders()
        finally:
            upstream.close()
        owner._count_put(self.command, status)
        head = f"HTTP/1.1 {status} {reason}\r\n".encode()
        for name, value in resp_headers:
            if name.lower() in _HOP_BY_HOP or (name.lower() == "content-length" and self.command != "HEAD"):
                continue
            head += f"{name}: {value}\r\n".encode()
        if self.command != "HEAD":
            head += f"Content-Length: {len(payload)}\r\n".encode()
        head += b"\r\n"
        if fault == "drop_headers":
            self._cut(head[: max(12, len(head) // 2)], reset=True)
        elif fault == "drop_body" and len(payload) > 1:
            self._cut(head + payload[: len(payload) // 2], reset=False)
        else:
            fault = "" if fault == "drop_body" else fault  # nothing to cut in an empty body: sent intact
            self.wfile.write(head + (payload if self.command != "HEAD" else b""))
            self.wfile.flush()
        owner._record(self.command, self.path, fault, status)

    def _send_slowdown(self) -> None:
        body = SLOWDOWN_BODY.format(rid=uuid.uuid4().hex[:16].upper()).encode()
        self.send_response(503, "Slow Down")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _cut(self, partial: bytes, reset: bool) -> None:
        """Send ``partial``, then end the connection: with a TCP reset (RST) or a plain close (FIN).

        A reset mid-headers is what a dying load balancer does; the client gets ECONNRESET. (A FIN there
        would be worse: Python's http.client takes headers cut short by EOF as complete.) Mid-body a FIN
        is enough: the response's Content-Length tells the client the body is short.
        """
        try:
            self.wfile.write(partial)
            self.wfile.flush()
            if reset:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close_connection = True

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # the socket may be gone after a cut
            super().finish()
