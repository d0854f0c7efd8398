"""Catalog extraction and the catalog gate at a catalog larger than one chunk: both work one bounded chunk at
a time (SQL fetches, parquet parts, GX batches) and give the same rows as the whole-table path."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from dashclip_core.catalog.snapshot import (
    extract_snapshot,
    iter_table,
    read_catalog,
    resolve_image_uris,
    sample_products,
)
from dashclip_core.config import PipelineConfig
from dashclip_core.layout import CatalogGate, Snapshot
from dashclip_core.storage.partitions import PartWriter, count_rows, iter_frames, part_files
from dashclip_core.validation import catalog_gate
from dashclip_core.validation.catalog_gate import validate_catalog, validate_catalog_parts

CHUNK = 64


@pytest.fixture(scope="module")
def chunked_cfg(demo_db: Path) -> PipelineConfig:
    """The default demo catalog (480 products) read in chunks of 64 rows."""
    return PipelineConfig().with_overrides(**{"catalog.chunk_rows": CHUNK, "catalog.db_url": f"sqlite:///{demo_db}"})


def test_the_snapshot_streams_sql_into_parts_of_at_most_one_chunk(chunked_cfg, demo_db, tmp_path, monkeypatch):
    fetched: list[int] = []
    real_read_sql = pd.read_sql

    def counting_read_sql(*args, **kwargs):  # the frames pandas hands back from the cursor
        out = real_read_sql(*args, **kwargs)
        if kwargs.get("chunksize"):
            def chunks():
                for frame in out:
                    fetched.append(len(frame))
                    yield frame
            return chunks()
        return out

    monkeypatch.setattr(pd, "read_sql", counting_read_sql)
    counts = extract_snapshot(chunked_cfg, chunked_cfg.catalog.db_url, tmp_path)
    monkeypatch.undo()
    snap = Snapshot(tmp_path)
    assert max(fetched) <= CHUNK and sum(fetched) > CHUNK
    parts = part_files(snap.products)
    assert snap.products.is_dir() and len(parts) == -(-480 // CHUNK)
    assert all(count_rows(p) <= CHUNK for p in parts)
    # Same rows, in the same order, as the whole-table read.
    products, log, labels = read_catalog(chunked_cfg.catalog.db_url)
    expected = resolve_image_uris(products, demo_db.parent)
    got = pd.read_parquet(snap.products)
    assert got["product_id"].tolist() == expected["product_id"].tolist()
    assert got["image_uri"].tolist() == expected["image_uri"].tolist()
    assert counts["n_products"] == 480 and counts["n_search_log"] == len(log) == count_rows(snap.search_log)
    assert counts["n_human_labels"] == len(labels) and counts["chunk_rows"] == CHUNK


def test_a_streamed_sample_keeps_the_same_products_as_the_in_memory_sample(chunked_cfg, tmp_path):
    cfg = chunked_cfg.with_overrides(**{"catalog.sample_size": 100})
    extract_snapshot(cfg, cfg.catalog.db_url, tmp_path)
    products = read_catalog(cfg.catalog.db_url)[0]
    expected = sample_products(products, 100, cfg.catalog.seed)
    snap = Snapshot(tmp_path)
    assert pd.read_parquet(snap.products)["product_id"].tolist() == expected["product_id"].tolist()
    kept = set(expected["product_id"])
    assert set(pd.read_parquet(snap.search_log)["product_id"]) <= kept
    left_out = set(products["product_id"]) - kept
    assert not set(pd.read_parquet(snap.human_labels)["product_id"]) & left_out


def test_a_table_missing_a_column_is_named_even_when_streamed(tmp_path):
    db = tmp_path / "bad.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE products (product_id TEXT, title TEXT)")
    with pytest.raises(ValueError, match="table 'products' lacks column"):
        next(iter_table(f"sqlite:///{db}", "products", 10))


def test_the_gate_validates_partition_by_partition_and_matches_the_whole_frame_gate(chunked_cfg, demo_db, tmp_path, monkeypatch):
    products = resolve_image_uris(read_catalog(chunked_cfg.catalog.db_url)[0], demo_db.parent)
    # Faults spread over partitions: a duplicate id whose two copies sit in different partitions, a blank category.
    products.loc[400, "product_id"] = products.loc[3, "product_id"]
    products.loc[200, "category"] = " "
    with PartWriter(tmp_path / "products.parquet") as writer:
        for start in range(0, len(products), CHUNK):
            writer.write(products.iloc[start:start + CHUNK])
    batches: list[int] = []
    real = catalog_gate.validate_catalog

    def counting(batch, *args, **kwargs):
        batches.append(len(batch))
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(catalog_gate, "validate_catalog", counting)
    out = tmp_path / "gate"
    result = validate_catalog_parts(tmp_path / "products.parquet", chunked_cfg.validation, out, CHUNK)
    monkeypatch.undo()
    assert max(batches) <= CHUNK and len(batches) == result.n_partitions == -(-480 // CHUNK)

    whole = validate_catalog(products, chunked_cfg.validation)
    files = CatalogGate(out)
    assert pd.read_parquet(files.clean)["product_id"].tolist() == whole.clean["product_id"].tolist()
    quarantine = pd.read_parquet(files.quarantine)
    assert quarantine["row"].tolist() == whole.quarantine["row"].tolist()  # positions in the snapshot, not the batch
    assert quarantine["reason"].tolist() == whole.quarantine["reason"].tolist()
    dup = quarantine.loc[quarantine["product_id"] == products.loc[3, "product_id"], "row"].tolist()
    assert dup == [3, 400]  # both copies, though no single batch held both
    assert result.summary["n_bad"] == whole.summary["n_bad"] and result.passed == whole.passed
    merged = {f["check"]: f["unexpected_count"] for f in result.summary["failing_expectations"]}
    assert merged == {f["check"]: f["unexpected_count"] for f in whole.summary["failing_expectations"]}
    assert result.clean_ids.tolist() == whole.clean["product_id"].tolist()


def test_parts_keep_one_schema_when_a_chunk_is_all_null(tmp_path):
    with PartWriter(tmp_path / "t.parquet") as writer:
        writer.write(pd.DataFrame({"id": ["a", "b"], "title": [None, None]}))
        writer.write(pd.DataFrame({"id": ["c"], "title": ["granola"]}))
        writer.write(pd.DataFrame({"id": ["d"], "title": [None]}))
    table = pd.read_parquet(tmp_path / "t.parquet")
    assert table["title"].tolist()[2] == "granola" and table["id"].tolist() == ["a", "b", "c", "d"]
    assert [len(f) for f in iter_frames(tmp_path / "t.parquet", 2)] == [2, 1, 1]
