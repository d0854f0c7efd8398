"""Evaluation report: the trained encoders vs BM25 over titles and vs the untrained encoders.

On the held-out human-judged queries (split 'eval', never seen by the teacher or stage 2):
NDCG@10 and Recall@10/50 over the whole snapshot (unjudged products count as irrelevant), recall
of image-only relevant products, and aisle/category prediction accuracy from product embeddings
(nearest class centroid, products split 80/20 by a hash of their id).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dashclip_core.config import PipelineConfig
from dashclip_core.evaluation.bm25 import BM25Index
from dashclip_core.evaluation.metrics import category_accuracy, evaluate_rankings

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


def linear_probe(product_encoder, cfg: PipelineConfig, products: pd.DataFrame, photos: pd.DataFrame) -> dict:
    """Baseline: softmax regression on frozen image-backbone features, fit on the training products'
    photos (never the held-out ones), scored top-1 on the held-out photos (fine and coarse)."""
    from dashclip_core.labeling.teacher import SoftmaxTeacher

    train = products[products["image_uri"].notna() & ~products["product_id"].isin(set(photos["product_id"]))]
    if photos.empty or train.empty:
        return {}
    x_train, x_test = image_backbone_features(product_encoder, cfg, train), image_backbone_features(product_encoder, cfg, photos)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # standardise: the probe's L2 then treats features alike
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    out = {}
    for col, name in (("category", "fine"), ("aisle", "coarse")):
        classes = sorted(set(products[col].astype(str)))
        index = {c: i for i, c in enumerate(classes)}
        y = train[col].astype(str).map(index).to_numpy()
        probe = SoftmaxTeacher(x_train.shape[1], l2=1e-3, seed=cfg.train.seed, n_classes=len(classes)).fit(x_train.astype(np.float32), y, steps=300)
        pred = probe.predict(x_test.astype(np.float32))
        out[f"probe_{name}_top1"] = float((pred == photos[col].astype(str).map(index).to_numpy()).mean())
    return out


def ranking_metrics(rankings: dict[str, list[str]], judgments: pd.DataFrame, cfg: PipelineConfig, image_only: set[str]) -> dict:
    m = evaluate_rankings(rankings, judgments, ks=cfg.evaluation.ks, min_relevant_label=cfg.evaluation.min_relevant_label)
    m[f"image_only_recall@{max(cfg.evaluation.ks)}"] = image_only_recall(rankings, judgments, image_only, max(cfg.evaluation.ks))
    return m


def embedding_system(products: pd.DataFrame, queries: list[str], product_emb: np.ndarray, query_emb: np.ndarray, judgments, cfg, image_only) -> dict:
    rankings = dict(zip(queries, rank_by_embeddings(query_emb, product_emb, products["product_id"].tolist(), max(cfg.evaluation.ks))))
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


def zero_shot_accuracy(product_encoder, query_encoder, cfg: PipelineConfig, photos: pd.DataFrame, catalog: pd.DataFrame) -> dict:
    """Top-1 accuracy of image-only product embeddings against query embeddings of every class name in
    ``catalog`` (fine = ``category``, coarse = ``aisle``): the CLIP zero-shot protocol with queries as prompts."""
    from dashclip_core.models.inputs import InputBuilder, embed_products, embed_queries

    if photos.empty:
        return {}
    builder = InputBuilder(cfg.model)
    image_emb = embed_products(product_encoder, builder, photos.assign(title=None, description=None))  # (N, D)
    out = {"zero_shot_n_photos": len(photos)}
    for col, name in (("category", "fine"), ("aisle", "coarse")):
        classes = sorted(set(catalog[col].astype(str)))
        class_emb = embed_queries(query_encoder, builder, [class_prompt(c) for c in classes])  # (C, D)
        pred = np.asarray(classes)[np.argmax(image_emb @ class_emb.T, axis=1)]
        out[f"zero_shot_{name}_top1"] = float((pred == photos[col].astype(str).to_numpy()).mean())
        out[f"zero_shot_{name}_classes"] = len(classes)
    return out


def trained_query_embeddings(query_encoder_dir: Path, cfg: PipelineConfig, queries: list[str]) -> np.ndarray:
    from dashclip_core.models.encoders import load_query_encoder
    from dashclip_core.models.inputs import InputBuilder, embed_queries

    return embed_queries(load_query_encoder(query_encoder_dir), InputBuilder(cfg.model), queries)


def evaluate(cfg: PipelineConfig, products: pd.DataFrame, labels: pd.DataFrame, product_ids: list[str], product_emb: np.ndarray,
             query_encoder_dir: Path, product_encoder_dir: Path, sample_queries: list[str] | None = None) -> dict:
    """Build the report dict (JSON-able): one block per system, plus top-5 results of sample queries."""
    if list(products["product_id"]) != list(product_ids):
        order = {p: i for i, p in enumerate(product_ids)}
        missing = set(products["product_id"]) - set(order)
        if missing:
            raise ValueError(f"embeddings lack {len(missing)} snapshot products, e.g. {sorted(missing)[:5]}")
        product_emb = product_emb[[order[p] for p in products["product_id"]]]
    judgments = eval_judgments(labels)
    queries = sorted(judgments["query"].unique())
    if not queries:
        raise ValueError("no held-out human labels (split 'eval'): nothing to evaluate on")
    image_only = set(products.loc[products["title"].isna() & products["description"].isna() & products["image_uri"].notna(), "product_id"])

    from dashclip_core.models.encoders import load_product_encoder, load_query_encoder
    from dashclip_core.models.inputs import InputBuilder, embed_products, embed_queries

    builder = InputBuilder(cfg.model)
    photos = zero_shot_products(products, cfg)
    query_encoder = load_query_encoder(query_encoder_dir)
    q_trained = embed_queries(query_encoder, builder, queries)
    systems = {"dashclip": {**embedding_system(products, queries, product_emb, q_trained, judgments, cfg, image_only),
                            **zero_shot_accuracy(load_product_encoder(product_encoder_dir), query_encoder, cfg, photos, products)}}
    p_enc, q_enc = untrained_encoders(cfg)
    p_init, q_init = embed_products(p_enc, builder, products), embed_queries(q_enc, builder, queries)
    systems["untrained_encoders"] = {**embedding_system(products, queries, p_init, q_init, judgments, cfg, image_only),
                                     **zero_shot_accuracy(p_enc, q_enc, cfg, photos, products)}
    bm25 = BM25Index([_str(t) for t in products["title"]], products["product_id"].tolist())
    systems["image_backbone_linear_probe"] = linear_probe(p_enc, cfg, products, photos)
    systems["bm25_titles"] = ranking_metrics({q: bm25.rank(q, max(cfg.evaluation.ks)) for q in queries}, judgments, cfg, image_only)

    samples = sample_queries or queries[:3]
    q_samples = trained_query_embeddings(query_encoder_dir, cfg, samples)
    top = rank_by_embeddings(q_samples, product_emb, products["product_id"].tolist(), 5)
    by_id = products.set_index("product_id")
    examples = {
        q: [{"product_id": p, "title": _str(by_id.at[p, "title"]), "category": _str(by_id.at[p, "category"])} for p in ids]
        for q, ids in zip(samples, top)
    }
    return {
        "n_eval_queries": len(queries),
        "n_products": len(products),
        "n_image_only_products": len(image_only),
        "systems": systems,
        "sample_queries": examples,
    }


def _str(v) -> str | None:
    return v if isinstance(v, str) else None


def score_model_uri(model_uri: str, cfg: PipelineConfig, products: pd.DataFrame, judgments: pd.DataFrame, metric: str) -> float:
    """Score a registered model (e.g. the current champion) on this run's eval set, through its pyfunc."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    queries = sorted(judgments["query"].unique())
    prod_in = products[["product_id", "title", "description", "image_uri"]].rename(columns={"image_uri": "image_path"})
    p = model.predict(prod_in)
    q = model.predict(pd.DataFrame({"query_id": queries, "query": queries}))
    p_emb = np.asarray(p["embedding"].tolist(), np.float32)
    q_emb = np.asarray(q["embedding"].tolist(), np.float32)
    rankings = dict(zip(queries, rank_by_embeddings(q_emb, p_emb, p["product_id"].tolist(), max(cfg.evaluation.ks))))
    m = evaluate_rankings(rankings, judgments, ks=cfg.evaluation.ks, min_relevant_label=cfg.evaluation.min_relevant_label)
    return float(m[metric])
