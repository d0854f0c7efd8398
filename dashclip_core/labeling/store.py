"""Partitioned parquet store of label results, one folder per labeler, append-only.

Layout::

    <root>/labeler=<safe labeler_id>/part-000000.parquet
                                    /part-000001.parquet ...

Every :meth:`LabelStore.append` writes one new part: rows go to a hidden ``.part-*.tmp`` file in
the same folder, which is then hard-linked to the first free ``part-<n>.parquet`` name and unlinked.
``os.link`` fails instead of overwriting, so concurrent writers never clobber each other's parts, and
readers (who only look at ``part-*.parquet``) never see a half-written file. Nothing is updated in
place: a pair labelled twice (a failed pair retried, cache hits written by a re-run) has two rows,
and :meth:`LabelStore.read` keeps one per (query, product_id, labeler_id): the latest ok label, or the
latest failure when the pair never got an ok label.

Every row also carries ``text_key``: the label cache key of the request it answers (a hash of the query,
the labeler and the product text the labeler saw, :meth:`~dashclip_core.labeling.cache.LabelCache.key`).
A grade is only valid for that text: when a product's title changes, its old ok row must not stand in for
the new text, least of all when the re-grade failed. :meth:`LabelStore.ok_labels` therefore takes the
current keys and ignores rows graded on another text (parts written before the column existed have a
null ``text_key`` and match nothing; the cache still serves their text for free).

Columns keep the provenance of every row: who labelled it (``labeler_id``), the LLM's ``reason``,
tokens paid, whether it came from the cache, and when it was written (``created_at``, UTC).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from dashclip_core.labeling.base import LabelResult
from dashclip_core.storage import safe_run_id

logger = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("query", pa.string()),
    ("product_id", pa.string()),
    ("label", pa.int8()),  # null when status == "failed"
    ("status", pa.string()),  # "ok" | "failed"
    ("reason", pa.string()),
    ("labeler_id", pa.string()),
    ("input_tokens", pa.int64()),
    ("output_tokens", pa.int64()),
    ("cached", pa.bool_()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("text_key", pa.string()),  # LabelCache.key of the graded request (null in parts written before it existed)
])
COLUMNS = SCHEMA.names
_PART = re.compile(r"^part-(\d+)\.parquet$")
_ROWS_PER_BATCH = 65_536  # rows converted to Arrow at a time in append (bounds the Python lists)


def labeler_dir_name(labeler_id: str) -> str:
    """``labeler=<id>`` with the id made path-safe (unsafe characters -> ``_`` + a short hash)."""
    return f"labeler={safe_run_id(labeler_id)}"


class LabelStore:
    """Append-only parquet store of :class:`LabelResult` rows.

    Args:
        root_dir: the store folder (created on first append).
    """

    def __init__(self, root_dir: str | Path) -> None:
        self.root = Path(root_dir)

    # ---- writing --------------------------------------------------------------------------------

    def append(self, results: Iterable[LabelResult], partition: str | None = None,
               created_at: datetime | None = None, text_keys: Iterable[str | None] | None = None) -> Path | None:
        """Write ``results`` as one new part file; return its path (None when there were no results).

        Args:
            results: any iterable; converted to Arrow 64k rows at a time, so it may be long.
            partition: the labeler_id whose folder receives the part; by default the labeler_id of the
                first result. Every result must carry this labeler_id.
            created_at: the rows' timestamp (UTC); defaults to the current time.
            text_keys: one label cache key per result, in order (the text each was graded on); None
                stores null keys (such rows never count for :meth:`ok_labels` with ``current``).

        Raises:
            ValueError: a result's labeler_id differs from the partition, or ``text_keys`` and
                ``results`` differ in length.
        """
        stamp = (created_at or datetime.now(UTC)).astimezone(UTC)
        it = _with_keys(iter(results), None if text_keys is None else iter(text_keys))
        batch = _take(it, _ROWS_PER_BATCH)
        if not batch:
            return None
        partition = partition if partition is not None else batch[0][0].labeler_id
        folder = self.root / labeler_dir_name(partition)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".part-{uuid.uuid4().hex}.tmp"
        try:
            with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
                while batch:
                    writer.write_table(_to_table(batch, partition, stamp))
                    batch = _take(it, _ROWS_PER_BATCH)
            final = _publish(tmp, folder)
        finally:
            tmp.unlink(missing_ok=True)
        return final

    # ---- reading --------------------------------------------------------------------------------

    def parts(self, labeler_id: str | None = None) -> list[Path]:
        """Published part files, ordered by labeler folder then part number (= write order)."""
        if not self.root.exists():
            return []
        folders = [self.root / labeler_dir_name(labeler_id)] if labeler_id is not None else sorted(self.root.glob("labeler=*"))
        out = []
        for folder in folders:
            if folder.is_dir():
                numbered = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _PART.match(p.name))]
                out += [p for _, p in sorted(numbered)]
        return out

    def labeler_ids(self) -> list[str]:
        """Labelers with at least one row in the store."""
        ids: set[str] = set()
        for batch in self.iter_batches(columns=["labeler_id"]):
            ids.update(batch.column("labeler_id").unique().to_pylist())
        return sorted(ids)

    def dataset(self, labeler_id: str | None = None) -> ds.Dataset:
        """A pyarrow dataset over the published parts (fragments in write order)."""
        return ds.dataset([str(p) for p in self.parts(labeler_id)], schema=SCHEMA, format="parquet")

    def iter_batches(self, labeler_id: str | None = None, columns: list[str] | None = None,
                     status: str | None = None, batch_size: int = _ROWS_PER_BATCH) -> Iterator[pa.RecordBatch]:
        """Stream raw rows (no dedupe) as record batches of at most ``batch_size`` rows.

        Memory stays bounded by a few batches whatever the store size.

        Args:
            labeler_id: only this labeler's rows.
            columns: columns to read (default: all).
            status: only rows with this status ("ok" or "failed").
            batch_size: maximum rows per batch.
        """
        filt = None
        if labeler_id is not None:
            filt = ds.field("labeler_id") == labeler_id
        if status is not None:
            cond = ds.field("status") == status
            filt = cond if filt is None else filt & cond
        scanner = self.dataset(labeler_id).scanner(columns=columns, filter=filt, batch_size=batch_size,
                                                    batch_readahead=1, fragment_readahead=1)
        for batch in scanner.to_batches():
            if batch.num_rows:
                yield batch

    def read(self, labeler_id: str | None = None, dedupe: bool = True):
        """All rows as a pandas DataFrame (columns :data:`COLUMNS`), one labeler or all side by side.

        Args:
            labeler_id: only this labeler's rows (default: every labeler, told apart by ``labeler_id``).
            dedupe: keep one row per (query, product_id, labeler_id): the latest ok row, or the latest
                failed row when the pair has no ok row. "Latest" is ``created_at``, then write order.
        """
        filt = ds.field("labeler_id") == labeler_id if labeler_id is not None else None
        df = self.dataset(labeler_id).to_table(filter=filt).to_pandas()
        df["label"] = df["label"].astype("Int8")
        if not dedupe or df.empty:
            return df.reset_index(drop=True)
        return _latest_per_pair(df)

    def ok_labels(self, labeler_id: str, current=None):
        """(query, product_id, label int8) of the pairs ``labeler_id`` graded ok, and how many pairs only ever failed.

        Args:
            labeler_id: whose grades.
            current: optional frame (query, product_id, text_key) of the pairs as they are now: only rows
                graded on exactly that text count, so a pair whose product text changed and whose re-grade
                failed has no ok label (it is a failed pair, not the old text's grade). Pairs absent from
                ``current`` are ignored. None: every row counts (inspection only; the step passes ``current``).
        """
        if current is None:
            frame = self.read(labeler_id)  # one row per pair: its latest ok grade, else its latest failure
        else:
            raw = self.read(labeler_id, dedupe=False)
            keys = current[["query", "product_id", "text_key"]].drop_duplicates()
            raw = raw.merge(keys, on=["query", "product_id", "text_key"], how="inner")
            frame = _latest_per_pair(raw) if len(raw) else raw
        ok = frame[frame["status"] == "ok"]
        labels = ok[["query", "product_id", "label"]].astype({"label": "int8"}).reset_index(drop=True)
        return labels, int((frame["status"] == "failed").sum())

    def read_wide(self, labeler_ids: list[str] | None = None):
        """Ok labels of several labelers side by side: columns query, product_id, then one int8 column per labeler."""
        df = self.read()
        df = df[df["status"].eq("ok")]
        if labeler_ids is not None:
            df = df[df["labeler_id"].isin(labeler_ids)]
        wide = df.pivot(index=["query", "product_id"], columns="labeler_id", values="label")
        wide.columns.name = None
        return wide.reset_index().astype({c: "Int8" for c in wide.columns})


def _latest_per_pair(df):
    """One row per (query, product_id, labeler_id): the latest ok row, else the latest failure."""
    # Stable sort: failed rows before ok ones, each by created_at; the row order breaks ties (write order).
    df = df.assign(_ok=df["status"].eq("ok")).sort_values(["_ok", "created_at"], kind="stable")
    df = df.drop_duplicates(["query", "product_id", "labeler_id"], keep="last").drop(columns="_ok")
    return df.sort_values(["labeler_id", "query", "product_id"], kind="stable").reset_index(drop=True)


_NO_KEY = object()


def _with_keys(results: Iterator[LabelResult], keys: Iterator[str | None] | None) -> Iterator[tuple[LabelResult, str | None]]:
    """(result, text_key) pairs; refuses key lists shorter or longer than the results (a shifted key mislabels rows)."""
    for res in results:
        key = None if keys is None else next(keys, _NO_KEY)
        if key is _NO_KEY:
            raise ValueError("LabelStore.append: fewer text_keys than results")
        yield res, key
    if keys is not None and next(keys, _NO_KEY) is not _NO_KEY:
        raise ValueError("LabelStore.append: more text_keys than results")


def _take(it: Iterator, n: int) -> list:
    out = []
    for r in it:
        out.append(r)
        if len(out) == n:
            break
    return out


def _to_table(pairs: list[tuple[LabelResult, str | None]], partition: str, stamp: datetime) -> pa.Table:
    batch = [r for r, _ in pairs]
    bad = next((r for r in batch if r.labeler_id != partition), None)
    if bad is not None:
        raise ValueError(f"LabelStore.append: result ({bad.query!r}, {bad.product_id!r}) has labeler_id {bad.labeler_id!r} "
                         f"but is written to partition {partition!r}; append each labeler's results separately")
    n = len(batch)
    return pa.table({
        "query": [r.query for r in batch],
        "product_id": [r.product_id for r in batch],
        "label": pa.array([r.label for r in batch], pa.int8()),
        "status": [r.status for r in batch],
        "reason": pa.array([r.reason for r in batch], pa.string()),
        "labeler_id": pa.array([partition] * n, pa.string()),
        "input_tokens": pa.array([r.input_tokens for r in batch], pa.int64()),
        "output_tokens": pa.array([r.output_tokens for r in batch], pa.int64()),
        "cached": pa.array([r.cached for r in batch], pa.bool_()),
        "created_at": pa.array([stamp] * n, pa.timestamp("us", tz="UTC")),
        "text_key": pa.array([k for _, k in pairs], pa.string()),
    }, schema=SCHEMA)


def _publish(tmp: Path, folder: Path) -> Path:
    """Give ``tmp`` the first free ``part-<n>.parquet`` name without ever replacing an existing part."""
    taken = [int(m.group(1)) for p in folder.iterdir() if (m := _PART.match(p.name))]
    n = max(taken, default=-1) + 1
    while True:
        final = folder / f"part-{n:06d}.parquet"
        try:
            os.link(tmp, final)  # atomic, and fails if another writer took the name first
            return final
        except FileExistsError:
            n += 1
        except OSError:
            # No hard links on this filesystem: rename instead (atomic, but a racing writer could replace the part).
            if final.exists():
                n += 1
                continue
            os.rename(tmp, final)
            return final
