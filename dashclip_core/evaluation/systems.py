"""The systems the report compares, one function each, all scored on the same :class:`EvalContext`.

- ``dashclip`` (:func:`dashclip_system`): the trained encoders, ranking by query . product embedding only
  (what the FAISS index serves), plus the embedding-only figures: aisle / category accuracy,
  zero-shot and text -> image on the held-out photos.
- ``dashclip_itm_rerank`` (:func:`itm_rerank_system`): its ANN top ``rerank_k`` re-ranked by the ITM
  head (:mod:`.rerank`), so the second stage is measured apart from ANN.
- ``untrained_encoders`` (:func:`untrained_system`): the same architecture at initialisation.
- ``image_backbone_linear_probe`` (:func:`linear_probe_system`): a supervised probe on the frozen backbone.
- ``bm25_titles`` (:func:`bm25_system`): BM25 over product titles (:mod:`dashclip_core.baselines.bm25`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dashclip_core.baselines.bm25 import BM25Index
from dashclip_core.config import PipelineConfig
from dashclip_core.evaluation.categories import category_metrics
from dashclip_core.evaluation.metrics import evaluate_rankings
from dashclip_core.evaluation.photos import class_names, class_prompt, photo_metrics
from dashclip_core.evaluation.ranking import ann_rankings, image_only_recall
from dashclip_core.evaluation.text_to_image import text_to_image_metrics
from dashclip_core.evaluation.untrained import PooledImageFeatures, linear_probe, untrained_encoders

if TYPE_CHECKING:  # torch-backed types, imported only by the functions that run the models
    from dashclip_core.models.encoders import ProductEncoder, QueryEncoder
    from dashclip_core.models.image_stem import StemStore
    from dashclip_core.models.inputs import InputBuilder


@dataclass(frozen=True)
class EvalContext:
    """What every system is scored on.

    Attributes:
        cfg: resolved config (``evaluation.ks``, ``evaluation.min_relevant_label``, the model config).
        products: the validated snapshot (``product_id``, ``title``, ``description``, ``image_uri``, ``aisle``, ``category``).
        judgments: the eval judgments (``query``, ``product_id``, ``label``), one per pair.
        queries: the judged eval queries, sorted.
        image_only: ids of the products with an image and neither title nor description.
        photos: the held-out photos (:func:`~.photos.zero_shot_products`).
        builder: the :class:`~dashclip_core.models.inputs.InputBuilder` of ``cfg.model``.
        stem_store: the run's frozen image stem (``models/image_stem.StemStore``), or None.
    """

    cfg: PipelineConfig
    products: pd.DataFrame
    judgments: pd.DataFrame
    queries: list[str]
    image_only: frozenset[str]
    photos: pd.DataFrame
    builder: InputBuilder
    stem_store: StemStore | None = None

    @property
    def depth(self) -> int:
        """The deepest metric cut-off: how many products a system must rank per query."""
        return max(self.cfg.evaluation.ks)

    def ranking_metrics(self, rankings: dict[str, list[str]]) -> dict:
        """NDCG@k / Recall@k (:func:`~.metrics.evaluate_rankings`) and image-only recall at the deepest cut-off."""
        ev = self.cfg.evaluation
        m = evaluate_rankings(rankings, self.judgments, ks=ev.ks, min_relevant_label=ev.min_relevant_label)
        m[f"image_only_recall@{self.depth}"] = image_only_recall(rankings, self.judgments, self.image_only, self.depth)
        return m


@dataclass(frozen=True)
class TrainedModel:
    """The trained encoders and the rankings the index would serve.

    Attributes:
        product_encoder / query_encoder: the loaded encoders (eval mode).
        product_emb: (N, D) product embeddings in snapshot order.
        ann: query -> its nearest products by embedding, as deep as the deepest cut-off or the re-ranker's k.
    """

    product_encoder: ProductEncoder
    query_encoder: QueryEncoder
    product_emb: np.ndarray
    ann: dict[str, list[str]]


@dataclass(frozen=True)
class UntrainedModel:
    """The same architecture at initialisation, with its backbone features and embeddings computed once.

    Attributes:
        product_encoder / query_encoder: :func:`~.untrained.untrained_encoders`.
        pooled: the image backbone's pooled output of every product with an image (also the probe's input).
        product_emb: (N, D) product embeddings in snapshot order.
        image_emb: (N, D) image-only embeddings (zero rows for products without an image).
    """

    product_encoder: ProductEncoder
    query_encoder: QueryEncoder
    pooled: PooledImageFeatures
    product_emb: np.ndarray
    image_emb: np.ndarray


def trained_model(ctx: EvalContext, product_emb: np.ndarray, query_encoder_dir: Path, product_encoder_dir: Path, depth: int) -> TrainedModel:
    """Load the trained encoders and rank the snapshot for every eval query (exact search, ``depth`` deep)."""
    from dashclip_core.models.encoders import load_product_encoder, load_query_encoder
    from dashclip_core.models.inputs import embed_queries

    query_encoder, product_encoder = load_query_encoder(query_encoder_dir), load_product_encoder(product_encoder_dir)
    query_emb = embed_queries(query_encoder, ctx.builder, ctx.queries)  # (Q, D)
    return TrainedModel(product_encoder, query_encoder, product_emb, ann_rankings(ctx.queries, query_emb, ctx.products, product_emb, depth))


def untrained_model(ctx: EvalContext) -> UntrainedModel:
    """Build the untrained encoders and embed the snapshot from one pass of the image backbone."""
    from dashclip_core.models.image_stem import embeddings_from_pooled

    p_enc, q_enc = untrained_encoders(ctx.cfg)
    pooled = PooledImageFeatures(p_enc, ctx.cfg, ctx.products, ctx.stem_store)  # serves the untrained system and the probe
    with_image = ctx.products.loc[ctx.products["image_uri"].notna(), "product_id"]
    product_emb, image_emb = embeddings_from_pooled(p_enc, ctx.builder, ctx.products, pooled.of(with_image))
    return UntrainedModel(p_enc, q_enc, pooled, product_emb, image_emb)


def trained_photo_embeddings(ctx: EvalContext, product_encoder: ProductEncoder) -> np.ndarray:
    """Image-only embeddings (N_photos, D) of the held-out photos by the trained product encoder."""
    from dashclip_core.models.image_stem import embeddings_from_pooled
    from dashclip_core.models.inputs import embed_products

    bare = ctx.photos.assign(title=None, description=None)  # the held-out photos as image-only products
    if ctx.stem_store is not None and ctx.stem_store.covers(ctx.photos["product_id"]):  # the frozen stem is shared: run the trained tail only
        pooled = ctx.stem_store.pooled(product_encoder.image_tower, ctx.photos["product_id"])
        return embeddings_from_pooled(product_encoder, ctx.builder, bare, pooled)[0]
    return embed_products(product_encoder, ctx.builder, bare)


def dashclip_system(ctx: EvalContext, model: TrainedModel) -> tuple[dict, pd.DataFrame]:
    """``dashclip``: ANN ranking metrics, aisle / category accuracy, zero-shot and text -> image.

    Returns:
        (metrics, per-photo zero-shot predictions (:func:`~.photos.photo_metrics`)).
    """
    from dashclip_core.models.inputs import embed_queries

    predictions, photo = photo_metrics(trained_photo_embeddings(ctx, model.product_encoder),
                                       lambda texts: embed_queries(model.query_encoder, ctx.builder, texts),
                                       ctx.photos, ctx.products, ctx.cfg.evaluation.ks)
    return {**ctx.ranking_metrics(model.ann), **category_metrics(ctx.products, model.product_emb), **photo}, predictions


def itm_rerank_system(ctx: EvalContext, model: TrainedModel, rerank_k: int) -> tuple[dict, dict[str, list[str]]]:
    """``dashclip_itm_rerank``: the ANN top ``rerank_k`` re-ranked by the ITM head; ranking metrics and re-rank stats.

    Returns:
        (metrics, query -> re-ranked product ids).
    """
    from dashclip_core.evaluation.rerank import itm_rerank

    reranked, stats = itm_rerank(model.product_encoder, ctx.builder, ctx.queries, [model.ann[q] for q in ctx.queries],
                                 ctx.products, k=rerank_k, stem_store=ctx.stem_store)
    rankings = dict(zip(ctx.queries, reranked))
    return {**ctx.ranking_metrics(rankings), **stats}, rankings


def untrained_system(ctx: EvalContext, model: UntrainedModel) -> dict:
    """``untrained_encoders``: the figures of ``dashclip`` for the architecture at initialisation."""
    from dashclip_core.models.inputs import embed_queries

    query_emb = embed_queries(model.query_encoder, ctx.builder, ctx.queries)  # (Q, D)
    rankings = ann_rankings(ctx.queries, query_emb, ctx.products, model.product_emb, ctx.depth)
    is_photo = ctx.products["product_id"].isin(set(ctx.photos["product_id"])).to_numpy()  # photos keep snapshot order
    _, photo = photo_metrics(model.image_emb[is_photo], lambda texts: embed_queries(model.query_encoder, ctx.builder, texts),
                             ctx.photos, ctx.products, ctx.cfg.evaluation.ks)
    return {**ctx.ranking_metrics(rankings), **category_metrics(ctx.products, model.product_emb), **photo}


def linear_probe_system(ctx: EvalContext, model: UntrainedModel) -> dict:
    """``image_backbone_linear_probe``: probe top-1 (fine, coarse) and text -> image ranked by the probe's log-probabilities."""
    metrics, fine_log_probs = linear_probe(model.pooled, ctx.products, ctx.photos, ctx.cfg.train.seed)
    if fine_log_probs is None:
        return metrics
    fine = class_names(ctx.products, "category")
    t2i = text_to_image_metrics(fine_log_probs.T, fine, [class_prompt(c) for c in fine], ctx.photos, ctx.products, ctx.cfg.evaluation.ks)
    return {**metrics, **t2i}


def bm25_system(ctx: EvalContext) -> dict:
    """``bm25_titles``: BM25 over product titles (no description, no image); ranking metrics."""
    titles = [t if isinstance(t, str) else None for t in ctx.products["title"]]
    index = BM25Index(titles, ctx.products["product_id"].tolist())
    return ctx.ranking_metrics(dict(zip(ctx.queries, index.rank_many(ctx.queries, ctx.depth))))
