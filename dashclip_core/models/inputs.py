"""Turn catalog rows and queries into model inputs (tokenisation and image decoding live here, not in forward)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from dashclip_core.config import ModelConfig
from dashclip_core.models.towers import load_pixels


def product_text(title: str | None, description: str | None) -> str | None:
    """Text side of a product: title, then description; None when the product has neither."""
    parts = [s.strip() for s in (title, description) if isinstance(s, str) and s.strip()]
    return ". ".join(parts) if parts else None


class InputBuilder:
    """Builds tensors for products (image + text, either may be missing) and for queries.

    Args:
        cfg: the model's config (tokenizer, image size, backbone).
        images: the :class:`~dashclip_core.storage.images.ImagePolicy` every image is read under; pass
            ``ImagePolicy.for_pipeline(cfg)`` in pipeline steps (the catalog's roots and limits) or
            ``ImagePolicy.for_serving()``. None = ``TRUSTED_INPUT`` (gate-checked rows: any location, caps only).
    """

    def __init__(self, cfg: ModelConfig, images=None) -> None:
        from transformers import AutoTokenizer

        from dashclip_core.models.towers import text_source

        self.cfg = cfg
        self.image_policy = images  # (not `images`: that name is the method below)
        # A BLIP checkpoint brings its own tokenizer; otherwise the text tower's.
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.blip_checkpoint or text_source(cfg.text))
        self.backbone = "blip" if cfg.blip_checkpoint else cfg.image.backbone

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.cfg.text.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def products(self, titles: Sequence, descriptions: Sequence, image_paths: Sequence) -> dict[str, Tensor]:
        """Tensors for a batch of products: pixels (B,3,S,S), has_image (B,), input_ids/attention_mask (B,T), has_text (B,)."""
        size, backbone = self.cfg.image.image_size, self.backbone
        pix, has_image = zip(*(load_pixels(_none(p), size, backbone, self.image_policy) for p in image_paths)) if len(image_paths) else ((), ())
        texts = [product_text(_none(t), _none(d)) for t, d in zip(titles, descriptions)]
        tok = self.tokenize([t or "" for t in texts])
        return {
            "pixels": torch.from_numpy(np.stack(pix)) if pix else torch.zeros(0, 3, size, size),
            "has_image": torch.tensor(has_image, dtype=torch.bool),
            **tok,
            "has_text": torch.tensor([t is not None for t in texts], dtype=torch.bool),
        }

    def images(self, image_paths: Sequence) -> Tensor:
        """Pixels (B, 3, S, S) of products that all have an image."""
        size, backbone = self.cfg.image.image_size, self.backbone
        return torch.from_numpy(np.stack([load_pixels(p, size, backbone, self.image_policy)[0] for p in image_paths]))

    def product_texts(self, titles: Sequence, descriptions: Sequence) -> dict[str, Tensor]:
        """input_ids/attention_mask (B, T) of products' text (title + description); no image decoding."""
        return self.tokenize([product_text(_none(t), _none(d)) or "" for t, d in zip(titles, descriptions)])

    def queries(self, queries: Sequence[str]) -> dict[str, Tensor]:
        return self.tokenize([q.strip() for q in queries])


def _none(value):
    """pandas gives NaN/None/pd.NA for missing values; normalise to None."""
    if value is None:
        return None
    if isinstance(value, float) and np.isnan(value):
        return None
    try:
        import pandas as pd

        if value is pd.NA:
            return None
    except ImportError:  # pragma: no cover
        pass
    return value


@torch.no_grad()
def embed_products(encoder: nn.Module, builder: InputBuilder, products, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """Product embeddings (N, D) float32 for a DataFrame with title, description, image_uri."""
    encoder.eval()
    out = []
    for start in range(0, len(products), batch_size):
        chunk = products.iloc[start : start + batch_size]
        b = {k: v.to(device) for k, v in builder.products(chunk["title"].tolist(), chunk["description"].tolist(), chunk["image_uri"].tolist()).items()}
        out.append(encoder.encode_product(b["pixels"], b["has_image"], b["input_ids"], b["attention_mask"], b["has_text"]).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.cfg.embed_dim), np.float32)


@torch.no_grad()
def embed_queries(encoder: nn.Module, builder: InputBuilder, queries: Sequence[str], batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    encoder.eval()
    out = []
    for start in range(0, len(queries), batch_size):
        b = {k: v.to(device) for k, v in builder.queries(queries[start : start + batch_size]).items()}
        out.append(encoder(b["input_ids"], b["attention_mask"]).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
