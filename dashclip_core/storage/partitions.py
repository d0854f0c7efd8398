"""Partitioned parquet: a step's large table is a folder of ``part-NNNNN.parquet`` files, written and read in chunks.

A catalog of 1M-100M products does not fit one pandas frame on an Airflow worker, so the snapshot, the
catalog gate's clean / quarantine sets and the embeddings are written one bounded chunk at a time
(:class:`PartWriter`) and read the same way (:func:`iter_frames`). The folder keeps the table's file name
(``products.parquet/``, ``clean.parquet/``): pandas (``pd.read_parquet``), pyarrow and Ray Data
(``ray.data.read_parquet``) read a folder of parts as one table, so a small catalog's readers are unchanged,
and a plain single ``.parquet`` file (older runs, hand-made inputs) is read by the same functions.

Parts are numbered in write order, so reading the folder in name order gives the rows in the order they
were written. The staging folder of a step is published atomically as a whole (``storage/run_paths.py``),
so a part needs no atomic rename of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Self

import numpy as np
import pandas as pd

PART_GLOB = "part-*.parquet"


def part_files(path: str | Path) -> list[Path]:
    """The parquet files of a table: the parts of a folder in name order, or the file itself."""
    path = Path(path)
    if path.is_dir():
        return sorted(path.glob(PART_GLOB))
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"{path}: no such parquet file or folder of {PART_GLOB}")


def iter_frames(path: str | Path, chunk_rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """The table's rows as pandas frames of at most ``chunk_rows`` rows, in order (never more than one chunk
    plus one parquet row group in memory). An empty table yields one empty frame with its columns."""
    import pyarrow.parquet as pq

    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    yielded = False
    empty = None
    for file in part_files(path):
        handle = pq.ParquetFile(file)
        if empty is None:
            empty = handle.schema_arrow.empty_table().to_pandas()
        for batch in handle.iter_batches(batch_size=chunk_rows, columns=columns):
            if batch.num_rows:
                yielded = True
                yield batch.to_pandas()
    if not yielded:
        yield empty[columns] if (empty is not None and columns) else (empty if empty is not None else pd.DataFrame(columns=columns))


def iter_arrow(path: str | Path, chunk_rows: int, columns: list[str] | None = None):
    """The table's rows as Arrow record batches of at most ``chunk_rows`` rows, in order (for numeric columns
    such as embeddings, which a pandas frame would hold as one Python object per row). Empty batches are skipped."""
    import pyarrow.parquet as pq

    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    for file in part_files(path):
        for batch in pq.ParquetFile(file).iter_batches(batch_size=chunk_rows, columns=columns):
            if batch.num_rows:
                yield batch


def frame_chunks(table: pd.DataFrame | str | Path, chunk_rows: int, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """A table given as a frame (tests, small callers) or as a parquet path / folder of parts, ``chunk_rows`` rows
    at a time (:func:`iter_frames` for a path). An empty table yields one empty frame."""
    if not isinstance(table, pd.DataFrame):
        yield from iter_frames(table, chunk_rows, columns=columns)
        return
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    frame = table if columns is None else table[columns]
    for start in range(0, max(len(frame), 1), chunk_rows):
        yield frame.iloc[start:start + chunk_rows]


def select_rows(table: pd.DataFrame | str | Path, chunk_rows: int, keep, columns: list[str] | None = None) -> pd.DataFrame:
    """The rows of ``table`` for which ``keep(chunk)`` (a boolean mask per chunk) is true, in table order, read one
    chunk at a time: memory is one chunk plus the rows kept (a labelled subset, the held-out photos), not the table."""
    kept = [chunk[np.asarray(keep(chunk), bool)] for chunk in frame_chunks(table, chunk_rows, columns=columns)]
    return pd.concat(kept, ignore_index=True) if len(kept) > 1 else kept[0].reset_index(drop=True)


def count_rows(path: str | Path) -> int:
    """Rows of a table from the parquet footers (no data read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in part_files(path))


def read_column(path: str | Path, column: str) -> pd.Series:
    """One column of the whole table (ids, for joins and uniqueness across partitions)."""
    import pyarrow.parquet as pq

    parts = [pq.read_table(f, columns=[column]).column(column).to_pandas() for f in part_files(path)]
    return pd.concat(parts, ignore_index=True) if parts else pd.Series([], dtype=object, name=column)


class PartWriter:
    """Writes a table as numbered parts into ``folder`` (created); :meth:`close` leaves at least one part
    (an empty table with the last schema seen, or ``empty``'s) so readers always find the columns.

    Every part has the same Arrow schema, because readers of a folder take one schema for all its files: a
    column that is all null in one chunk (Arrow type ``null``) is cast to the type the other chunks have,
    and when that type first shows up after null-typed parts were written, those parts are rewritten.
    """

    def __init__(self, folder: str | Path, empty: pd.DataFrame | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n_parts = 0
        self.n_rows = 0
        self._empty = empty
        self._schema_frame: pd.DataFrame | None = None
        self._schema = None  # the Arrow schema of every part written so far

    def write(self, frame: pd.DataFrame) -> Path | None:
        """Append ``frame`` as the next part (an empty frame only remembers the columns)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._schema_frame = frame.iloc[:0]
        if frame.empty:
            return None
        table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
        if self._schema is None:
            self._schema = table.schema
        elif table.schema != self._schema:
            merged = pa.schema([
                new if old.type == pa.null() else old
                for old, new in zip(self._schema, table.schema)
            ]) if self._schema.names == table.schema.names else None
            if merged is None:
                raise ValueError(f"{self.folder}: part {self.n_parts} has columns {table.schema.names}, "
                                 f"the earlier parts {self._schema.names}")
            if merged != self._schema:  # a type first seen now: the null-typed parts written so far take it
                for part in part_files(self.folder):
                    pq.write_table(pq.read_table(part).cast(merged), part)
                self._schema = merged
            table = table.cast(self._schema)
        path = self.folder / f"part-{self.n_parts:05d}.parquet"
        pq.write_table(table, path)
        self.n_parts += 1
        self.n_rows += len(frame)
        return path

    def close(self) -> int:
        """Finish the table; returns its row count."""
        if self.n_parts == 0:
            empty = self._schema_frame if self._schema_frame is not None else self._empty
            (empty if empty is not None else pd.DataFrame()).to_parquet(self.folder / "part-00000.parquet", index=False)
            self.n_parts = 1
        return self.n_rows

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()


def list_matrix(column) -> np.ndarray:
    """(N, D) float32 from an Arrow list<float> column of equal-length lists (an embeddings column), without a
    Python object per row; a null or a row of another length is an error naming the row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(column) == 0:
        return np.zeros((0, 0), np.float32)
    if column.null_count:
        raise ValueError(f"embeddings: {column.null_count} null embedding(s), first at row {pc.index(pc.is_null(column), True).as_py()}")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if (lengths != lengths[0]).any():
        row = int(np.flatnonzero(lengths != lengths[0])[0])
        raise ValueError(f"embeddings: row {row} has {lengths[row]} values, row 0 has {lengths[0]}")
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(column), int(lengths[0]))
