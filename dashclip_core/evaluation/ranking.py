"""Ranking products by embedding: exact inner-product search, as the FAISS index approximates it."""

from __future__ import annotations

import numpy as np
import pandas as pd

QUERY_BLOCK = 256  # queries scored at once
PRODUCT_BLOCK = 65_536  # products scored at once: a (256, 65536) float32 block is 64 MiB at any catalog size


class RunningTopK:
    """Each query's ``k`` best products over blocks of scores seen one at a time, ties broken by position.

    Within a block, ``argpartition`` finds each query's k-th best score ``t``; every product scoring ``>= t`` is a
    candidate (all tied products, so ties still go to the lowest position), merged with the running list by
    (score descending, position ascending): the same answer as one stable sort of all scores, in O(block + Q * k)
    memory. A block's product ids ride along, so a caller streaming a catalog never holds its id list.
    """

    def __init__(self, n_queries: int, k: int) -> None:
        self.k = k
        self.scores = [np.empty(0, np.float64) for _ in range(n_queries)]
        self.positions = [np.empty(0, np.int64) for _ in range(n_queries)]
        self.product_ids = [np.empty(0, object) for _ in range(n_queries)]

    def add(self, scores: np.ndarray, offset: int, product_ids) -> None:
        """``scores`` (Q, c): every query against products ``offset .. offset + c - 1`` (ids ``product_ids``)."""
        c = scores.shape[1]
        if c == 0 or self.k < 1:
            return
        ids = np.asarray(product_ids, dtype=object)
        kk = min(self.k, c)
        kth = np.partition(scores, c - kk, axis=1)[:, c - kk]  # (Q,) k-th best per query
        for r in range(len(scores)):
            cand = np.flatnonzero(scores[r] >= kth[r])  # >= k positions: the block's top-k and all ties with it
            s = np.concatenate([self.scores[r], scores[r, cand]])
            pos = np.concatenate([self.positions[r], cand + offset])
            pid = np.concatenate([self.product_ids[r], ids[cand]])
            order = np.lexsort((pos, -s))[: self.k]  # score descending, then position ascending
            self.scores[r], self.positions[r], self.product_ids[r] = s[order], pos[order], pid[order]

    def ranked_ids(self) -> list[list[str]]:
        return [row.tolist() for row in self.product_ids]


def rank_by_embeddings(query_emb: np.ndarray, product_emb: np.ndarray, product_ids: list[str], k: int,
                       query_block: int = QUERY_BLOCK, product_block: int = PRODUCT_BLOCK) -> list[list[str]]:
    """Exact inner-product top-k (unit vectors: cosine), ties broken by position, in bounded memory.

    Scores one (``query_block``, ``product_block``) block at a time into a :class:`RunningTopK`, so memory is
    O(block + Q * k), not O(Q * N): a 1M-product catalog never materialises a (Q, N) matrix.

    Args:
        query_emb: (Q, D) query embeddings.
        product_emb: (N, D) product embeddings (an array or a memory map); row i is ``product_ids[i]``.
        product_ids: N ids.
        k: ids per query (at most N are returned).

    Returns:
        Q lists of product ids, best first.
    """
    n = product_emb.shape[0]
    out: list[list[str]] = []
    for q0 in range(0, len(query_emb), query_block):
        queries = np.asarray(query_emb[q0 : q0 + query_block])  # (q, D)
        top = RunningTopK(len(queries), min(k, n))
        for p0 in range(0, n, product_block):
            top.add(queries @ np.asarray(product_emb[p0 : p0 + product_block]).T, p0, product_ids[p0 : p0 + product_block])
        out.extend(top.ranked_ids())
    return out


def ann_rankings(queries: list[str], query_emb: np.ndarray, products: pd.DataFrame, product_emb: np.ndarray, depth: int) -> dict[str, list[str]]:
    """query -> its ``depth`` nearest products by embedding (exact search, as the index approximates)."""
    return dict(zip(queries, rank_by_embeddings(query_emb, product_emb, products["product_id"].tolist(), depth)))


def image_only_recall(rankings: dict[str, list[str]], judgments: pd.DataFrame, image_only: set[str] | frozenset[str], k: int) -> float | None:
    """Share of the relevant image-only products (no title, no description) found in the top-k.

    Pooled over queries: ``sum_q |top-k(q) ∩ R_q| / sum_q |R_q|`` with R_q the image-only products of
    label >= 1 for q (a query without a ranking finds none). None when no image-only product is relevant.
    """
    rel = judgments[(judgments["label"] >= 1) & judgments["product_id"].isin(image_only)]
    if rel.empty:
        return None
    hits = sum(p in set(rankings[q][:k]) for q, p in zip(rel["query"], rel["product_id"]) if q in rankings)
    return hits / len(rel)
