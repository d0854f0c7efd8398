"""DashCLIP encoders: the BLIP-style multimodal product encoder (stage 1) and the query encoder (stage 2).

Product encoder (BLIP, Li et al. 2022, arXiv 2201.12086, Sec. 3.1 "MED"):
  - unimodal image encoder  -> image tokens (B, N, C) -> ``image_proj`` -> image_emb (B, D)
  - unimodal text encoder   -> text tokens (B, T, H) -> ``text_proj``  -> text_emb  (B, D)
  - image-grounded text encoder: text tokens attend to image tokens through cross-attention
    (``fusion_layers`` blocks of self-attention + cross-attention + FFN, stacked on the text encoder's
    output as in ALBEF's multimodal encoder) -> [CLS] -> ``itm_head`` -> match / no-match logits.

The product embedding is the normalised mean of the unit image and text embeddings that a product
has: ITC puts both in one space, so the mean stays in it, and a product with only an image or only
a title still gets an embedding in the same space (catalogs have both kinds).

Query encoder (DashCLIP stage 2): a text tower + projection, initialised from the product encoder's
text side (already in the product space) and trained with the QCC loss against frozen product
embeddings.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dashclip_core.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from dashclip_core.models.towers import BlipVisionTower, TextTower, build_image_tower, load_blip

logger = logging.getLogger(__name__)


class ProductEncoder(nn.Module):
    """Image tower + text tower + image-grounded text encoder (ITM), all projected to ``embed_dim``.

    Args:
        cfg: model config. With ``cfg.blip_checkpoint`` set, both towers (and the ITC projections, when
            ``embed_dim`` matches the checkpoint's) start from that BLIP ITM checkpoint; the fusion layers
            and ITM head are ours either way.
        pretrained_weights: False builds the architecture only (saved weights will be loaded over it).
    """

    def __init__(self, cfg: ModelConfig, pretrained_weights: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        blip = load_blip(cfg.blip_checkpoint, pretrained_weights) if cfg.blip_checkpoint else None
        if blip is not None:
            self.image_tower = BlipVisionTower(blip.vision_model, cfg.image.freeze_backbone)
            self.text_tower = TextTower(cfg.text, encoder=blip.text_encoder, pooling="cls")
            for name, p in self.text_tower.named_parameters():
                if "crossattention" in name:  # BLIP's own fusion path is unused here; frozen so DDP sees no idle grads
                    p.requires_grad = False
        else:
            self.image_tower = build_image_tower(replace(cfg.image, pretrained=cfg.image.pretrained and pretrained_weights))
            self.text_tower = TextTower(cfg.text)
        hidden = self.text_tower.hidden_size
        img_dim = self.image_tower.out_dim
        self.image_proj = nn.Linear(img_dim, cfg.embed_dim)
        self.text_proj = nn.Linear(hidden, cfg.embed_dim)
        if blip is not None and blip.vision_proj.out_features == cfg.embed_dim:
            self.image_proj.load_state_dict(blip.vision_proj.state_dict())
            self.text_proj.load_state_dict(blip.text_proj.state_dict())
        self.image_token_proj = nn.Linear(img_dim, hidden)  # image tokens -> text width for cross-attention
        heads = max(1, hidden // 32)
        self.fusion = nn.ModuleList(
            nn.TransformerDecoderLayer(hidden, heads, dim_feedforward=hidden * 4, dropout=0.1, batch_first=True, norm_first=True)
            for _ in range(cfg.fusion_layers)
        )
        self.itm_head = nn.Linear(hidden, 2)

    # ---- unimodal -----------------------------------------------------------------------------

    def encode_image(self, pixels: Tensor, from_stem: bool = False) -> tuple[Tensor, Tensor]:
        """pixels (B, 3, S, S) -> (image_emb (B, D) unit norm, image_tokens (B, N, H) for fusion).

        ``from_stem``: ``pixels`` is already the frozen stem's output (:meth:`image_stem`), e.g. cached.
        """
        tokens, pooled = self.image_tower.forward_from_stem(pixels) if from_stem else self.image_tower(pixels)
        return F.normalize(self.image_proj(pooled), dim=-1), self.image_token_proj(tokens)

    @property
    def has_frozen_image_stem(self) -> bool:
        """True when the image tower starts with a frozen part whose output can be computed once and cached."""
        return bool(getattr(self.image_tower, "frozen_stem", False))

    @torch.no_grad()
    def image_stem(self, pixels: Tensor) -> Tensor:
        """The frozen part of the image tower (deterministic: BatchNorm statistics and no stochastic depth)."""
        if not self.has_frozen_image_stem:
            raise ValueError("this image tower has no frozen stem (set model.image.freeze_backbone with an efficientnet backbone)")
        return self.image_tower.stem(pixels)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """-> (text_emb (B, D) unit norm, text_states (B, T, H))."""
        states, pooled = self.text_tower(input_ids, attention_mask)
        return F.normalize(self.text_proj(pooled), dim=-1), states

    # ---- image-grounded text encoder ----------------------------------------------------------

    def itm_logits(self, text_states: Tensor, attention_mask: Tensor, image_tokens: Tensor) -> Tensor:
        """(B, T, H), (B, T), (B, N, H) -> match logits (B, 2); column 1 = "matches"."""
        x = text_states
        pad = attention_mask == 0  # (B, T) True where padding
        for layer in self.fusion:
            x = layer(x, image_tokens, tgt_key_padding_mask=pad)
        return self.itm_head(x[:, 0])

    # ---- product embedding --------------------------------------------------------------------

    def encode_product(self, pixels: Tensor, has_image: Tensor, input_ids: Tensor, attention_mask: Tensor, has_text: Tensor) -> Tensor:
        """Product embedding (B, D): normalised mean of the available unit embeddings.

        Raises:
            ValueError: a product with neither an image nor text.
        """
        if bool((~has_image & ~has_text).any()):
            raise ValueError("a product has neither an image nor text; the catalog gate should have quarantined it")
        emb = torch.zeros(pixels.shape[0], self.cfg.embed_dim, device=pixels.device)
        if bool(has_image.any()):
            image_emb, _ = self.encode_image(pixels[has_image])
            emb[has_image] += image_emb
        if bool(has_text.any()):
            text_emb, _ = self.encode_text(input_ids[has_text], attention_mask[has_text])
            emb[has_text] += text_emb
        return F.normalize(emb, dim=-1)


class QueryEncoder(nn.Module):
    """Text-only query encoder into the product space (DashCLIP stage 2)."""

    def __init__(self, text_tower: TextTower, text_proj: nn.Linear) -> None:
        super().__init__()
        self.text_tower = text_tower
        self.text_proj = text_proj

    @classmethod
    def from_product_encoder(cls, product: ProductEncoder, trainable_layers: int) -> QueryEncoder:
        """Copy the product encoder's text side (already aligned with product space by ITC)."""
        tower = copy.deepcopy(product.text_tower)
        tower._set_trainable(trainable_layers)
        proj = copy.deepcopy(product.text_proj)
        for p in proj.parameters():
            p.requires_grad = True
        return cls(tower, proj)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """-> query_emb (B, D) unit norm."""
        _, pooled = self.text_tower(input_ids, attention_mask)
        return F.normalize(self.text_proj(pooled), dim=-1)


# ---- save / load -------------------------------------------------------------------------------

WEIGHTS = "weights.pt"
MODEL_CONFIG = "model_config.json"


def model_config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    d["image"] = ImageTowerConfig(**d["image"])
    d["text"] = TextTowerConfig(**d["text"])
    return ModelConfig(**d)


BLIP_DIR = "blip"  # the BLIP checkpoint's config + tokenizer, so a saved encoder needs nothing else


def save_encoder(module: nn.Module, cfg: ModelConfig, out_dir: Path) -> Path:
    """Weights + model config (+ the BLIP architecture and tokenizer files when built from a checkpoint)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), out_dir / WEIGHTS)
    if cfg.blip_checkpoint:
        from transformers import AutoTokenizer, BlipConfig

        BlipConfig.from_pretrained(cfg.blip_checkpoint).save_pretrained(out_dir / BLIP_DIR)
        AutoTokenizer.from_pretrained(cfg.blip_checkpoint).save_pretrained(out_dir / BLIP_DIR)
        cfg = replace(cfg, blip_checkpoint=BLIP_DIR)  # relative to the saved folder
    (out_dir / MODEL_CONFIG).write_text(json.dumps(asdict(cfg), indent=2))
    return out_dir


def saved_model_config(model_dir: Path) -> ModelConfig:
    cfg = model_config_from_dict(json.loads((model_dir / MODEL_CONFIG).read_text()))
    if cfg.blip_checkpoint and not Path(cfg.blip_checkpoint).is_absolute():
        cfg = replace(cfg, blip_checkpoint=str(model_dir / cfg.blip_checkpoint))
    return cfg


def load_product_encoder(model_dir: Path) -> ProductEncoder:
    # The saved weights replace everything, so pretrained weights are not read again.
    enc = ProductEncoder(saved_model_config(model_dir), pretrained_weights=False)
    enc.load_state_dict(torch.load(model_dir / WEIGHTS, map_location="cpu", weights_only=True))
    return enc.eval()


def load_query_encoder(model_dir: Path) -> QueryEncoder:
    cfg = saved_model_config(model_dir)
    if cfg.blip_checkpoint:
        tower = TextTower(cfg.text, encoder=load_blip(cfg.blip_checkpoint, with_weights=False).text_encoder, pooling="cls")
    else:
        tower = TextTower(cfg.text)
    enc = QueryEncoder(tower, nn.Linear(tower.hidden_size, cfg.embed_dim))
    enc.load_state_dict(torch.load(model_dir / WEIGHTS, map_location="cpu", weights_only=True))
    return enc.eval()


def count_parameters(module: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable}
