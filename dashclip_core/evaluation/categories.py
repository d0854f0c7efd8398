"""Aisle and category prediction from product embeddings, on a fixed 80/20 split of the products."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from dashclip_core.evaluation.metrics import category_accuracy


def hash_test_split(product_ids: pd.Series) -> np.ndarray:
    """True for the ~20% test products: the first 8 hex digits of sha256(product_id), mod 5, equal 0.

    Why a hash: the split is the same in every run and for every model, whatever the row order.
    """
    return np.array([int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) % 5 == 0 for p in product_ids])


def category_metrics(products: pd.DataFrame, emb: np.ndarray) -> dict[str, float]:
    """``aisle_accuracy`` and ``category_accuracy``: nearest class centroid (:func:`~.metrics.category_accuracy`),
    centroids from the train products' embeddings, scored on the test products'.

    Args:
        products: snapshot rows with ``product_id``, ``aisle``, ``category``.
        emb: (N, D) product embeddings in the same row order.
    """
    test = hash_test_split(products["product_id"])
    out = {}
    for col in ("aisle", "category"):
        y = products[col].astype(str).to_numpy()
        out[f"{col}_accuracy"] = category_accuracy(emb[~test], y[~test], emb[test], y[test])
    return out
