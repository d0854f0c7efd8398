"""Evaluation report: the trained encoders vs BM25 over titles, the untrained encoders and a linear probe.

On the held-out human-judged queries (split 'eval', never seen by the teacher or stage 2):
NDCG@10 and Recall@10/50 over the whole snapshot (unjudged products count as irrelevant), recall
of image-only relevant products, and aisle/category prediction accuracy from product embeddings
(nearest class centroid, products split 80/20 by a hash of their id); on the held-out photos,
zero-shot accuracy and text -> image retrieval.

Steps of :func:`run_evaluation`: (1) gather what every system is scored on (:class:`~.systems.EvalContext`);
(2) load the trained encoders and their ANN rankings; (3) score each system (:mod:`.systems`, one
function per system); (4) add sample queries. Per-photo zero-shot predictions and the rankings are
returned beside the report (:class:`EvaluationOutputs`), never inside it: the report's numbers go
to MLflow metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dashclip_core.config import PipelineConfig
from dashclip_core.evaluation.photos import zero_shot_products
from dashclip_core.evaluation.ranking import rank_by_embeddings
from dashclip_core.evaluation.rerank import DEFAULT_RERANK_K
from dashclip_core.evaluation.systems import (
    EvalContext,
    TrainedModel,
    bm25_system,
    dashclip_system,
    itm_rerank_system,
    linear_probe_system,
    trained_model,
    untrained_model,
    untrained_system,
)

SAMPLE_TOP = 5  # products listed per sample query


def eval_judgments(labels: pd.DataFrame) -> pd.DataFrame:
    """The held-out human judgments (split 'eval', source 'human'), one label per (query, product_id)."""
    j = labels[(labels["split"] == "eval") & (labels["source"] == "human")]
    # Several annotators may judge one pair: use the rounded mean grade.
    return j.groupby(["query", "product_id"], as_index=False)["label"].mean().assign(label=lambda d: d["label"].round().astype(int))


def trained_query_embeddings(query_encoder_dir: Path, cfg: PipelineConfig, queries: list[str]) -> np.ndarray:
    """(Q, D) embeddings of ``queries`` by the saved trained query encoder."""
    from dashclip_core.models.encoders import load_query_encoder
    from dashclip_core.models.inputs import InputBuilder, embed_queries

    return embed_queries(load_query_encoder(query_encoder_dir), InputBuilder(cfg.model), queries)  # text only: no image policy needed


@dataclass
class EvaluationOutputs:
    """What one evaluation produces.

    Attributes:
        report: the JSON-able report (``systems`` -> metric -> number, sample queries); small enough for MLflow.
        zero_shot: per-photo zero-shot predictions of the trained model (see :func:`~.photos.photo_metrics`).
        rankings: system -> query -> ranked product ids, for ``dashclip`` (ANN) and ``dashclip_itm_rerank``.
        judgments: the eval judgments the rankings were scored on (query, product_id, label).
    """

    report: dict
    zero_shot: pd.DataFrame
    rankings: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    judgments: pd.DataFrame = field(default_factory=pd.DataFrame)


def eval_context(cfg: PipelineConfig, products: pd.DataFrame, labels: pd.DataFrame, stem_store=None) -> EvalContext:
    """Step (1): the judgments, queries, image-only products and held-out photos every system is scored on.

    Raises:
        ValueError: there are no held-out human labels.
    """
    from dashclip_core.models.inputs import InputBuilder
    from dashclip_core.storage.images import ImagePolicy

    judgments = eval_judgments(labels)
    queries = sorted(judgments["query"].unique())
    if not queries:
        raise ValueError("no held-out human labels (split 'eval'): nothing to evaluate on")
    image_only = products.loc[products["title"].isna() & products["description"].isna() & products["image_uri"].notna(), "product_id"]
    return EvalContext(cfg, products, judgments, queries, frozenset(image_only), zero_shot_products(products, cfg),
                       InputBuilder(cfg.model, images=ImagePolicy.for_pipeline(cfg)), stem_store)  # the run's roots, not any path


def run_evaluation(cfg: PipelineConfig, products: pd.DataFrame, labels: pd.DataFrame, product_ids: list[str], product_emb: np.ndarray,
                   query_encoder_dir: Path, product_encoder_dir: Path, sample_queries: list[str] | None = None,
                   rerank_k: int = DEFAULT_RERANK_K, stem_store=None) -> EvaluationOutputs:
    """Score the trained encoders (ANN-only and ITM re-ranked) and the baselines on the held-out queries.

    Args:
        cfg: resolved config (``evaluation.ks``, the model config of the untrained baseline).
        products: the validated snapshot (``product_id``, ``title``, ``description``, ``image_uri``, ``aisle``, ``category``).
        labels: the run's labels; the eval split's human labels are the judgments.
        product_ids / product_emb: the trained model's product embeddings (N, D), any row order.
        query_encoder_dir / product_encoder_dir: the saved trained encoders.
        sample_queries: queries whose top-5 go into the report (default: the first 3 eval queries).
        rerank_k: ANN candidates per query that the ITM head re-ranks.
        stem_store: the run's frozen image stem (``models/image_stem.StemStore``), if stage 1 left one:
            held-out photo embeddings and the baselines' backbone features then run the tower's tail only.

    Raises:
        ValueError: embeddings lack snapshot products, or there are no held-out human labels.
    """
    product_emb = _align(products, product_ids, product_emb)
    ctx = eval_context(cfg, products, labels, stem_store)  # Step (1)
    trained = trained_model(ctx, product_emb, query_encoder_dir, product_encoder_dir, depth=max(ctx.depth, rerank_k))  # Step (2)
    # Step (3), one function per system; the untrained model (seeded by build_stage1) and its one backbone pass serve two.
    dashclip, zero_shot = dashclip_system(ctx, trained)
    rerank, reranked = itm_rerank_system(ctx, trained, rerank_k)
    untrained = untrained_model(ctx)
    systems = {
        "dashclip": dashclip,
        "dashclip_itm_rerank": rerank,
        "untrained_encoders": untrained_system(ctx, untrained),
        "image_backbone_linear_probe": linear_probe_system(ctx, untrained),
        "bm25_titles": bm25_system(ctx),
    }
    report = {
        "n_eval_queries": len(ctx.queries),
        "n_products": len(products),
        "n_image_only_products": len(ctx.image_only),
        "systems": systems,
        "sample_queries": sample_results(ctx, trained, sample_queries or ctx.queries[:3]),  # Step (4)
    }
    return EvaluationOutputs(report, zero_shot, {"dashclip": trained.ann, "dashclip_itm_rerank": reranked}, ctx.judgments)


def sample_results(ctx: EvalContext, trained: TrainedModel, queries: list[str]) -> dict[str, list[dict]]:
    """Step (4): query -> its top products by the trained embeddings (id, title, category), for reading the report."""
    from dashclip_core.models.inputs import embed_queries

    top = rank_by_embeddings(embed_queries(trained.query_encoder, ctx.builder, queries), trained.product_emb,
                             ctx.products["product_id"].tolist(), SAMPLE_TOP)
    by_id = ctx.products.set_index("product_id")
    return {
        q: [{"product_id": p, "title": _str(by_id.at[p, "title"]), "category": _str(by_id.at[p, "category"])} for p in ids]
        for q, ids in zip(queries, top)
    }


def _align(products: pd.DataFrame, product_ids: list[str], product_emb: np.ndarray) -> np.ndarray:
    """Embedding rows in the snapshot's product order."""
    if list(products["product_id"]) == list(product_ids):
        return product_emb
    order = {p: i for i, p in enumerate(product_ids)}
    missing = set(products["product_id"]) - set(order)
    if missing:
        raise ValueError(f"embeddings lack {len(missing)} snapshot products, e.g. {sorted(missing)[:5]}")
    return product_emb[[order[p] for p in products["product_id"]]]


def _str(v) -> str | None:
    return v if isinstance(v, str) else None
