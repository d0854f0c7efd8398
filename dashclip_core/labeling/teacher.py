"""Relevance teacher: learns the 0/1/2 scale from human labels, then labels the candidate pairs.

DashCLIP fine-tuned a GPT model on ~700K human judgements and let it grade 32M query-product pairs
(0 irrelevant, 1 moderately, 2 highly relevant). The embedded default plays the same role offline:
a frozen sentence encoder (all-MiniLM-L6-v2, shipped on PyPI) reads the query and the product's
text (title, description, category, aisle: what a labelling prompt would show), and a softmax
classifier over pair features [q*p, |q-p|, cos(q,p), word overlap] is trained on the human labels.
Its agreement with held-out human labels (accuracy, Cohen's kappa) is measured before its labels are
used.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dashclip_core.baselines.softmax_regression import SoftmaxRegression
from dashclip_core.config import LabelingConfig

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z0-9]+")
LABELER_VERSION = "minilm-softmax-v1"


def teacher_text(row) -> str:
    """What the teacher sees of a product (a labelling prompt would show the same fields)."""
    parts = []
    for field in ("title", "description", "category", "aisle"):
        value = row.get(field)
        if isinstance(value, str) and value.strip():
            parts.append(value.strip())
    return ". ".join(parts)


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a frozen BERT-style encoder."""

    def __init__(self, source: str, batch_size: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        from dashclip_core.models.towers import SHIPPED_MINILM, minilm_path

        path = str(minilm_path()) if source == SHIPPED_MINILM else source
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def encode(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True, max_length=96, return_tensors="pt")
            states = self.model(**enc).last_hidden_state  # (B, T, H)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(F.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def overlap(query: str, text: str) -> float:
    """Share of the query's words that occur in the product text."""
    q = set(_WORD.findall(query.lower()))
    return len(q & set(_WORD.findall(text.lower()))) / len(q) if q else 0.0


@dataclass
class PairFeatures:
    """Embeds each distinct query and product text once, then builds pair features."""

    encoder: SentenceEncoder

    def __call__(self, queries: list[str], texts: list[str]) -> np.ndarray:
        uq, qi = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
        ut, ti = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
        qe, te = self.encoder.encode(list(uq))[qi], self.encoder.encode(list(ut))[ti]  # (N, H) each
        cos = (qe * te).sum(1, keepdims=True)
        ov = np.array([[overlap(q, t)] for q, t in zip(queries, texts)], np.float32)
        return np.concatenate([qe * te, np.abs(qe - te), cos, ov], axis=1).astype(np.float32)


def cohen_kappa(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = 3) -> float:
    """Cohen's kappa = (p_o - p_e) / (1 - p_e) (Cohen 1960)."""
    cm = confusion(y_true, y_pred, n_classes).astype(np.float64)
    n = cm.sum()
    if n == 0:
        return float("nan")
    p_o = np.trace(cm) / n
    p_e = (cm.sum(0) * cm.sum(1)).sum() / n**2
    return float((p_o - p_e) / (1 - p_e)) if p_e < 1 else 1.0


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int = 3) -> np.ndarray:
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm  # rows: human label, columns: teacher label


def holdout_mask(queries: pd.Series, fraction: float, seed: int) -> np.ndarray:
    """Hold out whole queries (hash-based, deterministic) so the teacher is scored on unseen queries."""
    def bucket(q: str) -> float:
        return int(hashlib.sha256(f"{seed}:{q}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    return np.array([bucket(q) < fraction for q in queries])


def train_and_label(products: pd.DataFrame, human: pd.DataFrame, candidates: pd.DataFrame, cfg: LabelingConfig, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Fit the teacher on human 'train' labels, score it on held-out queries, label the candidates.

    Returns:
        (teacher-labelled candidates with columns query, product_id, label, report dict).
    """
    text_by_id = {r["product_id"]: teacher_text(r) for r in products.to_dict("records")}
    train = human[human["split"] == "train"].reset_index(drop=True)
    missing = sorted(set(train["product_id"]) - set(text_by_id))
    if missing:
        raise ValueError(f"human_labels: {len(missing)} labelled product_ids are not in the snapshot, e.g. {missing[:5]}")
    feats = PairFeatures(SentenceEncoder(cfg.teacher_encoder, cfg.teacher_batch_size))
    x = feats(train["query"].tolist(), [text_by_id[p] for p in train["product_id"]])
    y = train["label"].to_numpy()
    held = holdout_mask(train["query"], cfg.teacher_holdout_fraction, seed)
    if held.all() or not held.any():
        raise ValueError(f"teacher holdout of {cfg.teacher_holdout_fraction:.0%} of {train['query'].nunique()} queries leaves no train or no holdout queries")
    scored = SoftmaxRegression(x.shape[1], cfg.teacher_l2, seed).fit(x[~held], y[~held], cfg.teacher_epochs)
    pred = scored.predict(x[held])
    report = {
        "labeler": LABELER_VERSION,
        "accuracy": float((pred == y[held]).mean()),
        "kappa": cohen_kappa(y[held], pred),
        "n_holdout": int(held.sum()),
        "n_train": int((~held).sum()),
        "confusion": confusion(y[held], pred).tolist(),
    }
    # The labelling teacher is refit on every human train label (the holdout measured the recipe).
    teacher = SoftmaxRegression(x.shape[1], cfg.teacher_l2, seed).fit(x, y, cfg.teacher_epochs)
    if len(candidates):
        cx = feats(candidates["query"].tolist(), [text_by_id[p] for p in candidates["product_id"]])
        labelled = candidates[["query", "product_id"]].assign(label=teacher.predict(cx))
    else:
        labelled = candidates.assign(label=np.array([], np.int8))
    report["label_counts"] = {str(k): int(v) for k, v in labelled["label"].value_counts().sort_index().items()}
    return labelled, report
