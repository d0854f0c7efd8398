"""What the offline softmax teacher reads: product text and MiniLM pair features.

DashCLIP fine-tuned a GPT model on ~700K human judgements and let it grade 32M query-product pairs
(0 irrelevant, 1 moderately, 2 highly relevant). The embedded default plays the same role offline:
a frozen sentence encoder (all-MiniLM-L6-v2, shipped on PyPI) reads the query and the product's
text (title, description, category, aisle: what a labelling prompt would show), and a softmax
classifier over pair features [q*p, |q-p|, cos(q,p), word overlap] is trained on the human labels
(:class:`~dashclip_core.labeling.labelers.SoftmaxLabeler`, which is gated on held-out human labels
before it grades anything).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dashclip_core.labeling.base import PRODUCT_FIELDS

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z0-9]+")
LABELER_VERSION = "minilm-softmax-v1"


def teacher_text(row) -> str:
    """What the teacher sees of a product (a labelling prompt would show the same fields)."""
    parts = []
    for field in PRODUCT_FIELDS:
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
