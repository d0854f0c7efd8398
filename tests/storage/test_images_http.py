"""Images at http(s) URLs (a CDN or image service), read from a real HTTP server on 127.0.0.1 (issue 12 item 2)."""

from __future__ import annotations

import io
import threading
import time
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from dashclip_core.storage import images
from dashclip_core.storage.images import ImagePolicy, ImageRejected, open_image, read_image_bytes


def png_bytes(size=(16, 12)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


class ImageServer(BaseHTTPRequestHandler):
    """/img/good.png, /img/flaky.png (503 twice, then the image), /img/huge.png (claims 10 GB), /img/slow.png
    (answers after 5 s), /img/missing.png (404), /img/out (302 to /private/x.png), /img/in (302 to good.png)."""

    hits: typing.ClassVar[dict[str, int]] = {}
    lock = threading.Lock()

    def do_GET(self):
        with self.lock:
            self.hits[self.path] = self.hits.get(self.path, 0) + 1
            n = self.hits[self.path]
        if self.path in ("/img/good.png", "/private/x.png") or (self.path == "/img/flaky.png" and n > 2):
            return self._send(200, png_bytes())
        if self.path == "/img/flaky.png":
            return self._send(503, b"busy")
        if self.path == "/img/huge.png":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 1024**3))
            self.end_headers()
            return None
        if self.path == "/img/slow.png":
            time.sleep(5)
            return self._send(200, png_bytes())
        if self.path in ("/img/out", "/img/in"):
            self.send_response(302)
            self.send_header("Location", "/private/x.png" if self.path == "/img/out" else "/img/good.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self._send(404, b"no")

    def _send(self, code: int, body: bytes):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture()
def policy(server, monkeypatch):
    monkeypatch.setattr(images, "HTTP_BACKOFF_S", 0.05)
    return ImagePolicy.from_roots([f"{server}/img"], timeout_s=2.0, max_bytes=1_000_000)


def test_an_image_under_an_allowed_prefix_decodes(server, policy):
    with open_image(f"{server}/img/good.png", policy) as im:
        assert im.size == (16, 12)


def test_urls_outside_the_prefixes_are_refused_without_a_request(server, policy):
    before = dict(ImageServer.hits)
    for url in (f"{server}/private/x.png", f"{server}/imgs/x.png", "http://example.invalid/img/good.png",
                f"{server}/img/../private/x.png", f"http://user:pw@127.0.0.1:{server.rsplit(':', 1)[1]}/img/good.png"):
        with pytest.raises(ImageRejected) as err:
            read_image_bytes(url, policy)
        assert err.value.reason_code == "image_outside_roots", url
    assert ImageServer.hits == before


def test_5xx_is_retried_with_backoff(server, policy):
    assert read_image_bytes(f"{server}/img/flaky.png", policy) == png_bytes()
    assert ImageServer.hits["/img/flaky.png"] == 3


@pytest.mark.parametrize(("path", "code"), [("missing.png", "image_not_found"), ("huge.png", "image_too_large"),
                                            ("slow.png", "image_timeout"), ("out", "image_outside_roots")])
def test_bad_urls_get_their_reason(server, policy, path, code):
    t0 = time.monotonic()
    with pytest.raises(ImageRejected) as err:
        read_image_bytes(f"{server}/img/{path}", policy)
    assert err.value.reason_code == code and f"/img/{path}" in str(err.value)
    assert time.monotonic() - t0 < 4.5  # the slow server is cut off by the 2 s deadline


def test_a_redirect_inside_the_prefix_is_followed(server, policy):
    assert read_image_bytes(f"{server}/img/in", policy) == png_bytes()


def test_refused_connection_is_unreadable_after_retries(policy):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = ImagePolicy.from_roots([f"http://127.0.0.1:{port}/img"], timeout_s=2.0)
    with pytest.raises(ImageRejected) as err:
        read_image_bytes(f"http://127.0.0.1:{port}/img/a.png", dead)
    assert err.value.reason_code == "image_unreadable" and "3 tries" in str(err.value)


def test_the_catalog_gate_quarantines_bad_urls_and_keeps_good_ones(server, tiny_config):
    from dashclip_core.config import PipelineConfig
    from dashclip_core.validation.catalog_gate import validate_catalog

    cfg = PipelineConfig.from_file(tiny_config).with_overrides(**{
        "catalog.image_roots": (f"{server}/img",), "catalog.image_read_timeout_s": 2.0,
        "validation.max_bad_product_fraction": 1.0, "validation.min_products": 1})
    urls = {"a": "good.png", "b": "missing.png", "c": "huge.png", "d": "out", "e": "flaky.png"}
    ImageServer.hits.pop("/img/flaky.png", None)
    products = pd.DataFrame({"product_id": list(urls), "title": [f"title {k}" for k in urls], "description": "d",
                             "brand": "b", "category": "c", "aisle": "x",
                             "image_uri": [f"{server}/img/{u}" for u in urls.values()], "updated_at": "2026-01-01"})

    result = validate_catalog(products, cfg.validation, images=ImagePolicy.for_pipeline(cfg))

    assert sorted(result.clean["product_id"]) == ["a", "e"]
    reasons = dict(zip(result.quarantine["product_id"], result.quarantine["reason"]))
    assert "image_not_found" in reasons["b"] and "image_too_large" in reasons["c"] and "image_outside_roots" in reasons["d"]


def test_fingerprints_identify_the_content_without_decoding(server, policy, tmp_path):
    from dashclip_core.storage.images import image_fingerprint

    # This server answers HEAD with 501 and sends no ETag or Last-Modified: the bytes' SHA-256 is the identity.
    assert image_fingerprint(f"{server}/img/good.png", policy) == image_fingerprint(f"{server}/img/good.png", policy)
    assert image_fingerprint(f"{server}/img/good.png", policy).startswith("http-sha256:")
    photo = tmp_path / "a.png"
    photo.write_bytes(png_bytes())
    local = ImagePolicy.from_roots([tmp_path])
    before = image_fingerprint(str(photo), local)
    photo.write_bytes(png_bytes((20, 20)))  # replaced in place
    assert image_fingerprint(str(photo), local) != before
    with pytest.raises(ImageRejected):
        image_fingerprint(f"{server}/private/x.png", policy)
