"""Ranking and embedding metrics for offline evaluation.

Definitions (graded labels 0 = irrelevant, 1 = moderately, 2 = highly relevant):

- ``DCG@k = sum_{i=1..k} (2^rel_i - 1) / log2(i + 1)`` over the ranked list (position i is
  1-based); unjudged products have rel 0. ``IDCG@k`` is the DCG of the query's judged labels sorted
  best first, so products the ranker never returned still count. ``nDCG@k = DCG@k / IDCG@k``
  (Järvelin & Kekäläinen 2002, with the exponential gain of Burges et al. 2005).
- ``recall@k = |top-k ∩ relevant| / |relevant|`` with relevant = label >= ``min_relevant_label``.
  With more than k relevant products, recall@k cannot reach 1.
- A query with no relevant product has no defined recall or nDCG: the functions return None and
  :func:`evaluate_rankings` leaves it out of the means.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)


def _dedupe(ranked_ids: Iterable[str]) -> list[str]:
    """Keep the first occurrence of each id, so a repeated product is never counted twice."""
    return list(dict.fromkeys(ranked_ids))


def ndcg_at_k(ranked_ids: Sequence[str], gains: Mapping[str, int], k: int) -> float | None:
    """nDCG@k with gain ``2^rel - 1`` and a ``log2`` discount.

    Args:
        ranked_ids: product ids, best first (a repeated id counts only at its first position).
        gains: judged label per product id for this query; ids not in it have label 0.
        k: cut-off (>= 1).

    Returns:
        nDCG@k in [0, 1], or None when no judged product has a positive label (IDCG = 0).

    Raises:
        ValueError: ``k < 1`` or a negative label.
    """
    if k < 1:
        raise ValueError(f"ndcg_at_k: k must be >= 1, got {k}")
    if any(g < 0 for g in gains.values()):
        raise ValueError(f"ndcg_at_k: labels must be >= 0, got {sorted(set(gains.values()))}")
    ideal = sorted(gains.values(), reverse=True)[:k]
    idcg = sum((2.0**rel - 1.0) / math.log2(i + 2) for i, rel in enumerate(ideal))
    if idcg == 0.0:
        return None
    dcg = sum((2.0 ** gains.get(pid, 0) - 1.0) / math.log2(i + 2) for i, pid in enumerate(_dedupe(ranked_ids)[:k]))
    return dcg / idcg


def recall_at_k(ranked_ids: Sequence[str], relevant: set[str], k: int) -> float | None:
    """Share of the relevant products found in the top k.

    Args:
        ranked_ids: product ids, best first.
        relevant: ids of the relevant products for this query.
        k: cut-off (>= 1).

    Returns:
        ``|top-k ∩ relevant| / |relevant|``, or None when ``relevant`` is empty.

    Raises:
        ValueError: ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"recall_at_k: k must be >= 1, got {k}")
    if not relevant:
        return None
    return len(set(_dedupe(ranked_ids)[:k]) & set(relevant)) / len(relevant)


def evaluate_rankings(
    rankings: Mapping[str, Sequence[str]],
    judgments: pd.DataFrame,
    ks: Sequence[int] = (10, 50),
    min_relevant_label: int = 1,
) -> dict[str, Any]:
    """Mean nDCG@k and recall@k over the judged queries that have at least one relevant product.

    Args:
        rankings: ranked product ids per query (best first). A judged query without an entry is
            scored as an empty ranking (0) and counted in ``n_queries_without_ranking``.
        judgments: columns ``query``, ``product_id``, ``label``. A pair judged more than once (several
            annotators) takes its highest label.
        ks: cut-offs; one ``ndcg@k`` and one ``recall@k`` per value.
        min_relevant_label: labels >= this count as relevant (recall, and which queries are kept).

    Returns:
        ``{"ndcg@k": float, "recall@k": float (for each k), "n_queries": int,
        "n_queries_skipped": int (judged queries with no relevant product),
        "n_queries_without_ranking": int}``.

    Raises:
        ValueError: a required column is missing, ``ks`` is empty or has a value < 1, or no judged
            query has a relevant product.
    """
    missing = [c for c in ("query", "product_id", "label") if c not in judgments.columns]
    if missing:
        raise ValueError(f"judgments frame: missing column(s) {missing}; found {list(judgments.columns)}")
    if not ks or min(ks) < 1:
        raise ValueError(f"evaluate_rankings: ks must be a non-empty list of cut-offs >= 1, got {ks}")
    best = judgments.groupby(["query", "product_id"], sort=True)["label"].max().astype(int)

    per_k: dict[str, list[float]] = {f"{m}@{k}": [] for k in ks for m in ("ndcg", "recall")}
    n_skipped = n_without = 0
    for query, labels in best.groupby(level="query", sort=True):
        gains = dict(zip(labels.index.get_level_values("product_id"), labels.to_numpy()))
        relevant = {pid for pid, g in gains.items() if g >= min_relevant_label}
        if not relevant:
            n_skipped += 1
            continue
        if query not in rankings:
            n_without += 1
        ranked = list(rankings.get(query, []))
        for k in ks:
            ndcg = ndcg_at_k(ranked, gains, k)
            # ndcg is None only when every gain is 0, possible only with min_relevant_label <= 0: score it 0.
            per_k[f"ndcg@{k}"].append(0.0 if ndcg is None else ndcg)
            per_k[f"recall@{k}"].append(recall_at_k(ranked, relevant, k))
    n_queries = len(per_k[f"recall@{ks[0]}"])
    if n_queries == 0:
        raise ValueError(
            f"evaluate_rankings: none of the {n_skipped} judged queries has a product with label >= "
            f"{min_relevant_label}; nothing to evaluate (check the eval split of the labels)"
        )
    if n_without:
        logger.warning("evaluate_rankings: %d of %d evaluated queries have no ranking (scored 0)", n_without, n_queries)
    result: dict[str, Any] = {name: float(np.mean(values)) for name, values in per_k.items()}
    result.update(n_queries=n_queries, n_queries_skipped=n_skipped, n_queries_without_ranking=n_without)
    return result


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def category_accuracy(
    train_emb: np.ndarray,
    train_labels: Sequence[Any],
    test_emb: np.ndarray,
    test_labels: Sequence[Any],
) -> float:
    """Nearest-class-centroid accuracy under cosine similarity.

    Steps: (1) L2-normalise the train embeddings; (2) average them per class and L2-normalise each
    centroid; (3) assign each L2-normalised test embedding to the centroid of highest cosine
    similarity; (4) accuracy = share of test rows whose assigned class equals their label. A test
    label that never occurs in train is always counted wrong.

    Args:
        train_emb: (N, D) embeddings that define the centroids.
        train_labels: N class labels.
        test_emb: (M, D) embeddings to classify.
        test_labels: M class labels.

    Returns:
        Accuracy in [0, 1].

    Raises:
        ValueError: empty inputs, label counts that differ from the row counts, or different D.
    """
    train_emb = np.asarray(train_emb, dtype=np.float64)
    test_emb = np.asarray(test_emb, dtype=np.float64)
    if train_emb.ndim != 2 or test_emb.ndim != 2 or train_emb.shape[1] != test_emb.shape[1]:
        raise ValueError(
            f"category_accuracy: need (N, D) and (M, D) arrays, got {train_emb.shape} and {test_emb.shape}"
        )
    if len(train_emb) == 0 or len(test_emb) == 0:
        raise ValueError(f"category_accuracy: empty input (train {len(train_emb)} rows, test {len(test_emb)} rows)")
    if len(train_labels) != len(train_emb) or len(test_labels) != len(test_emb):
        raise ValueError(
            f"category_accuracy: {len(train_labels)} train labels for {len(train_emb)} rows, "
            f"{len(test_labels)} test labels for {len(test_emb)} rows"
        )
    # Step 1 and 2
    classes, codes = np.unique(np.asarray(train_labels, dtype=object).astype(str), return_inverse=True)
    sums = np.zeros((len(classes), train_emb.shape[1]))  # (C, D)
    np.add.at(sums, codes, _l2_normalise(train_emb))
    centroids = _l2_normalise(sums)  # (C, D)
    # Step 3
    predicted = classes[np.argmax(_l2_normalise(test_emb) @ centroids.T, axis=1)]  # (M,)
    # Step 4
    return float(np.mean(predicted == np.asarray(test_labels, dtype=object).astype(str)))
