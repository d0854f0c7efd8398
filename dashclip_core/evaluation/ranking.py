"""Ranking products by embedding: exact inner-product search, as the FAISS index approximates it."""

from __future__ import annotations

import numpy as np
import pandas as pd


def rank_by_embeddings(query_emb: np.ndarray, product_emb: np.ndarray, product_ids: list[str], k: int) -> list[list[str]]:
    """Exact inner-product top-k (unit vectors: cosine), ties broken by position.

    Args:
        query_emb: (Q, D) query embeddings.
        product_emb: (N, D) product embeddings; row i is ``product_ids[i]``.
        product_ids: N ids.
        k: ids per query (at most N are returned).

    Returns:
        Q lists of product ids, best first.
    """
    scores = query_emb @ product_emb.T  # (Q, N)
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, k)
    return [[product_ids[i] for i in row] for row in top]


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
