"""Incremental backfill: an embedding is reused when neither the product's content nor the model changed.

Each product gets a **content key**, ``sha256(title, description, image fingerprint)`` (the fingerprint is a
local file's size and mtime, an S3 ETag or an HTTP ETag: :func:`~dashclip_core.storage.images.image_fingerprint`),
and each product encoder a **model digest**, the SHA-256 of its saved files. Embeddings live in an
:class:`EmbeddingStore` under ``<cache_dir>/embeddings/<model digest>/``: a nightly run with an unchanged model
embeds only new or changed products and reads the rest back; a new model has a new digest, so everything is
embedded again. Deleted products are simply not in the run's output (nor in its index).

The store is append-only parquet parts (``key`` string, ``embedding`` list<float32>), each written to a
temporary name and renamed, so concurrent runs and killed writers never leave a half-written part that a
reader would take: a reader lists only ``part-*.parquet``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

FINGERPRINT_THREADS = 16  # HEAD requests / stats in flight while computing the keys


def model_digest(model_dir: Path) -> str:
    """SHA-256 over the encoder folder's files (relative names and contents), i.e. the model's identity."""
    from dashclip_core.storage.run_paths import file_sha256

    h = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(model_dir)).encode() + b"\0" + file_sha256(path).encode() + b"\0")
    return h.hexdigest()


def content_keys(products: pd.DataFrame, policy) -> list[str]:
    """One key per row of ``products`` (``title``, ``description``, ``image_uri``), in order.

    An image that cannot be fingerprinted (gone since the gate) gets a key of its own that never matches
    a stored one, so the row is embedded (and fails there, naming the image) rather than reused.
    """
    from dashclip_core.storage.images import ImageRejected, image_fingerprint

    def fingerprint(uri) -> str:
        if uri is None or (isinstance(uri, float) and np.isnan(uri)):
            return "no-image"
        try:
            return image_fingerprint(str(uri), policy)
        except ImageRejected:
            return f"unreadable:{uuid.uuid4().hex}"

    with ThreadPoolExecutor(FINGERPRINT_THREADS) as pool:
        prints = list(pool.map(fingerprint, products["image_uri"].tolist()))
    keys = []
    for title, description, fp in zip(products["title"].tolist(), products["description"].tolist(), prints):
        blob = "\0".join(["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in (title, description)] + [fp])
        keys.append(hashlib.sha256(blob.encode()).hexdigest())
    return keys


class EmbeddingStore:
    """Embeddings of one model by content key (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet")) if self.folder.is_dir() else []

    def lookup(self, keys: list[str]) -> dict[str, np.ndarray]:
        """key -> embedding for the keys the store holds (reads only the rows it needs, part by part)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        wanted = pa.array(sorted(set(keys)), pa.string())
        found: dict[str, np.ndarray] = {}
        for part in self.parts():
            try:
                table = pq.read_table(part, columns=["key"])
            except FileNotFoundError:  # pruned by another run meanwhile: those rows are embedded again
                continue
            rows = pc.indices_nonzero(pc.is_in(table["key"], value_set=wanted)).to_numpy()
            if len(rows) == 0:
                continue
            try:
                hit = pq.read_table(part).take(pa.array(rows))
            except FileNotFoundError:
                continue
            for key, emb in zip(hit["key"].to_pylist(), hit["embedding"].to_numpy(zero_copy_only=False)):
                found[key] = np.asarray(emb, np.float32)
        return found

    def add(self, keys: list[str], matrix: np.ndarray) -> Path | None:
        """Append one part with these rows (atomically: temporary name, then rename)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not keys:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = self.folder / f".{name}.tmp"
        matrix = np.ascontiguousarray(matrix, np.float32)
        table = pa.table({"key": pa.array(keys, pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
                          .cast(pa.list_(pa.float32()))})
        pq.write_table(table, tmp)
        os.replace(tmp, self.folder / name)
        return self.folder / name

    def touch(self) -> None:
        """Mark this model's store as used now (pruning keeps the most recently used ones)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        os.utime(self.folder)

    def prune_others(self, keep: int) -> list[Path]:
        """Delete the stores of other models beyond the ``keep`` most recently used (this one always stays).

        A run still reading a pruned store only loses reuse: its lookups skip vanished parts and embed those rows."""
        import shutil

        others = [p for p in self.folder.parent.iterdir() if p.is_dir() and p != self.folder] if self.folder.parent.is_dir() else []
        others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        removed = others[max(keep - 1, 0):]
        for folder in removed:
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("embedding store: pruned %s (ray.backfill_keep_models)", folder)
        return removed
