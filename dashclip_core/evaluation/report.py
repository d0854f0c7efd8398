"""Evaluation report: the trained encoders vs BM25 over titles and vs the untrained encoders.

On the held-out human-judged queries (split 'eval', never seen by the teacher or stage 2):
NDCG@10 and Recall@10/50 over the whole snapshot (unjudged products count as irrelevant), recall
of image-only relevant products, and aisle/category prediction accuracy from product embeddings
(nearest class centroid, products split 80/20 by a hash of their id).

Systems: ``dashclip`` ranks by query . product embedding only (what the FAISS index serves);
``dashclip_itm_rerank`` re-ranks its top ``rerank_k`` with the ITM head (:mod:`.rerank`), so the
second stage is measured apart from ANN. Zero-shot and category figures are embedding-only and
appear under ``dashclip``. Per-photo zero-shot predictions and the rankings are returned beside the
report (:class:`EvaluationOutputs`), never inside it: the report's numbers go to MLflow metrics.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dashclip_core.config import PipelineConfig
from dashclip_core.baselines.bm25 import BM25Index
from dashclip_core.evaluation.metrics import category_accuracy, evaluate_rankings
from dashclip_core.evaluation.rerank import DEFAULT_RERANK_K
from dashclip_core.evaluation.text_to_image import text_to_image_metrics
from dashclip_core.models.image_stem import embeddings_from_pooled

logger = logging.getLogger(__name__)


def eval_judgments(labels: pd.DataFrame) -> pd.DataFrame:
    j = labels[(labels["split"] == "eval") & (labels["source"] == "human")]
    # Several annotators may judge one pair: use the rounded mean grade.
    return j.groupby(["query", "product_id"], as_index=False)["label"].mean().assign(label=lambda d: d["label"].round().astype(int))


def rank_by_embeddings(query_emb: np.ndarray, product_emb: np.ndarray, product_ids: list[str], k: int) -> list[list[str]]:
    """Exact inner-product top-k (unit vectors: cosine), ties broken by position."""
    scores = query_emb @ product_emb.T  # (Q, N)
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[product_ids[i] for i in row] for row in top]


def image_only_recall(rankings: dict[str, list[str]], judgments: pd.DataFrame, image_only: set[str], k: int) -> float | None:
    """Share of relevant image-only products (no title, no description) found in the top-k."""
    rel = judgments[(judgments["label"] >= 1) & judgments["product_id"].isin(image_only)]
    if rel.empty:
        return None
    hits = sum(p in set(rankings[q][:k]) for q, p in zip(rel["query"], rel["product_id"]) if q in rankings)
    return hits / len(rel)


def _split(product_ids: pd.Series) -> np.ndarray:
    return np.array([int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) % 5 == 0 for p in product_ids])  # True = test


def classification(products: pd.DataFrame, emb: np.ndarray) -> dict[str, float]:
    test = _split(products["product_id"])
    out = {}
    for col in ("aisle", "category"):
        y = products[col].astype(str).to_numpy()
        out[f"{col}_accuracy"] = category_accuracy(emb[~test], y[~test], emb[test], y[test])
    return out


def image_backbone_features(product_encoder, cfg: PipelineConfig, products: pd.DataFrame, batch_size: int = 64) -> np.ndarray:
    """Pooled features of the (untrained, ImageNet-pretrained) image tower, before any projection."""
    import torch

    from dashclip_core.models.towers import load_pixels

    backbone = "blip" if cfg.model.blip_checkpoint else cfg.model.image.backbone
    out = []
    for start in range(0, len(products), batch_size):
        paths = products["image_uri"].iloc[start : start + batch_size]
        pixels = torch.from_numpy(np.stack([load_pixels(p, cfg.model.image.image_size, backbone)[0] for p in paths]))
        with torch.no_grad():
            out.append(product_encoder.image_tower.eval()(pixels)[1].float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class PooledImageFeatures:
    """The untrained image tower's pooled output for every product with an image, computed once.

    Why: the untrained-encoder baseline, its zero-shot figures and the linear probe all need exactly this
    (the pretrained backbone before any projection); one pass over the photos instead of three keeps the
    evaluate step affordable on a CPU with a large catalog. With the run's frozen-stem store
    (``models/image_stem.py``) only the tower's tail runs.
    """

    def __init__(self, encoder, cfg: PipelineConfig, products: pd.DataFrame, stem_store=None) -> None:
        with_image = products[products["image_uri"].notna()]
        self.row = {p: i for i, p in enumerate(with_image["product_id"])}
        if stem_store is not None and stem_store.covers(with_image["product_id"]):
            self.features = stem_store.pooled(encoder.image_tower, with_image["product_id"])
        else:
            self.features = image_backbone_features(encoder, cfg, with_image)  # (N_image, C)

    def of(self, product_ids) -> np.ndarray:
        return self.features[[self.row[p] for p in product_ids]]


def linear_probe(product_encoder, cfg: PipelineConfig, products: pd.DataFrame, photos: pd.DataFrame,
                 pooled: PooledImageFeatures | None = None, fine_scores: dict | None = None) -> dict:
    """Baseline: softmax regression on frozen image-backbone features, fit on the training products'
    photos (never the held-out ones), scored top-1 on the held-out photos (fine and coarse).
    ``pooled``: the backbone features, when already computed. ``fine_scores``: when given, receives
    ``classes`` and ``log_probs`` (photos x fine classes), for text -> image ranking by the probe."""
    from dashclip_core.baselines.softmax_regression import SoftmaxRegression

    train = products[products["image_uri"].notna() & ~products["product_id"].isin(set(photos["product_id"]))]
    if photos.empty or train.empty:
        return {}
    if pooled is not None:
        x_train, x_test = pooled.of(train["product_id"]), pooled.of(photos["product_id"])
    else:
        x_train, x_test = image_backbone_features(product_encoder, cfg, train), image_backbone_features(product_encoder, cfg, photos)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # standardise: the probe's L2 then treats features alike
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    out = {}
    for col, name in (("category", "fine"), ("aisle", "coarse")):
        classes = sorted(set(products[col].astype(str)))
        index = {c: i for i, c in enumerate(classes)}
        y = train[col].astype(str).map(index).to_numpy()
        probe = SoftmaxRegression(x_train.shape[1], l2=1e-3, seed=cfg.train.seed, n_classes=len(classes)).fit(x_train.astype(np.float32), y, steps=300)
        pred = probe.predict(x_test.astype(np.float32))
        out[f"probe_{name}_top1"] = float((pred == photos[col].astype(str).map(index).to_numpy()).mean())
        if name == "fine" and fine_scores is not None:
            import torch

            with torch.no_grad():
                fine_scores["log_probs"] = torch.log_softmax(probe.linear(torch.from_numpy(x_test.astype(np.float32))), dim=1).numpy()
            fine_scores["classes"] = classes
    return out


def ranking_metrics(rankings: dict[str, list[str]], judgments: pd.DataFrame, cfg: PipelineConfig, image_only: set[str]) -> dict:
    m = evaluate_rankings(rankings, judgments, ks=cfg.evaluation.ks, min_relevant_label=cfg.evaluation.min_relevant_label)
    m[f"image_only_recall@{max(cfg.evaluation.ks)}"] = image_only_recall(rankings, judgments, image_only, max(cfg.evaluation.ks))
    return m


def ann_rankings(queries: list[str], query_emb: np.ndarray, products: pd.DataFrame, product_emb: np.ndarray, depth: int) -> dict[str, list[str]]:
    """query -> its ``depth`` nearest products by embedding (exact search, as the index approximates)."""
    return dict(zip(queries, rank_by_embeddings(query_emb, product_emb, products["product_id"].tolist(), depth)))


def embedding_system(products: pd.DataFrame, rankings: dict[str, list[str]], product_emb: np.ndarray, judgments, cfg, image_only) -> dict:
    return {**ranking_metrics(rankings, judgments, cfg, image_only), **classification(products, product_emb)}


def untrained_encoders(cfg: PipelineConfig):
    """The same architecture at initialisation (pretrained towers, untrained projections and fusion)."""
    from dashclip_core.models.encoders import QueryEncoder
    from dashclip_core.training.stage1 import build_stage1

    encoder = build_stage1(cfg).encoder.eval()
    return encoder, QueryEncoder.from_product_encoder(encoder, 0).eval()


def zero_shot_products(products: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
    """Photos for zero-shot classification: the held-out products (``train.holdout_product_regex``),
    else the 20% hash test split; only products with an image."""
    if cfg.train.holdout_product_regex:
        mask = products["product_id"].astype(str).str.match(cfg.train.holdout_product_regex).to_numpy()
    else:
        mask = _split(products["product_id"])
    return products[mask & products["image_uri"].notna().to_numpy()]


def class_prompt(name: str) -> str:
    """A class name as a shopper would type it ("Golden-Delicious" -> "golden delicious")."""
    return name.replace("-", " ").replace("_", " ").strip().lower()


ZERO_SHOT_LEVELS = (("category", "fine"), ("aisle", "coarse"))  # catalog column, name in the report


def zero_shot_predictions(product_encoder, query_encoder, cfg: PipelineConfig, photos: pd.DataFrame, catalog: pd.DataFrame,
                          image_emb: np.ndarray | None = None) -> pd.DataFrame:
    """Per-photo zero-shot predictions: each image-only product embedding is assigned the class whose
    name, embedded as a query, is nearest (the CLIP zero-shot protocol with queries as prompts).
    Classes are every ``category`` (fine) / ``aisle`` (coarse) value in ``catalog``.

    Returns:
        One row per photo: ``product_id``, ``fine_true``, ``fine_pred``, ``coarse_true``, ``coarse_pred``
        (empty frame with these columns when there are no photos).
    """
    from dashclip_core.models.inputs import InputBuilder, embed_products, embed_queries

    columns = ["product_id"] + [f"{name}_{kind}" for _, name in ZERO_SHOT_LEVELS for kind in ("true", "pred")]
    if photos.empty:
        return pd.DataFrame(columns=columns)
    builder = InputBuilder(cfg.model)
    if image_emb is None:  # the photos' image-only embeddings, unless the caller has them
        image_emb = embed_products(product_encoder, builder, photos.assign(title=None, description=None))  # (N, D)
    out = pd.DataFrame({"product_id": photos["product_id"].to_numpy()})
    for col, name in ZERO_SHOT_LEVELS:
        classes = sorted(set(catalog[col].astype(str)))
        class_emb = embed_queries(query_encoder, builder, [class_prompt(c) for c in classes])  # (C, D)
        out[f"{name}_true"] = photos[col].astype(str).to_numpy()
        out[f"{name}_pred"] = np.asarray(classes)[np.argmax(image_emb @ class_emb.T, axis=1)]
    return out[columns]


def zero_shot_metrics(predictions: pd.DataFrame, catalog: pd.DataFrame) -> dict:
    """Top-1 accuracy (fine and coarse) of :func:`zero_shot_predictions`, with the photo and class counts."""
    if predictions.empty:
        return {}
    out: dict = {"zero_shot_n_photos": len(predictions)}
    for col, name in ZERO_SHOT_LEVELS:
        out[f"zero_shot_{name}_top1"] = float((predictions[f"{name}_pred"] == predictions[f"{name}_true"]).mean())
        out[f"zero_shot_{name}_classes"] = int(catalog[col].astype(str).nunique())
    return out


def zero_shot_accuracy(product_encoder, query_encoder, cfg: PipelineConfig, photos: pd.DataFrame, catalog: pd.DataFrame) -> dict:
    """Top-1 zero-shot accuracy (see :func:`zero_shot_predictions`); {} without photos."""
    return zero_shot_metrics(zero_shot_predictions(product_encoder, query_encoder, cfg, photos, catalog), catalog)


def trained_query_embeddings(query_encoder_dir: Path, cfg: PipelineConfig, queries: list[str]) -> np.ndarray:
    from dashclip_core.models.encoders import load_query_encoder
    from dashclip_core.models.inputs import InputBuilder, embed_queries

    return embed_queries(load_query_encoder(query_encoder_dir), InputBuilder(cfg.model), queries)


@dataclass
class EvaluationOutputs:
    """What one evaluation produces.

    Attributes:
        report: the JSON-able report (``systems`` -> metric -> number, sample queries); small enough for MLflow.
        zero_shot: per-photo zero-shot predictions of the trained model (see :func:`zero_shot_predictions`).
        rankings: system -> query -> ranked product ids, for ``dashclip`` (ANN) and ``dashclip_itm_rerank``.
        judgments: the eval judgments the rankings were scored on (query, product_id, label).
    """

    report: dict
    zero_shot: pd.DataFrame
    rankings: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    judgments: pd.DataFrame = field(default_factory=pd.DataFrame)


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
    judgments = eval_judgments(labels)
    queries = sorted(judgments["query"].unique())
    if not queries:
        raise ValueError("no held-out human labels (split 'eval'): nothing to evaluate on")
    image_only = set(products.loc[products["title"].isna() & products["description"].isna() & products["image_uri"].notna(), "product_id"])

    from dashclip_core.evaluation.rerank import itm_rerank
    from dashclip_core.models.encoders import load_product_encoder, load_query_encoder
    from dashclip_core.models.inputs import InputBuilder, embed_products, embed_queries

    builder = InputBuilder(cfg.model)
    photos = zero_shot_products(products, cfg)
    query_encoder, product_encoder = load_query_encoder(query_encoder_dir), load_product_encoder(product_encoder_dir)
    q_trained = embed_queries(query_encoder, builder, queries)
    depth = max(max(cfg.evaluation.ks), rerank_k)
    ann = ann_rankings(queries, q_trained, products, product_emb, depth)
    photos_bare = photos.assign(title=None, description=None)  # the held-out photos as image-only products
    if stem_store is not None and stem_store.covers(photos["product_id"]):  # the frozen stem is shared: run the trained tail only
        photo_emb = embeddings_from_pooled(product_encoder, builder, photos_bare, stem_store.pooled(product_encoder.image_tower, photos["product_id"]))[0]
    else:
        photo_emb = embed_products(product_encoder, builder, photos_bare)  # (N, D)
    zero_shot = zero_shot_predictions(product_encoder, query_encoder, cfg, photos, products, image_emb=photo_emb)
    fine_classes = sorted(set(products["category"].astype(str)))
    prompts = [class_prompt(c) for c in fine_classes]

    def t2i(scores: np.ndarray) -> dict:  # class prompts x held-out photos
        return text_to_image_metrics(scores, fine_classes, prompts, photos, products, cfg.evaluation.ks) if len(photos) else {}

    systems = {"dashclip": {**embedding_system(products, ann, product_emb, judgments, cfg, image_only), **zero_shot_metrics(zero_shot, products),
                            **t2i(embed_queries(query_encoder, builder, prompts) @ photo_emb.T)}}
    reranked, stats = itm_rerank(product_encoder, builder, queries, [ann[q] for q in queries], products, k=rerank_k, stem_store=stem_store)
    rerank = dict(zip(queries, reranked))
    systems["dashclip_itm_rerank"] = {**ranking_metrics(rerank, judgments, cfg, image_only), **stats}

    p_enc, q_enc = untrained_encoders(cfg)
    pooled = PooledImageFeatures(p_enc, cfg, products, stem_store)  # one pass over the photos serves all three baselines below
    p_init, image_init = embeddings_from_pooled(p_enc, builder, products, pooled.of(products.loc[products["image_uri"].notna(), "product_id"]))
    q_init = embed_queries(q_enc, builder, queries)
    photo_rows = products.reset_index(drop=True).index[products["product_id"].isin(set(photos["product_id"])).to_numpy()]
    zero_shot_init = zero_shot_predictions(p_enc, q_enc, cfg, photos, products, image_emb=image_init[photo_rows])
    systems["untrained_encoders"] = {**embedding_system(products, ann_rankings(queries, q_init, products, p_init, max(cfg.evaluation.ks)),
                                                        p_init, judgments, cfg, image_only),
                                     **zero_shot_metrics(zero_shot_init, products),
                                     **t2i(embed_queries(q_enc, builder, prompts) @ image_init[photo_rows].T)}
    bm25 = BM25Index([_str(t) for t in products["title"]], products["product_id"].tolist())
    probe_scores: dict = {}
    systems["image_backbone_linear_probe"] = linear_probe(p_enc, cfg, products, photos, pooled, fine_scores=probe_scores)
    if probe_scores:
        order = [probe_scores["classes"].index(c) for c in fine_classes]
        systems["image_backbone_linear_probe"].update(t2i(probe_scores["log_probs"][:, order].T))
    systems["bm25_titles"] = ranking_metrics({q: bm25.rank(q, max(cfg.evaluation.ks)) for q in queries}, judgments, cfg, image_only)

    samples = sample_queries or queries[:3]
    top = rank_by_embeddings(embed_queries(query_encoder, builder, samples), product_emb, products["product_id"].tolist(), 5)
    by_id = products.set_index("product_id")
    examples = {
        q: [{"product_id": p, "title": _str(by_id.at[p, "title"]), "category": _str(by_id.at[p, "category"])} for p in ids]
        for q, ids in zip(samples, top)
    }
    report = {
        "n_eval_queries": len(queries),
        "n_products": len(products),
        "n_image_only_products": len(image_only),
        "systems": systems,
        "sample_queries": examples,
    }
    return EvaluationOutputs(report, zero_shot, {"dashclip": ann, "dashclip_itm_rerank": rerank}, judgments)


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


PHOTO_METRIC_PREFIXES = ("zero_shot_", "t2i_")  # promotion metrics computed on the held-out photos, not the eval queries


def photo_metrics_via_pyfunc(model, cfg: PipelineConfig, products: pd.DataFrame) -> dict:
    """Zero-shot top-1 and text -> image metrics of a loaded pyfunc on this run's held-out photos
    (image-only products against class-name queries), as :func:`run_evaluation` computes them."""
    photos = zero_shot_products(products, cfg)
    if photos.empty:
        raise ValueError("no held-out photos to score zero-shot / text -> image metrics on")
    prod_in = pd.DataFrame({"product_id": photos["product_id"].to_numpy(), "title": None, "description": None,
                            "image_path": photos["image_uri"].to_numpy()})
    image_emb = np.asarray(model.predict(prod_in)["embedding"].tolist(), np.float32)  # (N, D)
    out: dict = {}
    for col, name in ZERO_SHOT_LEVELS:
        classes = sorted(set(products[col].astype(str)))
        prompts = [class_prompt(c) for c in classes]
        class_emb = np.asarray(model.predict(pd.DataFrame({"query_id": prompts, "query": prompts}))["embedding"].tolist(), np.float32)
        scores = class_emb @ image_emb.T  # (C, N)
        out[f"zero_shot_{name}_top1"] = float((np.asarray(classes)[scores.argmax(0)] == photos[col].astype(str).to_numpy()).mean())
        if name == "fine":
            out.update(text_to_image_metrics(scores, classes, prompts, photos, products, cfg.evaluation.ks))
    return out


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
    q = model.predict(pd.DataFrame({"query_id": queries, "query": queries}))
    p_emb = np.asarray(p["embedding"].tolist(), np.float32)
    q_emb = np.asarray(q["embedding"].tolist(), np.float32)
    rankings = dict(zip(queries, rank_by_embeddings(q_emb, p_emb, p["product_id"].tolist(), max(cfg.evaluation.ks))))
    m = evaluate_rankings(rankings, judgments, ks=cfg.evaluation.ks, min_relevant_label=cfg.evaluation.min_relevant_label)
    return float(m[metric])
