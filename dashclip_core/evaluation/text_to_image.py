"""Text -> image retrieval over held-out photos, with graded relevance from the class taxonomy.

Each fine class name, typed as a query ("granny smith"), ranks the held-out photos (image-only: no title
or description helps). A photo of that fine class is highly relevant (2), a photo of another fine class
of the same coarse class moderately relevant (1), anything else irrelevant (0). NDCG@k and Recall@k are
the same functions as for catalog search (``metrics.evaluate_rankings``).

Any system that scores (class, photo) pairs can be compared: the query encoder against image
embeddings (cosine), or a supervised classifier's log-probability of the class (the linear probe).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from dashclip_core.evaluation.metrics import evaluate_rankings


def taxonomy_judgments(classes: Sequence[str], prompts: Sequence[str], photos: pd.DataFrame, coarse_of: dict[str, str]) -> pd.DataFrame:
    """(query, product_id, label) for every class prompt and every photo with label > 0.

    Args:
        classes: fine class names (``category`` values); ``prompts[i]`` is the query text of ``classes[i]``.
        photos: held-out photos with ``product_id``, ``category`` (fine) and ``aisle`` (coarse).
        coarse_of: fine class -> its coarse class.
    """
    fine = photos["category"].astype(str).to_numpy()
    coarse = photos["aisle"].astype(str).to_numpy()
    ids = photos["product_id"].to_numpy()
    frames = []
    for c, q in zip(classes, prompts):
        label = np.where(fine == c, 2, np.where(coarse == coarse_of[c], 1, 0))
        keep = label > 0
        frames.append(pd.DataFrame({"query": q, "product_id": ids[keep], "label": label[keep]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["query", "product_id", "label"])


def text_to_image_metrics(scores: np.ndarray, classes: Sequence[str], prompts: Sequence[str], photos: pd.DataFrame,
                          catalog: pd.DataFrame, ks: Sequence[int] = (10, 50)) -> dict:
    """NDCG@k / Recall@k of ranking ``photos`` for each class prompt by ``scores`` (C, N), higher = better.

    Only classes with at least one photo of their own (grade 2) are asked: a query with nothing highly
    relevant would measure the coarse siblings only. Recall counts grade 2 (the photo *is* the product).

    Returns:
        ``{"t2i_ndcg@k", "t2i_recall@k" for each k, "t2i_n_queries"}``; {} when no class has a photo.
    """
    if scores.shape != (len(classes), len(photos)):
        raise ValueError(f"scores shape {scores.shape} does not match {len(classes)} classes x {len(photos)} photos")
    present = set(photos["category"].astype(str))
    asked = [i for i, c in enumerate(classes) if c in present]
    if not asked:
        return {}
    coarse_of = catalog.groupby(catalog["category"].astype(str))["aisle"].first().astype(str).to_dict()
    ids = photos["product_id"].tolist()
    depth = min(max(ks), len(ids))
    top = np.argsort(-scores[asked], axis=1, kind="stable")[:, :depth]  # (Q, depth)
    rankings = {prompts[i]: [ids[j] for j in row] for i, row in zip(asked, top)}
    judgments = taxonomy_judgments([classes[i] for i in asked], [prompts[i] for i in asked], photos, coarse_of)
    m = evaluate_rankings(rankings, judgments, ks=ks, min_relevant_label=2)
    out = {f"t2i_{k}": float(v) for k, v in m.items() if k.startswith(("ndcg@", "recall@"))}
    out["t2i_n_queries"] = int(m["n_queries"])
    return out
