"""Tests for the embedding gate: one finite, unit-norm, dim-long vector per expected product."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dashclip_core.validation.embedding_gate import validate_embeddings, write_embedding_gate_report

DIM = 8


def make_embeddings(n: int = 12) -> pd.DataFrame:
    x = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return pd.DataFrame({"product_id": [f"p{i:03d}" for i in range(n)], "embedding": list(x)})


def failing(result) -> dict[str, dict]:
    return {f["check"]: f for f in result.summary["failing_expectations"]}


def test_good_embeddings_pass_after_parquet_round_trip(tmp_path: Path) -> None:
    emb = make_embeddings()
    emb.to_parquet(tmp_path / "embeddings.parquet")
    emb = pd.read_parquet(tmp_path / "embeddings.parquet")

    result = validate_embeddings(emb, set(emb["product_id"]), DIM)

    assert result.passed, result.summary
    report = json.loads(write_embedding_gate_report(result, tmp_path / "gate").read_text())
    assert report["passed"] is True and report["n_rows"] == 12


def test_nan_vector_fails_finite_check() -> None:
    emb = make_embeddings()
    vec = emb.at[3, "embedding"].copy()
    vec[0] = np.nan
    emb.at[3, "embedding"] = vec

    result = validate_embeddings(emb, pd.Series(emb["product_id"]), DIM)

    assert not result.passed
    assert set(failing(result)) == {"finite"}
    assert failing(result)["finite"]["sample_ids"] == ["p003"]


def test_wrong_dimension_and_null_vector_fail_dimension_check() -> None:
    emb = make_embeddings()
    emb.at[2, "embedding"] = np.ones(DIM + 1, dtype=np.float32) / np.sqrt(DIM + 1)
    emb.at[5, "embedding"] = None

    result = validate_embeddings(emb, set(emb["product_id"]), DIM)

    assert set(failing(result)) == {"dimension"}
    assert failing(result)["dimension"]["sample_ids"] == ["p002", "p005"]


def test_norm_outside_tolerance_fails() -> None:
    emb = make_embeddings()
    emb.at[7, "embedding"] = emb.at[7, "embedding"] * 1.01

    assert set(failing(validate_embeddings(emb, set(emb["product_id"]), DIM))) == {"unit_norm"}
    assert validate_embeddings(emb, set(emb["product_id"]), DIM, norm_tol=0.02).passed


def test_missing_duplicate_and_unexpected_ids() -> None:
    emb = make_embeddings()
    expected = set(emb["product_id"])
    emb.loc[4, "product_id"] = "p003"  # p004 now missing, p003 twice
    emb.loc[9, "product_id"] = "stranger"  # p009 missing, an id nobody asked for

    result = validate_embeddings(emb, expected, DIM)

    bad = failing(result)
    # Still 12 rows for 12 expected ids: uniqueness and membership are what catch it.
    assert set(bad) == {"product_id_unique", "product_id_expected"}
    assert bad["product_id_unique"]["sample_ids"] == ["p003"]
    assert bad["product_id_expected"]["sample_ids"] == ["stranger"]
    assert result.summary["missing_ids"] == ["p004", "p009"] and result.summary["n_missing_ids"] == 2


def test_fewer_rows_than_expected_fails_row_count() -> None:
    emb = make_embeddings()

    result = validate_embeddings(emb.iloc[:-2], set(emb["product_id"]), DIM)

    bad = failing(result)
    assert set(bad) == {"one_row_per_expected_id"}
    assert bad["one_row_per_expected_id"]["sample_ids"] == ["p010", "p011"]
    assert bad["one_row_per_expected_id"]["unexpected_count"] == 2


def test_missing_column_raises() -> None:
    with pytest.raises(ValueError, match=r"missing column\(s\) \['embedding'\]"):
        validate_embeddings(pd.DataFrame({"product_id": ["a"]}), {"a"}, DIM)


def test_partitioned_table_read_in_chunks_gives_the_frame_verdict(tmp_path: Path, monkeypatch) -> None:
    """A folder of parts read 5 rows at a time: same failures, same ids as the whole frame, no batch above 5 rows."""
    from dashclip_core.storage import partitions
    from dashclip_core.storage.partitions import PartWriter

    emb = make_embeddings(23)
    emb.at[4, "embedding"] = emb.at[4, "embedding"] * 1.5  # in the first part
    emb.loc[17, "product_id"] = "p003"  # a duplicate of a row in another part
    writer = PartWriter(tmp_path / "embeddings.parquet")
    for start in range(0, 23, 9):
        writer.write(emb.iloc[start:start + 9])
    writer.close()
    seen = []
    original = partitions.iter_frames
    monkeypatch.setattr(partitions, "iter_frames", lambda *a, **k: (seen.append(len(f)) or f for f in original(*a, **k)))
    expected = [f"p{i:03d}" for i in range(23)]

    from_parts = validate_embeddings(tmp_path / "embeddings.parquet", expected, DIM, chunk_rows=5)

    whole = validate_embeddings(emb, expected, DIM)
    assert max(seen) <= 5 and sum(seen) == 23
    assert not from_parts.passed and from_parts.summary == whole.summary
    assert set(failing(from_parts)) == {"unit_norm", "product_id_unique"}
    assert from_parts.summary["missing_ids"] == ["p017"]
