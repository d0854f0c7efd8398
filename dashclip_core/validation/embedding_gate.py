"""Embedding gate: checks on a backfill's ``embeddings.parquet`` before it is indexed.

Per-row figures are computed with numpy and checked with Great Expectations:

1. ``product_id`` is not null and unique, every id is expected (column ``is_expected``) and the row
   count equals the number of expected ids. Together these mean: exactly one row per expected
   product. Expected ids with no row are listed in the summary (``missing_ids``).
2. Each embedding has ``dim`` values (column ``embedding_dim``; a null embedding counts as -1).
3. Each embedding is finite (column ``is_finite``).
4. Each finite ``dim``-long embedding has ``|norm - 1| <= norm_tol`` (column ``norm``; null for
   other rows, which GX skips because steps 2 and 3 already report them).

The gate passes when every expectation passes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations.expectations as gxe
import numpy as np
import pandas as pd

from dashclip_core.validation.expectations import (
    SAMPLE_SIZE,
    failing_summary,
    run_expectations,
    write_data_docs,
    write_report,
)

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("product_id", "embedding")


@dataclass
class EmbeddingGateResult:
    """Outcome of :func:`validate_embeddings`.

    Attributes:
        passed: every expectation passed (one finite unit-norm ``dim``-vector per expected product).
        summary: JSON-serialisable: ``n_rows``, ``n_expected``, ``dim``, ``norm_tol``,
            ``n_missing_ids`` / ``missing_ids`` (a sample) and ``failing_expectations`` (check,
            column, count, sample of bad product ids).
        validation_results: the GX validation result(s) behind ``summary``; the writer renders them as
            the gate's Data Docs.
    """

    passed: bool
    summary: dict[str, Any]
    validation_results: list[Any] = field(default_factory=list)


def embedding_row_stats(embeddings: pd.Series, dim: int) -> pd.DataFrame:
    """Per-row dimension, finiteness and L2 norm of a column of vectors.

    Args:
        embeddings: one vector (list / array) or null per row.
        dim: expected dimension; only vectors of this length are stacked for the vectorised norm.

    Returns:
        Frame with ``embedding_dim`` (int, -1 for null / non-sequence), ``is_finite`` (bool, None for
        null) and ``norm`` (float; NaN unless the vector is finite and ``dim`` long), on a RangeIndex.
    """
    n = len(embeddings)
    vectors = [None if v is None or np.ndim(v) == 0 else np.asarray(v, dtype=np.float64) for v in embeddings]
    lengths = np.array([-1 if v is None else v.size for v in vectors], dtype=np.int64)
    is_finite = np.full(n, None, dtype=object)
    norm = np.full(n, np.nan)
    rows = np.flatnonzero(lengths == dim)
    if rows.size:
        matrix = np.stack([vectors[i].reshape(-1) for i in rows])  # (n_ok, dim)
        finite = np.isfinite(matrix).all(axis=1)
        is_finite[rows] = finite
        norm[rows[finite]] = np.linalg.norm(matrix[finite], axis=1)
    for i in np.flatnonzero((lengths != dim) & (lengths >= 0)):  # wrong length: the dimension check reports it
        is_finite[i] = bool(np.isfinite(vectors[i]).all())
    return pd.DataFrame({"embedding_dim": lengths, "is_finite": is_finite, "norm": norm})


def validate_embeddings(
    emb: pd.DataFrame | str | os.PathLike,
    expected_ids: Iterable[str] | pd.Series,
    dim: int,
    norm_tol: float = 1e-3,
    chunk_rows: int = 100_000,
) -> EmbeddingGateResult:
    """Check that ``emb`` holds one finite, unit-norm, ``dim``-long vector per expected product.

    Args:
        emb: frame with ``product_id`` (str) and ``embedding`` (list / array of floats), or the path of an
            embeddings table (a parquet file or a folder of parts), read ``chunk_rows`` rows at a time: only the
            per-row figures (id, dimension, finiteness, norm) of the whole table are held, never its vectors.
        expected_ids: the product ids that must be present (e.g. the clean catalog's ids).
        dim: expected embedding dimension (``model.embed_dim``).
        norm_tol: allowed ``|L2 norm - 1|``.

    Returns:
        An :class:`EmbeddingGateResult`.

    Raises:
        ValueError: a required column is missing or ``dim`` is not positive.
    """
    if dim <= 0:
        raise ValueError(f"validate_embeddings: dim must be positive, got {dim}")
    expected = {str(i) for i in pd.Series(list(expected_ids), dtype=object).dropna()}
    from dashclip_core.storage.partitions import iter_frames

    chunks = [emb] if isinstance(emb, pd.DataFrame) else iter_frames(emb, chunk_rows, columns=list(REQUIRED_COLUMNS))
    stats = []
    for chunk in chunks:
        missing_cols = [c for c in REQUIRED_COLUMNS if c not in chunk.columns]
        if missing_cols:
            raise ValueError(
                f"embeddings {'frame' if isinstance(emb, pd.DataFrame) else emb}: missing column(s) {missing_cols}; "
                f"found {list(chunk.columns)}; expected {list(REQUIRED_COLUMNS)} (CONTRACTS.md, embeddings.parquet)"
            )
        chunk = chunk.reset_index(drop=True)
        part = embedding_row_stats(chunk["embedding"], dim)
        part.insert(0, "product_id", chunk["product_id"].astype(object).where(chunk["product_id"].notna(), None))
        stats.append(part)
    frame = pd.concat(stats, ignore_index=True)
    ids = frame["product_id"]
    # Membership is computed here: a GX value_set of 100k ids takes seconds, a boolean column milliseconds.
    frame["is_expected"] = pd.Series([None if i is None else i in expected for i in ids], dtype=object)

    outcomes = run_expectations(
        frame,
        [
            gxe.ExpectColumnValuesToNotBeNull(column="product_id", meta={"check": "product_id_not_null"}),
            gxe.ExpectColumnValuesToBeUnique(column="product_id", meta={"check": "product_id_unique"}),
            gxe.ExpectColumnValuesToBeInSet(
                column="is_expected", value_set=[True], meta={"check": "product_id_expected"}
            ),
            gxe.ExpectTableRowCountToEqual(value=len(expected), meta={"check": "one_row_per_expected_id"}),
            gxe.ExpectColumnValuesToBeInSet(column="embedding_dim", value_set=[dim], meta={"check": "dimension"}),
            gxe.ExpectColumnValuesToBeInSet(column="is_finite", value_set=[True], meta={"check": "finite"}),
            gxe.ExpectColumnValuesToBeBetween(
                column="norm", min_value=1.0 - norm_tol, max_value=1.0 + norm_tol, meta={"check": "unit_norm"}
            ),
        ],
        suite_name="embedding_gate",
    )

    missing_ids = sorted(expected - {i for i in ids if i is not None})
    failing = failing_summary(outcomes, ids.tolist())
    for f in failing:
        if f["check"] == "one_row_per_expected_id":  # table-level: no rows to sample, show missing ids
            f["sample_ids"] = missing_ids[:SAMPLE_SIZE]
            f["unexpected_count"] = len(missing_ids)
    passed = all(o.success for o in outcomes.values())
    summary = {
        "n_rows": len(frame),
        "n_expected": len(expected),
        "dim": dim,
        "norm_tol": norm_tol,
        "n_missing_ids": len(missing_ids),
        "missing_ids": missing_ids[:SAMPLE_SIZE],
        "failing_expectations": failing,
    }
    if passed:
        logger.info("embedding gate passed: %d products, dim %d", len(frame), dim)
    else:
        logger.warning(
            "embedding gate failed: %s",
            "; ".join(f"{f['check']} ({f['unexpected_count']} bad, e.g. {f['sample_ids'][:3]})" for f in failing),
        )
    return EmbeddingGateResult(passed=passed, summary=summary, validation_results=[outcomes.validation_result])


def write_embedding_gate_report(result: EmbeddingGateResult, out_dir: str | os.PathLike) -> Path:
    """Write ``report.json`` (``passed`` + the summary) and the GX Data Docs site ``data_docs/`` into ``out_dir``.

    Args:
        result: output of :func:`validate_embeddings`.
        out_dir: destination folder.

    Returns:
        The path of ``report.json``.
    """
    write_data_docs(result.validation_results, out_dir)
    return write_report(result.passed, result.summary, out_dir)
