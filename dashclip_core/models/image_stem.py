"""The frozen image stem's output, computed once per photo and shared by every step of a run.

With a frozen backbone (``model.image.freeze_backbone``, only the last ``trainable_blocks`` training),
the stem (convolution stem + all frozen MBConv blocks) is a fixed function of the pixels: the same for
the untrained model, for every training epoch and for the trained model. It is also most of the image
tower's cost. So a run computes it once for every product photo (float16, ``<path>.npy`` + ``<path>.json``
with the product ids and the image-tower config it was computed with) and:

- stage 1 trains the tail from it (no image decoding or stem in the epoch loop);
- stage 2 embeds its anchor products from it;
- evaluate derives the trained model's held-out photo embeddings and the untrained/linear-probe
  baselines' backbone features from it.

A store whose recorded image config differs from the model's is never used (it is rebuilt).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dashclip_core.config import ModelConfig

logger = logging.getLogger(__name__)


def stem_fingerprint(model_cfg: ModelConfig) -> dict:
    """What the stem's output depends on."""
    return {"image": asdict(model_cfg.image), "blip_checkpoint": model_cfg.blip_checkpoint}


class StemRows:
    """Rows of an (N, ...) ``.npy`` array, read on demand with ``os.pread``.

    Not a memory map on purpose: a map keeps every page a process has touched in its resident set, so over an
    epoch each training worker (and the driver) would count the whole cache in its RSS, once per process. Rows
    read with pread go through the page cache, which the kernel shares and can drop, and only the batch being
    built lives in the process.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, fortran_order, self.dtype = read_header(f)
            self.offset = f.tell()
        if fortran_order:
            raise ValueError(f"{self.path}: stem cache must be C-ordered")
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, rows) -> np.ndarray:
        """The rows ``rows`` (a sequence of indices), in that order, as one new array."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"{self.path}: row out of range 0..{len(self) - 1}")
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        view = out.reshape(len(rows), self.row_bytes // self.dtype.itemsize).view(np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, row in enumerate(rows):
                data = os.pread(fd, self.row_bytes, self.offset + int(row) * self.row_bytes)
                if len(data) != self.row_bytes:
                    raise OSError(f"{self.path}: short read at row {row} (file truncated?)")
                view[i] = np.frombuffer(data, np.uint8)
        finally:
            os.close(fd)
        return out


class StemStore:
    """Read side of a computed store: ``array`` (N, C, h, w) float16 rows read on demand (:class:`StemRows`),
    ``row`` product_id -> index."""

    def __init__(self, path: Path) -> None:
        meta = json.loads(Path(f"{path}.json").read_text())
        self.path = Path(path)
        self.fingerprint = meta["fingerprint"]
        self.row = {p: i for i, p in enumerate(meta["product_ids"])}
        self.array = StemRows(f"{path}.npy")

    @classmethod
    def open(cls, path: Path, model_cfg: ModelConfig) -> StemStore | None:
        """The store at ``path`` if it exists and matches ``model_cfg``'s image tower, else None."""
        if not (Path(f"{path}.npy").exists() and Path(f"{path}.json").exists()):
            return None
        store = cls(path)
        return store if store.fingerprint == json.loads(json.dumps(stem_fingerprint(model_cfg))) else None

    def covers(self, product_ids) -> bool:
        return all(p in self.row for p in product_ids)

    def stems(self, product_ids) -> torch.Tensor:
        """float32 stems (B, C, h, w) of these products, in this order."""
        return torch.from_numpy(self.array[[self.row[p] for p in product_ids]].astype(np.float32))

    def pooled(self, image_tower: torch.nn.Module, product_ids, batch_size: int = 64) -> np.ndarray:
        """The tower's pooled output (N, C_out) for these products, running only its tail."""
        ids = list(product_ids)
        out = []
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                out.append(image_tower.eval().forward_from_stem(self.stems(ids[start : start + batch_size]))[1].float().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def build_stem_store(encoder, model_cfg: ModelConfig, products: pd.DataFrame, path: Path, threads: int, batch_size: int = 32,
                     images=None) -> StemStore | None:
    """Compute (or reuse) the stem of every product with an image; None when the tower has no frozen stem.

    ``images``: the run's :class:`~dashclip_core.storage.images.ImagePolicy` (None = gate-checked rows, caps only).
    Written atomically: the array and its id list go to temporary names, the ids file is renamed last,
    so a store that :meth:`StemStore.open` finds is always complete.
    """
    if not encoder.has_frozen_image_stem:
        return None
    existing = StemStore.open(path, model_cfg)
    with_image = products[products["image_uri"].notna()]
    if existing is not None and existing.covers(with_image["product_id"]):
        return existing
    from dashclip_core.models.inputs import InputBuilder

    builder = InputBuilder(model_cfg, images=images)
    torch.set_num_threads(max(1, threads))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp.npy")
    out = None
    t0 = time.time()
    encoder.eval()
    for start in range(0, len(with_image), batch_size):
        stem = encoder.image_stem(builder.images(with_image["image_uri"].iloc[start : start + batch_size].tolist()))  # (b, C, h, w)
        if out is None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(with_image), *stem.shape[1:]))
        out[start : start + len(stem)] = stem.numpy().astype(np.float16)
    if out is None:
        return None
    out.flush()
    del out
    tmp.replace(f"{path}.npy")
    meta_tmp = Path(f"{path}.json.tmp")
    meta_tmp.write_text(json.dumps({"fingerprint": stem_fingerprint(model_cfg), "product_ids": with_image["product_id"].astype(str).tolist()}))
    meta_tmp.replace(f"{path}.json")
    logger.info("image stem of %d photos computed in %.1fs (%s)", len(with_image), time.time() - t0, path.name)
    return StemStore(path)


def embeddings_from_pooled(encoder, builder, products: pd.DataFrame, pooled: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``ProductEncoder.encode_product`` with the image tower's pooled output precomputed.

    Args:
        pooled: (N_with_image, C) pooled image-tower output of the products that have an image, in order.

    Returns:
        (product embeddings (N, D), image-only embeddings (N, D), zero rows for products without an image).
    """
    from dashclip_core.models.inputs import product_text

    emb = np.zeros((len(products), encoder.cfg.embed_dim), np.float32)
    image_emb = np.zeros_like(emb)
    has_image = products["image_uri"].notna().to_numpy()
    texts = [product_text(t if isinstance(t, str) else None, d if isinstance(d, str) else None)
             for t, d in zip(products["title"], products["description"])]
    with torch.no_grad():
        if has_image.any():
            image_emb[has_image] = F.normalize(encoder.image_proj(torch.from_numpy(np.asarray(pooled, np.float32))), dim=-1).numpy()
        emb += image_emb
        text_rows = [i for i, t in enumerate(texts) if t is not None]
        for start in range(0, len(text_rows), batch_size):
            rows = text_rows[start : start + batch_size]
            tok = builder.tokenize([texts[i] for i in rows])
            emb[rows] += encoder.encode_text(tok["input_ids"], tok["attention_mask"])[0].float().numpy()
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12), image_emb
