"""Exact top-k in bounded memory: blockwise ranking equals one full stable sort, ties included."""

from __future__ import annotations

import numpy as np
import pytest

from dashclip_core.evaluation.ranking import rank_by_embeddings


def full_sort(query_emb, product_emb, ids, k):
    """The reference: the whole (Q, N) score matrix, stable sort (lowest position wins a tie)."""
    scores = query_emb @ product_emb.T
    return [[ids[i] for i in row] for row in np.argsort(-scores, axis=1, kind="stable")[:, : min(k, len(ids))]]


@pytest.mark.parametrize(("query_block", "product_block"), [(1, 1), (3, 7), (5, 64), (256, 65_536)])
@pytest.mark.parametrize("k", [1, 4, 10, 200])
def test_blocks_give_the_full_sorts_answer_with_ties(query_block, product_block, k):
    rng = np.random.default_rng(0)
    # Small integer vectors: every dot product is exact in float32, and many products tie on purpose.
    products = rng.integers(-2, 3, (120, 6)).astype(np.float32)
    products[40:60] = products[0]  # 21 identical products spread over several blocks
    queries = rng.integers(-2, 3, (11, 6)).astype(np.float32)
    queries[0] = products[0]
    ids = [f"p{i:03d}" for i in range(len(products))]

    got = rank_by_embeddings(queries, products, ids, k, query_block=query_block, product_block=product_block)

    assert got == full_sort(queries, products, ids, k)


def test_a_memory_mapped_catalog_is_read_block_by_block(tmp_path):
    rng = np.random.default_rng(1)
    products = rng.standard_normal((1000, 8)).astype(np.float32)
    np.save(tmp_path / "emb.npy", products)
    mapped = np.load(tmp_path / "emb.npy", mmap_mode="r")
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    ids = [str(i) for i in range(1000)]

    assert rank_by_embeddings(queries, mapped, ids, 10, product_block=128) == full_sort(queries, products, ids, 10)
    assert rank_by_embeddings(queries, products[:0], [], 10) == [[], [], [], []]


def test_a_running_top_k_over_streamed_chunks_with_their_own_ids_equals_the_full_sort():
    """score_model_uri embeds a catalog chunk by chunk and never holds its id list: the blocks bring their ids."""
    from dashclip_core.evaluation.ranking import RunningTopK

    rng = np.random.default_rng(2)
    products = rng.integers(-2, 3, (97, 5)).astype(np.float32)
    products[50:70] = products[3]  # ties across chunks
    queries = np.concatenate([products[[3]], rng.integers(-2, 3, (6, 5)).astype(np.float32)])
    ids = [f"p{i:03d}" for i in range(len(products))]
    top = RunningTopK(len(queries), 10)
    for start in range(0, len(products), 13):
        top.add(queries @ products[start:start + 13].T, start, ids[start:start + 13])
    top.add(queries @ products[:0].T, len(products), [])  # an empty chunk changes nothing
    assert top.ranked_ids() == full_sort(queries, products, ids, 10)
