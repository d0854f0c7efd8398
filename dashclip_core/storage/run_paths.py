"""Run-scoped, atomic step outputs on a local folder or S3.

Layout: ``<root>/<dag_id>/<safe run_id>/<step>/`` with a ``_SUCCESS`` marker written last.

A step writes into a private local staging folder (``step_output``); on success the folder is
published: on a local root by one ``os.rename`` of ``<step>.staging-<token>`` to ``<step>`` (atomic
on one filesystem), on S3 by uploading every file and then the ``_SUCCESS`` object. Readers trust a
step only when ``_SUCCESS`` exists, so a crashed or concurrent writer never exposes half an output
(Airflow best practices: "treat a task like a database transaction"). Re-running a step whose
``_SUCCESS`` exists does nothing and returns the same URI.

``_SUCCESS`` is also the step's **manifest**: a JSON object naming every published file with its size
and SHA-256 (:func:`manifest_of`). One S3 object is both the marker and the list, so a reader that
sees the marker also knows exactly what a complete copy holds, and :func:`localize` checks every
downloaded file against it: an object overwritten or lost after publication is an error, never a
silently different input. An empty ``_SUCCESS`` (written before the manifest existed) is accepted
without that check.

Private folders (staging, downloads) are claimed with an ``flock``-ed lock file beside them; the
kernel drops the lock when its process dies (even by SIGKILL), so the next writer or reader removes
folders whose owner is gone (:func:`sweep_dead`) and never one that is still in use.

Standard library only at import time (``tasks/`` imports this module at top level); boto3 is
imported when an S3 root is used.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
MANIFEST_FORMAT = "dashclip-publication/1"
DEFAULT_S3_MAX_ATTEMPTS = 8  # config: storage.s3_max_attempts
S3_CONNECT_TIMEOUT_S = 10.0  # a dead endpoint fails (and is retried) in seconds, not after the OS's minutes
S3_READ_TIMEOUT_S = 60.0  # per socket read; a stalled transfer is retried instead of hanging the task
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_LOCK_SUFFIX = ".lock"


class IncompletePublicationError(FileNotFoundError):
    """A published step's files do not match its ``_SUCCESS`` manifest (missing, truncated or replaced)."""


def safe_run_id(run_id: str) -> str:
    """Make an Airflow run id (``scheduled__2026-01-01T00:00:00+00:00``) safe as one path segment.

    Unsafe characters become ``_`` and a short hash of the original keeps two ids that differ only in
    unsafe characters apart.
    """
    if not run_id or not run_id.strip():
        raise ValueError("run_id must be a non-empty string")
    cleaned = _UNSAFE.sub("_", run_id).strip("._") or "run"
    if cleaned == run_id:
        return run_id
    return f"{cleaned[:150]}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if len(bucket) < 3:
        raise ValueError(f"{uri!r}: S3 bucket names have at least 3 characters")
    return bucket, key.strip("/")


class RunPaths:
    """Locations of one DAG run's step outputs.

    Args:
        root: local folder or ``s3://bucket/prefix``.
        dag_id: the DAG (or pipeline) name; one folder per DAG.
        run_id: the Airflow run id (made path-safe).
        s3_endpoint_url: optional S3 endpoint (MinIO, moto); empty means AWS.
        cache_dir: where remote outputs are copied for local reading.
        s3_max_attempts: attempts per S3 request (botocore "standard" retries: throttling, 5xx, dropped connections).
    """

    def __init__(self, root: str, dag_id: str, run_id: str, s3_endpoint_url: str = "", cache_dir: str | Path = "",
                 s3_max_attempts: int = DEFAULT_S3_MAX_ATTEMPTS) -> None:
        self.root = root.rstrip("/")
        self.dag_id = dag_id
        self.run_id = run_id
        self.run_key = safe_run_id(run_id)
        self.s3_endpoint_url = s3_endpoint_url
        self.s3_max_attempts = s3_max_attempts
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "dashclip-cache"
        if not is_s3(self.root):
            self.root = str(Path(self.root).resolve())

    # ---- addressing ---------------------------------------------------------------------------

    @property
    def run_uri(self) -> str:
        return f"{self.root}/{self.dag_id}/{self.run_key}"

    def uri(self, step: str) -> str:
        if not step or "/" in step or step.startswith("."):
            raise ValueError(f"bad step name {step!r}")
        return f"{self.run_uri}/{step}"

    def is_done(self, step: str) -> bool:
        return exists(f"{self.uri(step)}/{SUCCESS}", self.s3_endpoint_url, self.s3_max_attempts)

    # ---- writing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def step_output(self, step: str) -> Iterator[Path]:
        """Yield a private local folder; publish it as ``uri(step)`` if the block succeeds.

        Nothing is published when the block raises. If another writer published the step first, its
        output wins and ours is discarded (both came from the same inputs). Staging folders of this
        step left by a writer that died (crash, SIGKILL, OOM) are removed first.
        """
        final = self.uri(step)
        parent = _ensure(self.cache_dir / "staging" / self.dag_id / self.run_key) if is_s3(final) else _ensure(Path(self.run_uri))
        prefix = f"{step}.staging-"
        sweep_dead(parent, prefix)
        with _private_dir(parent, prefix) as staging:
            yield staging
            self._publish(staging, final)

    def _publish(self, staging: Path, final: str) -> None:
        manifest = manifest_of(staging)
        if is_s3(final):
            if exists(f"{final}/{SUCCESS}", self.s3_endpoint_url, self.s3_max_attempts):
                logger.info("%s was published by another writer; keeping it", final)
                return
            _upload(staging, final, manifest, s3_client(self.s3_endpoint_url, self.s3_max_attempts))
            return
        (staging / SUCCESS).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        target = Path(final)
        if target.exists():
            if (target / SUCCESS).exists():
                logger.info("%s was published by another writer; keeping it", final)
                return
            # A folder without _SUCCESS is debris of a writer that crashed mid-rename on a
            # non-atomic filesystem; it was never trusted, so move it aside and remove it.
            _discard(target)
        try:
            os.rename(staging, target)
        except OSError as exc:  # rename(2) onto a non-empty folder fails: a concurrent writer published first
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (target / SUCCESS).exists():
                raise
            logger.info("%s was published by another writer meanwhile; keeping it", final)

    # ---- reading ------------------------------------------------------------------------------

    def local(self, step: str) -> Path:
        """A local folder holding the published output of ``step`` (downloaded once from S3)."""
        return localize(self.uri(step), self.s3_endpoint_url, self.cache_dir, max_attempts=self.s3_max_attempts)


# ---- manifest -----------------------------------------------------------------------------------


def manifest_of(folder: Path) -> dict:
    """``{"format", "files": {relative posix path: {"size", "sha256"}}}`` of every file under ``folder`` (not ``_SUCCESS``)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != SUCCESS:
            files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return {"format": MANIFEST_FORMAT, "files": files}


def parse_manifest(text: str, where: str) -> dict | None:
    """The manifest in a ``_SUCCESS`` body; ``None`` for an empty (pre-manifest) marker."""
    if not text.strip():
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IncompletePublicationError(f"{where}: {SUCCESS} is neither empty nor a JSON manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise IncompletePublicationError(f"{where}: {SUCCESS} is not a {MANIFEST_FORMAT} manifest")
    return manifest


def verify_against_manifest(folder: Path, manifest: dict, where: str) -> None:
    """Raise :class:`IncompletePublicationError` naming the first file whose size or SHA-256 differs from the manifest."""
    for rel, meta in manifest["files"].items():
        problem = _mismatch(folder / rel, meta)
        if problem:
            raise IncompletePublicationError(f"{where}/{rel}: {problem}")


def _mismatch(path: Path, meta: dict) -> str:
    """What is wrong with ``path`` against its manifest entry ("" when nothing)."""
    if not path.is_file():
        return f"listed in {SUCCESS} but missing"
    size = path.stat().st_size
    if size != meta["size"]:
        return f"{size} bytes, {SUCCESS} says {meta['size']} (partial or replaced)"
    if file_sha256(path) != meta["sha256"]:
        return f"SHA-256 differs from {SUCCESS} (overwritten after publication?)"
    return ""


def file_sha256(path: Path) -> str:
    """SHA-256 hex of a file, read in 1 MiB blocks (manifests; training's data fingerprints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- private folders: claimed with a lock that dies with its process -----------------------------


@contextlib.contextmanager
def _private_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder ``<parent>/<prefix><hex>``, owned while the block runs, removed after it unless renamed away.

    Ownership is an exclusive ``flock`` on ``<prefix><hex>.lock`` taken *before* the folder exists and
    released only after it is gone (published by rename, or removed), so :func:`sweep_dead` can tell a
    live writer from a dead one.
    """
    while True:
        name = f"{prefix}{uuid.uuid4().hex[:8]}"
        lock_path = parent / f"{name}{_LOCK_SUFFIX}"
        fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A sweeper may have locked and unlinked the file between our open and flock (it looked dead):
        # then our lock guards nothing, so start again with a new name.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        folder = parent / name
        folder.mkdir()
        try:
            yield folder
        finally:
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        os.close(fd)


def sweep_dead(parent: Path, prefix: str) -> list[str]:
    """Remove ``<parent>/<prefix>*`` folders whose owner process is gone; return their names.

    A folder is dead when its lock file can be locked (the owner died and the kernel released the
    lock) or when it has no lock file (left by a version without locks). Live folders are skipped.
    """
    removed = []
    if not parent.is_dir():
        return removed
    for lock_path in sorted(parent.glob(f"{prefix}*{_LOCK_SUFFIX}")):
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            continue  # its owner finished meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer holds it
            folder = parent / lock_path.name[: -len(_LOCK_SUFFIX)]
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
        finally:
            os.close(fd)
    for folder in sorted(parent.glob(f"{prefix}*")):
        # The lock file is created before its folder and removed after it, so a folder without one is dead.
        if folder.is_dir() and not folder.with_name(folder.name + _LOCK_SUFFIX).exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    if removed:
        logger.info("removed %d folder(s) of dead writers under %s: %s", len(removed), parent, ", ".join(removed))
    return removed


def _discard(folder: Path) -> None:
    """Move an untrusted folder out of the way in one rename, then delete it (nobody reads it any more)."""
    aside = folder.with_name(f".discard-{folder.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return  # someone else discarded it first
    shutil.rmtree(aside, ignore_errors=True)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- S3 -----------------------------------------------------------------------------------------


_CLIENTS: dict[tuple[str, int, int], object] = {}
_CLIENTS_LOCK = threading.Lock()


def s3_client(endpoint_url: str = "", max_attempts: int = DEFAULT_S3_MAX_ATTEMPTS):
    """A boto3 S3 client that retries throttling (503 SlowDown), 5xx and dropped connections.

    botocore's "standard" mode: exponential backoff with jitter, ``max_attempts`` tries per request in
    all (first try included). Timeouts make a stalled connection an error that is retried. One client per
    (endpoint, attempts) and process: clients are thread-safe, and building one costs ~0.5 s of CPU.
    """
    if max_attempts < 1:
        raise ValueError(f"storage.s3_max_attempts must be >= 1, got {max_attempts}")
    key = (endpoint_url, max_attempts, os.getpid())  # a forked child builds its own (connection pools do not survive fork)
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            import boto3
            from botocore.config import Config

            config = Config(retries={"mode": "standard", "total_max_attempts": max_attempts},  # the first try included
                            connect_timeout=S3_CONNECT_TIMEOUT_S, read_timeout=S3_READ_TIMEOUT_S)
            # Its own session: boto3's default session is not safe to create clients from in several threads.
            _CLIENTS[key] = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)
        return _CLIENTS[key]


def _upload(staging: Path, final: str, manifest: dict, client) -> None:
    """Upload every file, check each object's size, drop stale objects, then write ``_SUCCESS`` (the manifest) last.

    A failure anywhere before the last PUT leaves no ``_SUCCESS``: readers see an unpublished step and a
    retry uploads every file again (objects are overwritten, not appended).
    """
    bucket, prefix = split_s3(final)
    for rel in manifest["files"]:  # sorted by manifest_of
        client.upload_file(str(staging / rel), bucket, f"{prefix}/{rel}")
    for rel, meta in manifest["files"].items():
        sizes = []
        for _ in range(3):  # a HEAD answer cut short can lack its headers; ask again before calling it a mismatch
            sizes.append(client.head_object(Bucket=bucket, Key=f"{prefix}/{rel}").get("ContentLength"))
            if sizes[-1] == meta["size"]:
                break
        else:
            raise IncompletePublicationError(f"{final}/{rel}: uploaded {meta['size']} bytes, S3 answers {sizes}; not publishing")
    stale = [key for key in _list_keys(client, bucket, prefix)
             if key[len(prefix) + 1 :] not in manifest["files"] and key != f"{prefix}/{SUCCESS}"]
    for key in stale:  # objects of an earlier attempt that this one did not write again
        client.delete_object(Bucket=bucket, Key=key)
    client.put_object(Bucket=bucket, Key=f"{prefix}/{SUCCESS}", Body=json.dumps(manifest, indent=1, sort_keys=True).encode(),
                      ContentType="application/json")


def _list_keys(client, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def exists(uri: str, s3_endpoint_url: str = "", max_attempts: int = DEFAULT_S3_MAX_ATTEMPTS) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    client = s3_client(s3_endpoint_url, max_attempts)
    resp = client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    return any(obj["Key"] == key for obj in resp.get("Contents", []))


def localize(uri: str, s3_endpoint_url: str = "", cache_dir: Path | None = None,
             max_attempts: int = DEFAULT_S3_MAX_ATTEMPTS) -> Path:
    """Return a local path for a published step URI; S3 prefixes are copied into ``cache_dir`` once.

    A complete copy (one holding ``_SUCCESS``) at ``<cache_dir>/s3/<bucket>/<prefix>`` is never deleted
    or replaced, because other readers (threads, processes) may be reading it. Each reader downloads into
    its own private folder beside the target, checks every file against the ``_SUCCESS`` manifest, writes
    ``_SUCCESS`` and renames the folder into place. ``rename(2)`` onto an existing non-empty folder fails,
    so the first reader to finish wins; the others discard their copy and use the winner's.

    Assumes ``cache_dir`` is on a POSIX filesystem where renaming a folder is atomic and ``flock`` works
    (a local disk; NFSv4 when hosts share it). Hosts sharing a cache on a filesystem without atomic
    rename (object-store FUSE mounts) are not supported: give each host its own ``storage.cache_dir``.

    Raises:
        FileNotFoundError: the prefix has no ``_SUCCESS`` (never published) or no objects.
        IncompletePublicationError: an object listed in the manifest is missing or differs from it.
    """
    if not is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise FileNotFoundError(f"{uri} does not exist")
        return path
    bucket, prefix = split_s3(uri)
    cache_dir = cache_dir or Path(tempfile.gettempdir()) / "dashclip-cache"
    target = cache_dir / "s3" / bucket / prefix
    if (target / SUCCESS).exists():
        return target
    client = s3_client(s3_endpoint_url, max_attempts)
    parent = _ensure(target.parent)
    download_prefix = f".download-{target.name}-"
    sweep_dead(parent, download_prefix)
    with _private_dir(parent, download_prefix) as tmp:
        marker = _download_marker(client, bucket, prefix, uri)
        manifest = parse_manifest(marker.decode(), uri)
        if manifest is None:  # a pre-manifest publication: everything under the prefix
            rels = [key[len(prefix) + 1 :] for key in _list_keys(client, bucket, prefix)]
        else:
            rels = list(manifest["files"])
        for rel in rels:
            if rel != SUCCESS:
                _download_checked(client, bucket, f"{prefix}/{rel}", tmp / rel, manifest["files"][rel] if manifest else None,
                                  f"{uri}/{rel}")
        (tmp / SUCCESS).write_bytes(marker)
        if target.exists() and not (target / SUCCESS).exists():
            _discard(target)  # an incomplete folder at the target is nobody's copy (readers need _SUCCESS)
        try:
            os.rename(tmp, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (target / SUCCESS).exists():
                raise
            logger.info("%s: another reader localised it first; using its copy", uri)
    return target


def _download_checked(client, bucket: str, key: str, dest: Path, meta: dict | None, where: str, attempts: int = 3) -> None:
    """Download one object and check it against its manifest entry, downloading again on a mismatch.

    A mismatch can be transient (a connection cut short that the HTTP stack took as a complete body),
    so it is retried; one that persists means the published object differs from the manifest.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    problem = ""
    for _ in range(attempts):
        try:
            client.download_file(bucket, key, str(dest))
        except Exception as exc:
            if _is_not_found(exc):
                raise IncompletePublicationError(f"{where}: listed in {SUCCESS} but missing on S3") from exc
            raise
        problem = _mismatch(dest, meta) if meta is not None else ""
        if not problem:
            return
        logger.warning("%s: %s; downloading it again", where, problem)
    raise IncompletePublicationError(f"{where}: {problem}")


def _download_marker(client, bucket: str, prefix: str, uri: str, attempts: int = 3) -> bytes:
    """The ``_SUCCESS`` body. botocore retries the request, not the reading of the body that follows it,
    so a connection cut mid-body is retried here."""
    from botocore.exceptions import ResponseStreamingError

    for attempt in range(1, attempts + 1):
        try:
            return client.get_object(Bucket=bucket, Key=f"{prefix}/{SUCCESS}")["Body"].read()
        except ResponseStreamingError:
            if attempt == attempts:
                raise
            logger.warning("%s/%s: connection cut while reading; reading it again", uri, SUCCESS)
        except Exception as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(f"{uri}: no {SUCCESS} object, the step was not published (completely)") from exc
            raise
    raise AssertionError("unreachable")


def _is_not_found(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
