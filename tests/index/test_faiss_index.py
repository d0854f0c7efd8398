"""Tests for the FAISS product index: exactness, ANN recall, persistence, input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dashclip_core.config import IndexConfig
from dashclip_core.index.faiss_index import ProductIndex, build_index, recall_at_k_vs_exact

DIM = 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, list[str], np.ndarray]:
    """2000 unit vectors around 40 centres (ANN recall is only meaningful on clustered data) + 100 queries."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, DIM))
    points = unit(centres[rng.integers(0, 40, 2000)] + 0.3 * rng.standard_normal((2000, DIM)))
    queries = unit(centres[rng.integers(0, 40, 100)] + 0.3 * rng.standard_normal((100, DIM)))
    return points, [f"p{i:05d}" for i in range(2000)], queries


def test_flat_is_exact(clustered) -> None:
    points, ids, queries = clustered
    index = build_index(points, ids, IndexConfig(factory="Flat"))

    assert recall_at_k_vs_exact(index, points, queries, k=10) == 1.0
    scores, found = index.search(points[:5], k=3)
    assert scores.shape == (5, 3)
    assert [row[0] for row in found] == ids[:5]  # each vector is its own nearest neighbour
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first


def test_hnsw_recall_on_clustered_data(clustered) -> None:
    points, ids, queries = clustered
    index = build_index(points, ids, IndexConfig(factory="HNSW32", ef_search=64))

    assert recall_at_k_vs_exact(index, points, queries, k=10) >= 0.9


def test_exact_recall_does_not_depend_on_the_block_size(clustered) -> None:
    """The exact top-k is merged across blocks: blocks smaller than k or not dividing N give one search's answer."""
    points, ids, queries = clustered
    index = build_index(points, ids, IndexConfig(factory="HNSW32", ef_search=16))

    whole = recall_at_k_vs_exact(index, points, queries, k=10, block_rows=len(points))
    assert [recall_at_k_vs_exact(index, points, queries, k=10, block_rows=b) for b in (7, 333)] == [whole, whole]


def test_ivf_nprobe_is_applied_and_capped_at_nlist(clustered) -> None:
    points, ids, queries = clustered
    index = build_index(points, ids, IndexConfig(factory="IVF8,Flat", nprobe=16))

    import faiss

    assert faiss.extract_index_ivf(index.index).nprobe == 8  # all lists probed: exhaustive
    assert recall_at_k_vs_exact(index, points, queries, k=10) == 1.0


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF8,Flat"])
def test_save_load_round_trip_gives_identical_search(clustered, tmp_path: Path, factory: str) -> None:
    points, ids, queries = clustered
    cfg = IndexConfig(factory=factory, nprobe=4, ef_search=40)
    index = build_index(points, ids, cfg)
    scores, found = index.search(queries, k=10)

    index.save(tmp_path / "index")
    loaded = ProductIndex.load(tmp_path / "index")
    loaded_scores, loaded_found = loaded.search(queries, k=10)

    np.testing.assert_array_equal(loaded_scores, scores)
    assert loaded_found == found
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    assert meta["factory"] == factory and meta["dim"] == DIM and meta["ntotal"] == 2000
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["ids.parquet", "index.faiss", "meta.json"]


def test_k_larger_than_catalog_returns_every_product() -> None:
    points = unit(np.random.default_rng(1).standard_normal((3, DIM)))
    index = build_index(points, ["a", "b", "c"], IndexConfig())

    scores, found = index.search(points[:1], k=10)

    assert scores.shape == (1, 3) and sorted(found[0]) == ["a", "b", "c"]


def test_input_errors(clustered, tmp_path: Path) -> None:
    points, ids, queries = clustered
    cfg = IndexConfig()
    with pytest.raises(ValueError, match="empty"):
        build_index(np.zeros((0, DIM), np.float32), [], cfg)
    with pytest.raises(ValueError, match="3 product_ids for 2000 embeddings"):
        build_index(points, ids[:3], cfg)
    with pytest.raises(ValueError, match="not unique"):
        build_index(points, ["same"] * len(points), cfg)
    bad = points.copy()
    bad[17, 3] = np.nan
    with pytest.raises(ValueError, match="first at row 17"):
        build_index(bad, ids, cfg)
    with pytest.raises(ValueError, match="not a valid faiss index_factory"):
        build_index(points, ids, IndexConfig(factory="NoSuchIndex"))
    with pytest.raises(ValueError, match="IDMap"):
        build_index(points, ids, IndexConfig(factory="IDMap,Flat"))
    with pytest.raises(ValueError, match="training on 20 vectors failed"):
        build_index(points[:20], ids[:20], IndexConfig(factory="IVF64,Flat"))

    index = build_index(points, ids, cfg)
    with pytest.raises(ValueError, match="dimension 16 does not match the index dimension 32"):
        index.search(queries[:, :16], k=5)
    with pytest.raises(ValueError, match="2-D"):
        index.search(queries[0], k=5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(queries, k=0)
    with pytest.raises(ValueError, match="100 embeddings but the index holds 2000"):
        recall_at_k_vs_exact(index, points[:100], queries)
    with pytest.raises(FileNotFoundError, match="index.faiss"):
        ProductIndex.load(tmp_path)


def test_auto_is_exact_up_to_the_flat_limit_and_ann_above(clustered) -> None:
    from dashclip_core.index.faiss_index import resolve_factory

    points, ids, _ = clustered
    cfg = IndexConfig(factory="auto", flat_max_products=2000, ann_factory="HNSW32")
    assert resolve_factory(cfg, 2000) == "Flat" and resolve_factory(cfg, 2001) == "HNSW32"
    assert build_index(points, ids, cfg).factory == "Flat"
    ann = build_index(points, ids, IndexConfig(factory="auto", flat_max_products=1999, ann_factory="HNSW32"))
    assert ann.factory == "HNSW32" and "HNSW" in type(ann.index).__name__
    assert resolve_factory(IndexConfig(factory="IVF8,Flat"), 10) == "IVF8,Flat"  # an explicit string is kept


def test_ivf_trains_on_a_bounded_sample_and_adds_in_chunks(clustered, monkeypatch) -> None:
    import faiss

    points, ids, queries = clustered
    trained_on, added = [], []
    real_train, real_add = faiss.IndexIVFFlat.train, faiss.IndexIVFFlat.add
    monkeypatch.setattr(faiss.IndexIVFFlat, "train", lambda self, x: (trained_on.append(len(x)), real_train(self, x))[1])
    monkeypatch.setattr(faiss.IndexIVFFlat, "add", lambda self, x: (added.append(len(x)), real_add(self, x))[1])

    index = build_index(points, ids, IndexConfig(factory="IVF8,Flat", train_sample=500, add_chunk=600))

    assert trained_on == [500]
    assert added == [600, 600, 600, 200] and index.ntotal == 2000
    assert recall_at_k_vs_exact(index, points, queries, k=10) == 1.0  # nprobe 16 >= nlist: exhaustive, same answers
    same = build_index(points, ids, IndexConfig(factory="IVF8,Flat", train_sample=500, add_chunk=600))
    centroids = [faiss.extract_index_ivf(i.index).quantizer.reconstruct_n(0, 8) for i in (index, same)]
    np.testing.assert_array_equal(*centroids)  # a seeded sample: the same catalog trains the same index


def test_index_from_a_partitioned_table_in_chunks_equals_the_in_memory_build(clustered, tmp_path: Path, monkeypatch) -> None:
    """IVF trained on the same seeded sample and filled chunk by chunk from parts: same search answers and the same
    recall as the build from the whole matrix; no block read above chunk_rows."""
    import pandas as pd

    from dashclip_core.index.faiss_index import build_index_from_table, recall_at_k_vs_exact_table
    from dashclip_core.storage import partitions
    from dashclip_core.storage.partitions import PartWriter

    points, ids, queries = clustered
    writer = PartWriter(tmp_path / "embeddings.parquet")
    for start in range(0, len(ids), 700):
        writer.write(pd.DataFrame({"product_id": ids[start:start + 700], "embedding": list(points[start:start + 700])}))
    writer.close()
    blocks = []
    original = partitions.list_matrix
    monkeypatch.setattr(partitions, "list_matrix", lambda column: blocks.append(len(column)) or original(column))
    cfg = IndexConfig(factory="IVF64,Flat", nprobe=1, train_sample=1300)

    from_table = build_index_from_table(tmp_path / "embeddings.parquet", cfg, chunk_rows=300)
    in_memory = build_index(points, ids, cfg)

    assert max(blocks) <= 300 and from_table.ntotal == len(ids) and from_table.product_ids == ids
    scores_t, found_t = from_table.search(queries, 10)
    scores_m, found_m = in_memory.search(queries, 10)
    assert found_t == found_m
    np.testing.assert_allclose(scores_t, scores_m, atol=1e-6)
    recall = recall_at_k_vs_exact_table(from_table, tmp_path / "embeddings.parquet", queries, k=10, chunk_rows=300)
    assert recall == recall_at_k_vs_exact(in_memory, points, queries, k=10) < 1.0  # nprobe 1 of 64 misses some
    flat = build_index_from_table(tmp_path / "embeddings.parquet", IndexConfig(factory="Flat"), chunk_rows=300)
    assert recall_at_k_vs_exact_table(flat, tmp_path / "embeddings.parquet", queries, k=10, chunk_rows=300) == 1.0
