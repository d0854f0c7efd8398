"""Held-out photos: zero-shot classification and text -> image retrieval from image-only embeddings.

A held-out photo is a product with an image whose title and description are hidden, so only the
image speaks. Class names (``category`` = fine, ``aisle`` = coarse), typed as a shopper would, are the
text side. :func:`photo_metrics` is the one place these figures are computed: the evaluation report
calls it with the encoders in process, the promotion check (:mod:`.pyfunc_scoring`) with a registered
model's pyfunc, so the champion and the challenger are always scored the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from dashclip_core.config import PipelineConfig
from dashclip_core.evaluation.categories import hash_test_split
from dashclip_core.evaluation.text_to_image import text_to_image_metrics

ZERO_SHOT_LEVELS = (("category", "fine"), ("aisle", "coarse"))  # catalog column, name in the report
PHOTO_METRIC_PREFIXES = ("zero_shot_", "t2i_")  # keys of photo_metrics: computed on the held-out photos, not the eval queries
PREDICTION_COLUMNS = ["product_id"] + [f"{name}_{kind}" for _, name in ZERO_SHOT_LEVELS for kind in ("true", "pred")]


def zero_shot_mask(products: pd.DataFrame, cfg: PipelineConfig) -> np.ndarray:
    """Which rows are photos for zero-shot classification: the held-out products (``train.holdout_product_regex``),
    else the 20% hash test split (:func:`~.categories.hash_test_split`); only products with an image. Row by row,
    so a catalog read in chunks gives the same set."""
    if cfg.train.holdout_product_regex:
        mask = products["product_id"].astype(str).str.match(cfg.train.holdout_product_regex).to_numpy()
    else:
        mask = hash_test_split(products["product_id"])
    return mask & products["image_uri"].notna().to_numpy()


def zero_shot_products(products: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
    """The rows :func:`zero_shot_mask` selects, in snapshot order."""
    return products[zero_shot_mask(products, cfg)]


def held_out_photos(table, cfg: PipelineConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the zero-shot photos, the catalog's classes) of a catalog given as a frame or a parquet path, read
    ``catalog.chunk_rows`` rows at a time: memory is the photos and the classes, never the catalog.

    The classes frame holds each distinct (``category``, ``aisle``) pair in order of first appearance, which is all
    :func:`photo_metrics` reads of its ``catalog`` (the class names of each level, a fine class's first coarse class).
    """
    from dashclip_core.storage.partitions import frame_chunks

    photos, classes = [], []
    for chunk in frame_chunks(table, cfg.catalog.chunk_rows, columns=["product_id", "category", "aisle", "image_uri"]):
        photos.append(chunk[zero_shot_mask(chunk, cfg)])
        classes.append(chunk[["category", "aisle"]].drop_duplicates())
    return (pd.concat(photos, ignore_index=True),
            pd.concat(classes, ignore_index=True).drop_duplicates().reset_index(drop=True))


def class_prompt(name: str) -> str:
    """A class name as a shopper would type it ("Golden-Delicious" -> "golden delicious")."""
    return name.replace("-", " ").replace("_", " ").strip().lower()


def class_names(catalog: pd.DataFrame, column: str) -> list[str]:
    """Every value of ``column`` in the catalog, sorted: the classes of one level."""
    return sorted(set(catalog[column].astype(str)))


def photo_metrics(image_emb: np.ndarray, embed_text: Callable[[list[str]], np.ndarray], photos: pd.DataFrame,
                  catalog: pd.DataFrame, ks: Sequence[int]) -> tuple[pd.DataFrame, dict]:
    """Zero-shot top-1 accuracy and text -> image NDCG / Recall of the held-out photos.

    Steps, per level (fine = ``category``, coarse = ``aisle``; classes = every value in ``catalog``):
      (1) embed each class name as a query (:func:`class_prompt`): ``class_emb`` (C, D);
      (2) score every (class, photo) pair: ``s = class_emb @ image_emb.T`` (C, N), cosine for unit vectors;
      (3) zero-shot: each photo is assigned its highest-scoring class (the CLIP protocol with queries as
          prompts, Radford et al. 2021, arXiv 2103.00020, Sec. 3.1.2); top-1 = share assigned its own class;
      (4) fine level only: each class prompt ranks the photos by ``s`` (:func:`~.text_to_image.text_to_image_metrics`).

    Args:
        image_emb: (N, D) image-only embeddings of ``photos``, row for row.
        embed_text: texts -> (len(texts), D) query embeddings of the same model.
        photos: held-out photos (:func:`zero_shot_products`) with ``product_id``, ``category``, ``aisle``.
        catalog: the snapshot, which defines the classes.
        ks: NDCG / Recall cut-offs of step (4).

    Returns:
        (per-photo predictions: ``product_id``, ``fine_true``, ``fine_pred``, ``coarse_true``, ``coarse_pred``;
        metrics: ``zero_shot_n_photos``, ``zero_shot_{fine,coarse}_top1``, ``zero_shot_{fine,coarse}_classes``
        and the ``t2i_*`` figures). Without photos: an empty frame with these columns and {}.
    """
    if photos.empty:
        return pd.DataFrame(columns=PREDICTION_COLUMNS), {}
    predictions = pd.DataFrame({"product_id": photos["product_id"].to_numpy()})
    metrics: dict = {"zero_shot_n_photos": len(photos)}
    fine_scores = None
    for col, name in ZERO_SHOT_LEVELS:
        classes = class_names(catalog, col)
        scores = embed_text([class_prompt(c) for c in classes]) @ image_emb.T  # Steps (1) and (2): (C, N)
        predictions[f"{name}_true"] = photos[col].astype(str).to_numpy()
        predictions[f"{name}_pred"] = np.asarray(classes)[np.argmax(scores, axis=0)]  # Step (3)
        metrics[f"zero_shot_{name}_top1"] = float((predictions[f"{name}_pred"] == predictions[f"{name}_true"]).mean())
        metrics[f"zero_shot_{name}_classes"] = len(classes)
        if name == "fine":
            fine_scores = scores
    fine = class_names(catalog, "category")
    metrics.update(text_to_image_metrics(fine_scores, fine, [class_prompt(c) for c in fine], photos, catalog, ks))  # Step (4)
    return predictions[PREDICTION_COLUMNS], metrics
