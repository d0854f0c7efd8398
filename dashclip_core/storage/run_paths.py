"""Run-scoped, atomic step outputs on a local folder or S3.

Layout: ``<root>/<dag_id>/<safe run_id>/<step>/`` with a ``_SUCCESS`` marker written last.

A step writes into a private local staging folder (``step_output``); on success the folder is
published: on a local root by one ``os.rename`` of ``<step>.staging-<token>`` to ``<step>`` (atomic
on one filesystem), on S3 by uploading every file and then the ``_SUCCESS`` object. Readers trust a
step only when ``_SUCCESS`` exists, so a crashed or concurrent writer never exposes half an output
(Airflow best practices: "treat a task like a database transaction"). Re-running a step whose
``_SUCCESS`` exists does nothing and returns the same URI.

Standard library only at import time (``tasks/`` imports this module at top level); boto3 is
imported when an S3 root is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_run_id(run_id: str) -> str:
    """Make an Airflow run id (``scheduled__2026-01-01T00:00:00+00:00``) safe as one path segment.

    Unsafe characters become ``_`` and a short hash of the original keeps two ids that differ only in
    unsafe characters apart.
    """
    if not run_id or not run_id.strip():
        raise ValueError("run_id must be a non-empty string")
    import hashlib

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
    """

    def __init__(self, root: str, dag_id: str, run_id: str, s3_endpoint_url: str = "", cache_dir: str | Path = "") -> None:
        self.root = root.rstrip("/")
        self.dag_id = dag_id
        self.run_id = run_id
        self.run_key = safe_run_id(run_id)
        self.s3_endpoint_url = s3_endpoint_url
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
        return exists(f"{self.uri(step)}/{SUCCESS}", self.s3_endpoint_url)

    # ---- writing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def step_output(self, step: str) -> Iterator[Path]:
        """Yield a private local folder; publish it as ``uri(step)`` if the block succeeds.

        Nothing is published when the block raises. If another writer published the step first, its
        output wins and ours is discarded (both came from the same inputs).
        """
        final = self.uri(step)
        if is_s3(final):
            staging = Path(tempfile.mkdtemp(prefix=f"{step}.staging-", dir=_ensure(self.cache_dir)))
        else:
            parent = _ensure(Path(self.run_uri))
            staging = parent / f"{step}.staging-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
        try:
            yield staging
            self._publish(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _publish(self, staging: Path, final: str) -> None:
        if is_s3(final):
            if exists(f"{final}/{SUCCESS}", self.s3_endpoint_url):
                logger.info("%s was published by another writer; keeping it", final)
                return
            client = s3_client(self.s3_endpoint_url)
            bucket, prefix = split_s3(final)
            for path in sorted(p for p in staging.rglob("*") if p.is_file()):
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(staging).as_posix()}")
            client.put_object(Bucket=bucket, Key=f"{prefix}/{SUCCESS}", Body=b"")
            return
        (staging / SUCCESS).write_text("")
        target = Path(final)
        if target.exists():
            if (target / SUCCESS).exists():
                logger.info("%s was published by another writer; keeping it", final)
                return
            # A folder without _SUCCESS is debris of a writer that crashed mid-rename on a
            # non-atomic filesystem; it was never trusted, so replace it.
            shutil.rmtree(target)
        os.rename(staging, target)

    # ---- reading ------------------------------------------------------------------------------

    def local(self, step: str) -> Path:
        """A local folder holding the published output of ``step`` (downloaded once from S3)."""
        return localize(self.uri(step), self.s3_endpoint_url, self.cache_dir)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def s3_client(endpoint_url: str = ""):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url or None)


def exists(uri: str, s3_endpoint_url: str = "") -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = split_s3(uri)
    client = s3_client(s3_endpoint_url)
    resp = client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    return any(obj["Key"] == key for obj in resp.get("Contents", []))


def localize(uri: str, s3_endpoint_url: str = "", cache_dir: Path | None = None) -> Path:
    """Return a local path for a published step URI; S3 prefixes are copied into ``cache_dir`` once.

    The copy lands in a temporary folder renamed into place, so a reader never sees half a download.
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
    client = s3_client(s3_endpoint_url)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=_ensure(target.parent)))
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) + 1 :]
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(dest))
            n += 1
    if n == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileNotFoundError(f"{uri}: no objects under this prefix")
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)
    return target


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
