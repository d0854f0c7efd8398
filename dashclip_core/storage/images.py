"""Every image read of the pipeline and of the served model goes through here.

Why one place: ``image_uri`` comes from a catalog we do not control and ``image_path`` from callers of
the served model. Opened naively, ``/dev/zero`` reads until the worker dies, a FIFO blocks forever,
``../../`` or an absolute path pulls any image on the host into training and into plots logged to
MLflow, and a 12000 x 10000 PNG of a few KB costs ~430 MB when decoded. :class:`ImagePolicy` says
what may be read; :func:`open_image` reads one image under it or raises :class:`ImageRejected`
with a reason code (``image_outside_roots``, ``image_not_found``, ``image_not_a_file``,
``image_too_large``, ``image_too_many_pixels``, ``image_unreadable``, ``image_timeout``).

Order of the checks for a local path (each before any byte is decoded):

1. The path must be absolute. Its ``realpath`` (symlinks and ``..`` resolved) must lie under an
   allowed root (also resolved with ``realpath``), so a symlink inside a root cannot point out of it.
2. ``os.stat`` must show a regular file (rejects ``/dev/zero``, FIFOs, sockets, directories) of at
   most ``max_bytes``.
3. The file is opened with ``O_NONBLOCK | O_NOFOLLOW`` (a FIFO or symlink swapped in after the stat
   can neither block the open nor redirect it) and ``fstat`` must show the same regular file.
4. At most ``max_bytes + 1`` bytes are read (a file that grew since the stat is still caught).
5. PIL reads the header only (``Image.open`` is lazy, and only common raster formats are accepted:
   no EPS, which would start Ghostscript); ``width * height <= max_pixels`` is checked before
   ``load()`` decodes. PIL's own ``DecompressionBombError`` also counts as too many pixels.
6. ``load()`` decodes the whole image, which finds truncated files.

The whole read + decode runs under a deadline (``timeout_s``): a read that hangs (a stuck network
mount) is abandoned in its daemon thread and the caller gets ``image_timeout``. ``s3://`` URIs are
read with boto3: botocore connect/read timeouts, ``HeadObject`` for the size, then a ranged ``GET``
of at most ``max_bytes + 1`` bytes; the endpoint is the policy's ``s3_endpoint_url`` (else boto3's
own resolution, ``AWS_ENDPOINT_URL_S3`` included).

This module is at the bottom layer (standard library at import time; PIL and boto3 are imported
when an image is read), so models/, evaluation/ and registry/ can all use it.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - type hints only; storage/ never imports config at run time
    from PIL.Image import Image

    from dashclip_core.config import PipelineConfig

# Defaults, repeated in config.py::CatalogConfig (the config layer may not import this one); a test checks they agree.
DEFAULT_MAX_BYTES = 20_000_000
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_TIMEOUT_S = 10.0

# Raster formats a product photo may have. Everything else PIL knows (EPS/PS through Ghostscript,
# PDF, ICNS, FITS, ...) is refused: less decoder code is reachable from untrusted bytes.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

SERVING_ROOTS_ENV = "DASHCLIP_SERVING_IMAGE_ROOTS"  # os.pathsep-separated local folders and s3:// prefixes

# The served model's ``model_config`` as logged: MLflow lets a loader override only keys the logged config has
# (``mlflow.pyfunc.load_model(uri, model_config={"image_roots": [...]})``), so every image key is logged, with
# no roots (a served model reads no path unless its operator allows one).
SERVING_MODEL_CONFIG_DEFAULTS = {"image_roots": [], "max_image_bytes": DEFAULT_MAX_BYTES,
                                 "max_image_pixels": DEFAULT_MAX_PIXELS, "image_read_timeout_s": DEFAULT_TIMEOUT_S}

REASONS = {
    "image_outside_roots": "image outside the allowed roots",
    "image_not_found": "image not found",
    "image_not_a_file": "image is not a regular file",
    "image_too_large": "image too large",
    "image_too_many_pixels": "image has too many pixels",
    "image_unreadable": "image unreadable",
    "image_timeout": "image read timed out",
}

_CHUNK = 1 << 20


class ImageRejected(ValueError):
    """An image that may not or cannot be read.

    Attributes:
        reason_code: one of :data:`REASONS`' keys (stable, for reports and tests).
        detail: what was found, naming the limit or root involved.
        uri: the URI (or label of inline bytes) as the caller gave it.
    """

    def __init__(self, reason_code: str, detail: str, uri: str = "") -> None:
        if reason_code not in REASONS:
            raise ValueError(f"unknown image reason code {reason_code!r}")
        self.reason_code, self.detail, self.uri = reason_code, detail, uri
        super().__init__(f"{REASONS[reason_code]} ({reason_code}): {uri!r}: {detail}" if uri else
                         f"{REASONS[reason_code]} ({reason_code}): {detail}")

    def __reduce__(self):  # pickles with its fields (a Ray worker's error reaches the driver intact)
        return (type(self), (self.reason_code, self.detail, self.uri))

    def located(self, uri: str) -> ImageRejected:
        """The same rejection, naming ``uri``."""
        return ImageRejected(self.reason_code, self.detail, uri)


@dataclass(frozen=True)
class InlineImage:
    """Image bytes a caller sent (e.g. the served model's ``image_b64``); ``label`` names them in errors."""

    data: bytes
    label: str


@dataclass(frozen=True)
class ImagePolicy:
    """What may be read, and how much.

    Attributes:
        local_roots: allowed local folders (absolute, ``realpath``-resolved; :meth:`from_roots` resolves
            them). ``None`` = any local path (input that already passed the catalog gate); ``()`` = none.
        s3_prefixes: allowed ``s3://bucket[/prefix]`` prefixes; ``None`` = any, ``()`` = none.
        http_prefixes: allowed ``http(s)://host[:port][/path]`` prefixes (a CDN or image service); ``None`` =
            any, ``()`` = none. Redirects are followed only to URLs under an allowed prefix.
        max_bytes: largest file (or inline payload) read.
        max_pixels: largest ``width * height`` decoded.
        timeout_s: deadline of one read + decode (also botocore's connect and read timeouts); <= 0 = none.
        s3_endpoint_url: S3 endpoint (MinIO, moto); empty = boto3's default resolution.
    """

    local_roots: tuple[str, ...] | None = None
    s3_prefixes: tuple[str, ...] | None = None
    http_prefixes: tuple[str, ...] | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout_s: float = DEFAULT_TIMEOUT_S
    s3_endpoint_url: str = ""

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError(f"image policy: max_bytes ({self.max_bytes}) and max_pixels ({self.max_pixels}) must be > 0")

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_roots(cls, roots, **limits: Any) -> ImagePolicy:
        """A policy allowing exactly ``roots``: local folders (made absolute and ``realpath``-resolved)
        ``s3://bucket[/prefix]`` and ``http(s)://host[/path]`` entries. Blank entries are ignored."""
        local, s3, http = [], [], []
        for root in roots:
            root = str(root).strip()
            if not root:
                continue
            if root.startswith(_HTTP_SCHEMES):
                http.append(_normalise_http(root).rstrip("/"))
            elif root.startswith("s3://"):
                bucket, key = _split_s3(root)
                key = key.strip("/")
                s3.append(f"s3://{bucket}/{key}" if key else f"s3://{bucket}")
            else:
                local.append(os.path.realpath(os.path.abspath(os.path.expanduser(root.removeprefix("file://")))))
        return cls(local_roots=tuple(dict.fromkeys(local)), s3_prefixes=tuple(dict.fromkeys(s3)),
                   http_prefixes=tuple(dict.fromkeys(http)), **limits)

    @classmethod
    def for_pipeline(cls, cfg: PipelineConfig) -> ImagePolicy:
        """The policy of every pipeline step, derived from the config alone (so the catalog gate, the Ray
        workers, backfill and evaluate agree): ``catalog.image_roots``, plus the catalog's own folder,
        i.e. the generated catalog's folder (demo, grocery), the GroceryStoreDataset root (grocery) and
        the folder of a SQLite ``catalog_db_url()``. A SQLite URL that only an Airflow connection
        names is not known here: list its image folder in ``catalog.image_roots``."""
        roots = [r if r.startswith(("s3://", *_HTTP_SCHEMES)) else _project_path(r) for r in cfg.catalog.image_roots]
        if cfg.catalog.source in ("demo", "grocery") and not cfg.catalog.db_url:
            roots.append(str(cfg.catalog_dir()))
        if cfg.catalog.source == "grocery":
            roots.append(str(cfg.grocery_root()))
        if not cfg.catalog.airflow_conn_id:
            folder = sqlite_folder(cfg.catalog_db_url())
            if folder is not None:
                roots.append(str(folder))
        return cls.from_roots(roots, max_bytes=cfg.catalog.max_image_bytes, max_pixels=cfg.catalog.max_image_pixels,
                              timeout_s=cfg.catalog.image_read_timeout_s, s3_endpoint_url=cfg.storage.s3_endpoint_url)

    @classmethod
    def for_serving(cls, extra_roots=(), **limits: Any) -> ImagePolicy:
        """The served model's policy: only the roots the serving operator sets in ``$DASHCLIP_SERVING_IMAGE_ROOTS``
        (``os.pathsep``-separated) or passes as ``extra_roots`` (the pyfunc's load-time ``model_config``);
        none set = no local path and no S3 object may be read (inline bytes still work)."""
        return cls.from_roots([*split_roots(os.environ.get(SERVING_ROOTS_ENV, "")), *extra_roots], **limits)

    def describe_roots(self) -> str:
        local = "any local path" if self.local_roots is None else (", ".join(self.local_roots) or "no local path")
        s3 = "any s3:// object" if self.s3_prefixes is None else (", ".join(self.s3_prefixes) or "no s3:// object")
        http = "any http(s) URL" if self.http_prefixes is None else (", ".join(self.http_prefixes) or "no http(s) URL")
        return f"{local}; {s3}; {http}"

    # ---- the root check ----------------------------------------------------------------------

    def locate(self, uri: str) -> str:
        """The location to read for ``uri`` (``realpath`` of a local path, a normalised ``s3://`` URI), or
        :class:`ImageRejected` (``image_outside_roots``) when the policy does not allow it. Reads nothing."""
        if not isinstance(uri, str) or not uri.strip():
            raise ImageRejected("image_unreadable", "empty image location", str(uri))
        if uri.startswith("s3://"):
            return self._locate_s3(uri)
        if uri.lower().startswith(_HTTP_SCHEMES):
            return self._locate_http(uri)
        if "://" in uri and not uri.startswith("file://"):
            raise ImageRejected("image_outside_roots", f"scheme {uri.split('://')[0]!r} is not supported "
                                "(local paths, s3:// and http(s):// only)", uri)
        path = uri.removeprefix("file://")
        if not os.path.isabs(path):
            raise ImageRejected("image_outside_roots", "relative path: it would resolve against the reader's working "
                                "directory (the snapshot makes catalog paths absolute)", uri)
        real = os.path.realpath(path)
        if self.local_roots is not None and not any(_under(real, root) for root in self.local_roots):
            resolved = "" if real == path else f"resolves to {real!r}, "
            raise ImageRejected("image_outside_roots", f"{resolved}not under an allowed root ({self.describe_roots()}); "
                                "add its folder to catalog.image_roots if it belongs to the catalog", uri)
        return real

    def _locate_s3(self, uri: str) -> str:
        try:
            bucket, key = _split_s3(uri)
        except ValueError as err:
            raise ImageRejected("image_outside_roots", str(err), uri) from None
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            # S3 keys are literal, but some S3-compatible stores normalise "." / ".." segments.
            raise ImageRejected("image_outside_roots", "S3 key is empty or has empty, '.' or '..' segments", uri)
        if self.s3_prefixes is not None:
            target = f"{bucket}/{key}"
            if not any(_under_s3(target, p[len("s3://"):]) for p in self.s3_prefixes):
                raise ImageRejected("image_outside_roots", f"not under an allowed root ({self.describe_roots()}); "
                                    "add its s3:// prefix to catalog.image_roots if it belongs to the catalog", uri)
        return f"s3://{bucket}/{key}"

    def _locate_http(self, uri: str) -> str:
        try:
            url = _normalise_http(uri)
        except ValueError as err:
            raise ImageRejected("image_outside_roots", str(err), uri) from None
        if self.http_prefixes is not None and not any(_under_http(url, p) for p in self.http_prefixes):
            raise ImageRejected("image_outside_roots", f"not under an allowed root ({self.describe_roots()}); "
                                "add its http(s) prefix to catalog.image_roots if it belongs to the catalog", uri)
        return url


TRUSTED_INPUT = ImagePolicy(max_bytes=256_000_000, max_pixels=178_956_970, timeout_s=60.0)
"""The loaders' fallback when no policy is passed: any location (the rows already passed the catalog
gate, which applied the configured roots and limits), but still regular files only, a byte cap, a
pixel cap at PIL's own decompression-bomb limit and a deadline. These ceilings are above any
sensible configured limit, so the loaders never refuse what the gate let through."""


# ---- reading ---------------------------------------------------------------------------------


def read_image_bytes(source: str | InlineImage, policy: ImagePolicy) -> bytes:
    """The raw bytes of one image under ``policy`` (root, file-type and size checks; no decoding)."""
    if isinstance(source, InlineImage):
        if len(source.data) > policy.max_bytes:
            raise ImageRejected("image_too_large", f"{len(source.data)} bytes > max {policy.max_bytes} bytes", source.label)
        return source.data
    return _with_deadline(lambda: _read_located(source, policy), policy.timeout_s, source)


def open_image(source: str | InlineImage, policy: ImagePolicy, draft_size: tuple[int, int] | None = None,
               budget: PixelBudget | None = None) -> Image:
    """Read and decode one image under ``policy``; the returned PIL image is fully loaded.

    Args:
        source: a local path (``file://`` allowed), an ``s3://`` URI, or :class:`InlineImage` bytes.
        policy: roots and limits.
        draft_size: for JPEG, let libjpeg decode at a reduced scale no smaller than this (``Image.draft``):
            a fraction of the memory and time when only a check or a thumbnail is needed.
        budget: shared cap on the pixels being decoded at once by several threads (the catalog gate).

    Raises:
        ImageRejected: with the reason code; ``uri`` names ``source``.
    """
    label = source.label if isinstance(source, InlineImage) else source

    def read_and_decode():
        data = read_image_bytes(source, policy) if isinstance(source, InlineImage) else _read_located(source, policy)
        return decode_image(data, policy, label, draft_size=draft_size, budget=budget)

    return _with_deadline(read_and_decode, policy.timeout_s, label)


def decode_image(data: bytes, policy: ImagePolicy, label: str = "", draft_size: tuple[int, int] | None = None,
                 budget: PixelBudget | None = None) -> Image:
    """Decode ``data``: header first, the pixel cap, then the full decode (which finds truncation)."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        im = PILImage.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageRejected("image_unreadable", f"not a recognised image format (accepted: {', '.join(ACCEPTED_FORMATS)})", label) from None
    except PILImage.DecompressionBombError as err:
        raise ImageRejected("image_too_many_pixels", str(err), label) from None
    except Exception as err:  # noqa: BLE001 - a broken header is unreadable whatever PIL raises
        raise ImageRejected("image_unreadable", f"{type(err).__name__}: {err}", label) from None
    width, height = im.size
    if width * height > policy.max_pixels:
        im.close()
        raise ImageRejected("image_too_many_pixels", f"{width}x{height} = {width * height} pixels > max {policy.max_pixels}", label)
    if draft_size is not None and im.format == "JPEG":
        im.draft(None, draft_size)
    cost = min(width * height, budget.total) if budget is not None else 0
    if budget is not None:
        budget.acquire(cost)
    try:
        im.load()  # decodes every pixel; a truncated file raises here
    except PILImage.DecompressionBombError as err:
        raise ImageRejected("image_too_many_pixels", str(err), label) from None
    except Exception as err:  # noqa: BLE001 - any decode failure makes the image unusable
        im.close()
        raise ImageRejected("image_unreadable", f"{type(err).__name__}: {err}", label) from None
    finally:
        if budget is not None:
            budget.release(cost)
    return im


def image_fingerprint(uri: str, policy: ImagePolicy) -> str:
    """What identifies the image's current content without reading it: a local file's size and mtime (ns),
    an S3 object's ETag, an http(s) resource's ETag (else Last-Modified + Content-Length, from a HEAD; with
    neither header, the SHA-256 of its bytes).
    Incremental backfill keys embeddings by it, so a photo replaced in place gets a new key.

    Raises:
        ImageRejected: the location is not allowed or cannot be reached.
    """
    where = policy.locate(uri)
    try:
        if where.startswith("s3://"):
            from botocore.exceptions import BotoCoreError, ClientError

            bucket, key = _split_s3(where)
            try:
                return "s3:" + str(_s3_client(policy.s3_endpoint_url, policy.timeout_s).head_object(Bucket=bucket, Key=key)["ETag"])
            except (ClientError, BotoCoreError) as err:
                raise ImageRejected("image_unreadable", f"S3 HEAD: {err}") from None
        if where.startswith(_HTTP_SCHEMES):
            import urllib.request

            request = urllib.request.Request(where, method="HEAD", headers={"User-Agent": "dashclip-image-reader"})
            try:
                with urllib.request.urlopen(request, timeout=policy.timeout_s if policy.timeout_s > 0 else 60.0) as response:
                    h = response.headers
                    if h.get("ETag") or h.get("Last-Modified"):
                        return "http:" + (h.get("ETag") or f"{h.get('Last-Modified')}|{h.get('Content-Length', '')}")
            except OSError as err:
                if getattr(err, "code", None) not in (405, 501):  # a server without HEAD: hash the body below
                    raise ImageRejected("image_unreadable", f"HTTP HEAD: {err}") from None
            import hashlib  # neither header: the content itself is the only identity

            return "http-sha256:" + hashlib.sha256(_read_http(where, policy)).hexdigest()
        try:
            st = os.stat(where)
        except OSError as err:
            raise ImageRejected("image_not_found" if isinstance(err, FileNotFoundError) else "image_unreadable", str(err)) from None
        return f"file:{st.st_size}:{st.st_mtime_ns}"
    except ImageRejected as rejected:
        raise rejected.located(uri) from None


def check_image(source: str | InlineImage, policy: ImagePolicy, budget: PixelBudget | None = None) -> ImageRejected | None:
    """None when ``source`` reads and decodes under ``policy``, else the rejection (the catalog gate's check).

    JPEGs are decoded at 1/8 scale: every entropy-coded block is still read, so truncation and corrupt
    data are found, at a fraction of the memory.
    """
    try:
        open_image(source, policy, draft_size=(1, 1), budget=budget).close()
    except ImageRejected as rejected:
        return rejected
    return None


class PixelBudget:
    """At most ``total`` pixels decoding at once across threads (one larger image still runs, alone).

    Why: the catalog gate decodes with 8 threads; eight 40 Mpx PNGs would need ~1.3 GB at once.
    """

    def __init__(self, total: int) -> None:
        self.total = max(1, int(total))
        self._free = self.total
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._free >= n)
            self._free -= n

    def release(self, n: int) -> None:
        with self._cond:
            self._free += n
            self._cond.notify_all()


# ---- internals -------------------------------------------------------------------------------


def _read_located(uri: str, policy: ImagePolicy) -> bytes:
    where = policy.locate(uri)
    try:
        if where.startswith("s3://"):
            return _read_s3(where, policy)
        if where.startswith(_HTTP_SCHEMES):
            return _read_http(where, policy)
        return _read_local(where, policy)
    except ImageRejected as rejected:
        raise rejected.located(uri) from None


def _read_local(path: str, policy: ImagePolicy) -> bytes:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageRejected("image_not_found", "no such file") from None
    except OSError as err:
        raise ImageRejected("image_unreadable", f"{type(err).__name__}: {err.strerror or err}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageRejected("image_not_a_file", f"it is a {_kind(st.st_mode)}")
    if st.st_size > policy.max_bytes:
        raise ImageRejected("image_too_large", f"{st.st_size} bytes > max {policy.max_bytes} bytes")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise ImageRejected("image_not_a_file" if os.path.islink(path) else "image_unreadable",
                            f"cannot open: {type(err).__name__}: {err.strerror or err}") from None
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise ImageRejected("image_not_a_file", "the file was replaced between the check and the open")
        chunks, size = [], 0
        while size <= policy.max_bytes:
            chunk = os.read(fd, min(_CHUNK, policy.max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > policy.max_bytes:
            raise ImageRejected("image_too_large", f"more than max {policy.max_bytes} bytes (the file grew while read)")
        return b"".join(chunks)
    except OSError as err:
        raise ImageRejected("image_unreadable", f"{type(err).__name__}: {err.strerror or err}") from None
    finally:
        os.close(fd)


def _read_s3(uri: str, policy: ImagePolicy) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

    bucket, key = _split_s3(uri)
    client = _s3_client(policy.s3_endpoint_url, policy.timeout_s)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        if int(head.get("ContentLength", 0)) > policy.max_bytes:
            raise ImageRejected("image_too_large", f"{head['ContentLength']} bytes > max {policy.max_bytes} bytes")
        # The ranged GET bounds what is read even if the object was replaced by a larger one after the HEAD.
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{policy.max_bytes}")["Body"]
        data = body.read(policy.max_bytes + 1)
        body.close()
    except (ConnectTimeoutError, ReadTimeoutError) as err:
        raise ImageRejected("image_timeout", f"S3: {err}") from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            raise ImageRejected("image_not_found", f"no such S3 object ({code})") from None
        raise ImageRejected("image_unreadable", f"S3 {code}: {err}") from None
    except BotoCoreError as err:
        raise ImageRejected("image_unreadable", f"S3: {type(err).__name__}: {err}") from None
    if len(data) > policy.max_bytes:
        raise ImageRejected("image_too_large", f"more than max {policy.max_bytes} bytes")
    return data


_HTTP_SCHEMES = ("http://", "https://")
HTTP_ATTEMPTS = 3  # tries per image URL on 429 / 5xx / a dropped or refused connection, with exponential backoff
HTTP_BACKOFF_S = 0.5  # first wait; doubles per retry (all within the read's deadline)


def _normalise_http(uri: str) -> str:
    """``scheme://host[:port]/path[?query]`` with the scheme and host lower-cased; refuses user info (credentials
    in a catalog URL), a missing host and ``.`` / ``..`` path segments (servers normalise them away)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL with a host: {uri!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("http(s) image URLs may not carry user info (credentials)")
    if any(seg in (".", "..") for seg in parts.path.split("/")):
        raise ValueError("URL path has '.' or '..' segments")
    netloc = parts.hostname.lower() + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", parts.query, ""))


def _under_http(url: str, prefix: str) -> bool:
    """``url`` is ``prefix`` or below it at a path-segment boundary (same scheme, host and port)."""
    base = url.split("?", 1)[0]
    return base == prefix or base.startswith(prefix + "/") or (prefix.endswith("/") and base.startswith(prefix))


def _read_http(url: str, policy: ImagePolicy) -> bytes:
    """GET ``url`` with connect/read timeouts, at most ``max_bytes`` read (Content-Length checked first), retries
    with backoff on 429 / 5xx / connection errors, and redirects only to URLs the policy allows."""
    import urllib.error
    import urllib.request

    timeout = policy.timeout_s if policy.timeout_s > 0 else 60.0

    class _CheckedRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            try:
                policy.locate(newurl)
            except ImageRejected as rejected:
                raise ImageRejected("image_outside_roots", f"redirected ({code}) to {newurl!r}: {rejected.detail}") from None
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    opener = urllib.request.build_opener(_CheckedRedirect())
    wait = HTTP_BACKOFF_S
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "dashclip-image-reader", "Accept": "image/*"})
            with opener.open(request, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                    raise ImageRejected("image_too_large", f"{length} bytes > max {policy.max_bytes} bytes")
                data = response.read(policy.max_bytes + 1)
            if len(data) > policy.max_bytes:
                raise ImageRejected("image_too_large", f"more than max {policy.max_bytes} bytes")
            return data
        except urllib.error.HTTPError as err:
            if err.code == 404 or err.code == 410:
                raise ImageRejected("image_not_found", f"HTTP {err.code}") from None
            if not (err.code == 429 or err.code >= 500) or attempt == HTTP_ATTEMPTS:
                raise ImageRejected("image_unreadable", f"HTTP {err.code} {err.reason} after {attempt} tries") from None
        except TimeoutError:
            raise ImageRejected("image_timeout", f"HTTP: no answer within {timeout} s") from None
        except (urllib.error.URLError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError):
                raise ImageRejected("image_timeout", f"HTTP: no answer within {timeout} s") from None
            if attempt == HTTP_ATTEMPTS:
                raise ImageRejected("image_unreadable", f"HTTP: {type(reason).__name__}: {reason} after {attempt} tries") from None
        time.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")  # the loop returns or raises


_S3_CLIENTS: dict[tuple[str, float], Any] = {}
_S3_LOCK = threading.Lock()


def _s3_client(endpoint_url: str, timeout_s: float):
    """One client per (endpoint, timeout) per process: clients are thread-safe, creating them is not."""
    with _S3_LOCK:
        client = _S3_CLIENTS.get((endpoint_url, timeout_s))
        if client is None:
            import boto3
            from botocore.config import Config

            t = timeout_s if timeout_s > 0 else 60.0
            config = Config(connect_timeout=t, read_timeout=t, retries={"max_attempts": 2, "mode": "standard"})
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)
            _S3_CLIENTS[(endpoint_url, timeout_s)] = client
        return client


def _with_deadline(fn, timeout_s: float, label: str):
    """``fn()``, or ``image_timeout`` after ``timeout_s``. The work runs in a daemon thread so a read stuck
    in the kernel (a hung network mount) cannot keep the caller, or the process's exit, waiting."""
    if timeout_s <= 0:
        return fn()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread below
            box["error"] = err

    worker = threading.Thread(target=run, name="dashclip-image-read", daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise ImageRejected("image_timeout", f"no result after {time.monotonic() - start:.1f} s (limit {timeout_s} s)", label)
    if "error" in box:
        raise box["error"]
    return box["value"]


def split_roots(text: str) -> list[str]:
    """``os.pathsep``-separated roots; on POSIX the ``:`` of ``s3://`` / ``file://`` / ``http(s)://`` does not split
    (a port's ``:`` in an http root does: use a host without a port there, or pass the root in ``model_config``)."""
    pieces, out = text.split(os.pathsep), []
    while pieces:
        piece = pieces.pop(0)
        if piece in ("s3", "file", "http", "https") and pieces and pieces[0].startswith("//"):
            piece = f"{piece}:{pieces.pop(0)}"
        if piece.strip():
            out.append(piece.strip())
    return out


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _under_s3(target: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return target == prefix or target.startswith(prefix + "/")


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if len(bucket) < 3:
        raise ValueError(f"{uri!r}: S3 bucket names have at least 3 characters")
    return bucket, key


def sqlite_folder(db_url: str) -> Path | None:
    """Folder of a SQLite database file URL (relative image URIs resolve against it); None for other URLs."""
    if db_url.startswith("sqlite:///") and db_url[len("sqlite:///"):] not in ("", ":memory:"):
        return Path(db_url[len("sqlite:///"):].split("?")[0]).resolve().parent
    return None


def _project_path(root: str) -> str:
    """A configured root: relative ones resolve against the project root, like ``catalog.grocery_root``."""
    path = Path(root.removeprefix("file://")).expanduser()
    return str(path if path.is_absolute() else Path(__file__).resolve().parents[2] / path)
