"""Scoring a registered model through its MLflow pyfunc, on this run's eval set: the promotion check.

The champion is scored with the same functions as the report scores the challenger in process
(:func:`~.photos.photo_metrics`, :func:`~.metrics.evaluate_rankings`), so the two numbers compare.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dashclip_core.config import PipelineConfig
from dashclip_core.evaluation.metrics import evaluate_rankings
from dashclip_core.evaluation.photos import PHOTO_METRIC_PREFIXES, photo_metrics, zero_shot_products
from dashclip_core.evaluation.ranking import rank_by_embeddings


def _embeddings(predicted: pd.DataFrame) -> np.ndarray:
    """The pyfunc's ``embedding`` column as a (rows, D) float32 matrix."""
    return np.asarray(predicted["embedding"].tolist(), np.float32)


def photo_metrics_via_pyfunc(model, cfg: PipelineConfig, products: pd.DataFrame) -> dict:
    """Zero-shot and text -> image metrics of a loaded pyfunc on this run's held-out photos
    (image-only products against class-name queries), as :func:`~.photos.photo_metrics` defines them.

    Raises:
        ValueError: the run has no held-out photos.
    """
    photos = zero_shot_products(products, cfg)
    if photos.empty:
        raise ValueError("no held-out photos to score zero-shot / text -> image metrics on")
    prod_in = pd.DataFrame({"product_id": photos["product_id"].to_numpy(), "title": None, "description": None,
                            "image_path": photos["image_uri"].to_numpy()})
    image_emb = _embeddings(model.predict(prod_in))  # (N, D)

    def embed_text(texts: list[str]) -> np.ndarray:
        return _embeddings(model.predict(pd.DataFrame({"query_id": texts, "query": texts})))

    return photo_metrics(image_emb, embed_text, photos, products, cfg.evaluation.ks)[1]


def score_model_uri(model_uri: str, cfg: PipelineConfig, products: pd.DataFrame, judgments: pd.DataFrame, metric: str) -> float:
    """Score a registered model (e.g. the current champion) on this run's eval set, through its pyfunc.

    ``metric`` is a catalog-search metric of the eval queries (``ndcg@10``, ...) or, for catalogs whose
    value is in the photos (``registry.promotion_metric: zero_shot_fine_top1`` / ``t2i_ndcg@10``), one
    computed on the held-out photos."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    if metric.startswith(PHOTO_METRIC_PREFIXES):
        return float(photo_metrics_via_pyfunc(model, cfg, products)[metric])
    queries = sorted(judgments["query"].unique())
    prod_in = products[["product_id", "title", "description", "image_uri"]].rename(columns={"image_uri": "image_path"})
    p = model.predict(prod_in)
    q_emb = _embeddings(model.predict(pd.DataFrame({"query_id": queries, "query": queries})))
    rankings = dict(zip(queries, rank_by_embeddings(q_emb, _embeddings(p), p["product_id"].tolist(), max(cfg.evaluation.ks))))
    m = evaluate_rankings(rankings, judgments, ks=cfg.evaluation.ks, min_relevant_label=cfg.evaluation.min_relevant_label)
    return float(m[metric])
