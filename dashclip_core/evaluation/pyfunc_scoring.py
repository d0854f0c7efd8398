"""Scoring a registered model through its MLflow pyfunc, on this run's eval set: the promotion check.

The champion is scored with the same functions as the report scores the challenger in process
(:func:`~.photos.photo_metrics`, :func:`~.metrics.evaluate_rankings`), so the two numbers compare.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dashclip_core.config import PipelineConfig
from dashclip_core.evaluation.metrics import evaluate_rankings
from dashclip_core.evaluation.photos import PHOTO_METRIC_PREFIXES, held_out_photos, photo_metrics
from dashclip_core.evaluation.ranking import RunningTopK
from dashclip_core.storage.images import ImagePolicy


def _embeddings(predicted: pd.DataFrame) -> np.ndarray:
    """The pyfunc's ``embedding`` column as a (rows, D) float32 matrix."""
    return np.asarray(predicted["embedding"].tolist(), np.float32)


PRODUCT_CHUNK = 256  # product rows per predict call: bounds the inline image bytes held at once


def _accepts_inline_images(model) -> bool:
    """Whether the model's signature declares ``image_b64`` (models registered before it had only ``image_path``,
    and MLflow drops undeclared columns). A model object without metadata is this code's own pyfunc class."""
    metadata = getattr(model, "metadata", None)
    schema = metadata.get_input_schema() if metadata is not None else None
    return schema is None or "image_b64" in schema.input_names()


def predict_products(model, products: pd.DataFrame, images=None) -> pd.DataFrame:
    """``model.predict`` on product rows (``product_id``, ``title``, ``description``, ``image_uri``), in chunks.

    Photos go inline (``image_b64``, read here under ``images``, the run's
    :class:`~dashclip_core.storage.images.ImagePolicy` with its S3 endpoint; None = the trusted-input policy,
    for clean, gate-checked rows on boto3's default endpoint), because a served model refuses local paths outside its operator's roots; a model registered
    before ``image_b64`` existed gets ``image_path``, which it reads itself.
    """
    import base64

    from dashclip_core.storage.images import TRUSTED_INPUT, read_image_bytes

    images = images if images is not None else TRUSTED_INPUT
    inline = _accepts_inline_images(model)
    parts = []
    for start in range(0, len(products), PRODUCT_CHUNK):
        chunk = products.iloc[start : start + PRODUCT_CHUNK]
        frame = pd.DataFrame({"product_id": chunk["product_id"].to_numpy(), "title": chunk["title"].to_numpy(),
                              "description": chunk["description"].to_numpy()})
        uris = [u if isinstance(u, str) and u else None for u in chunk["image_uri"]]
        if inline:
            frame["image_b64"] = [None if u is None else base64.b64encode(read_image_bytes(u, images)).decode("ascii")
                                  for u in uris]
        else:
            frame["image_path"] = uris
        parts.append(model.predict(frame))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"product_id": [], "embedding": []})


def photo_metrics_via_pyfunc(model, cfg: PipelineConfig, products) -> dict:
    """Zero-shot and text -> image metrics of a loaded pyfunc on this run's held-out photos
    (image-only products against class-name queries), as :func:`~.photos.photo_metrics` defines them.
    ``products``: the clean catalog, a frame or a parquet path (read in ``catalog.chunk_rows`` chunks).

    Raises:
        ValueError: the run has no held-out photos.
    """
    photos, classes = held_out_photos(products, cfg)
    if photos.empty:
        raise ValueError("no held-out photos to score zero-shot / text -> image metrics on")
    prod_in = pd.DataFrame({"product_id": photos["product_id"].to_numpy(), "title": None, "description": None,
                            "image_uri": photos["image_uri"].to_numpy()})
    image_emb = _embeddings(predict_products(model, prod_in, ImagePolicy.for_pipeline(cfg)))  # (N, D)

    def embed_text(texts: list[str]) -> np.ndarray:
        return _embeddings(model.predict(pd.DataFrame({"query_id": texts, "query": texts})))

    return photo_metrics(image_emb, embed_text, photos, classes, cfg.evaluation.ks)[1]


def score_model_uri(model_uri: str, cfg: PipelineConfig, products, judgments: pd.DataFrame, metric: str) -> float:
    """Score a registered model (e.g. the current champion) on this run's eval set, through its pyfunc.

    ``metric`` is a catalog-search metric of the eval queries (``ndcg@10``, ...) or, for catalogs whose
    value is in the photos (``registry.promotion_metric: zero_shot_fine_top1`` / ``t2i_ndcg@10``), one
    computed on the held-out photos. ``products``: the clean catalog, a frame or a parquet path; it is embedded
    and ranked ``catalog.chunk_rows`` products at a time (a running top-k per query), never held whole."""
    import mlflow

    from dashclip_core.storage.partitions import frame_chunks

    model = mlflow.pyfunc.load_model(model_uri)
    if metric.startswith(PHOTO_METRIC_PREFIXES):
        return float(photo_metrics_via_pyfunc(model, cfg, products)[metric])
    queries = sorted(judgments["query"].unique())
    q_emb = _embeddings(model.predict(pd.DataFrame({"query_id": queries, "query": queries})))
    top = RunningTopK(len(queries), max(cfg.evaluation.ks))
    images = ImagePolicy.for_pipeline(cfg)
    offset = 0
    for chunk in frame_chunks(products, cfg.catalog.chunk_rows, columns=["product_id", "title", "description", "image_uri"]):
        if len(chunk):
            p = predict_products(model, chunk, images)
            top.add(q_emb @ _embeddings(p).T, offset, p["product_id"].to_numpy(object))
            offset += len(chunk)
    m = evaluate_rankings(dict(zip(queries, top.ranked_ids())), judgments, ks=cfg.evaluation.ks,
                          min_relevant_label=cfg.evaluation.min_relevant_label)
    return float(m[metric])
