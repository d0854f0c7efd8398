"""The untrained model and its frozen image backbone: what training is measured against.

Two baselines start from here: the same architecture at initialisation (pretrained towers, untrained
projections and fusion), and a supervised linear probe on the image backbone's pooled features. Both
need the backbone's output for every photo, which :class:`PooledImageFeatures` computes once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dashclip_core.config import PipelineConfig
from dashclip_core.evaluation.photos import ZERO_SHOT_LEVELS, class_names

PROBE_STEPS = 300  # full-batch Adam steps; the probe converges well before on our catalogs
PROBE_L2 = 1e-3


def untrained_encoders(cfg: PipelineConfig):
    """The same architecture at initialisation (pretrained towers, untrained projections and fusion).

    Returns:
        (product encoder, query encoder), both in eval mode; the query encoder shares the product
        encoder's text tower, as stage 2 starts from it.
    """
    from dashclip_core.models.encoders import QueryEncoder
    from dashclip_core.training.stage1 import build_stage1

    encoder = build_stage1(cfg).encoder.eval()
    return encoder, QueryEncoder.from_product_encoder(encoder, 0).eval()


def image_backbone_features(product_encoder, cfg: PipelineConfig, products: pd.DataFrame, batch_size: int = 64) -> np.ndarray:
    """Pooled features (N, C) of the (untrained, ImageNet-pretrained) image tower, before any projection."""
    import torch

    from dashclip_core.models.towers import load_pixels
    from dashclip_core.storage.images import ImagePolicy

    backbone = "blip" if cfg.model.blip_checkpoint else cfg.model.image.backbone
    policy = ImagePolicy.for_pipeline(cfg)  # the run's roots and its S3 endpoint (MinIO, moto), as every other read
    out = []
    for start in range(0, len(products), batch_size):
        paths = products["image_uri"].iloc[start : start + batch_size]
        pixels = torch.from_numpy(np.stack([load_pixels(p, cfg.model.image.image_size, backbone, policy)[0] for p in paths]))
        with torch.no_grad():
            out.append(product_encoder.image_tower.eval()(pixels)[1].float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class PooledImageFeatures:
    """The untrained image tower's pooled output for every product with an image, computed once.

    Why: the untrained-encoder baseline, its zero-shot figures and the linear probe all need exactly this
    (the pretrained backbone before any projection); one pass over the photos instead of three keeps the
    evaluate step affordable on a CPU with a large catalog. With the run's frozen-stem store
    (``models/image_stem.py``) only the tower's tail runs.

    Args:
        encoder: the untrained product encoder (:func:`untrained_encoders`).
        cfg: the run's config (image size and backbone for loading pixels).
        products: the snapshot; rows without ``image_uri`` are skipped.
        stem_store: the run's ``StemStore``, used when it covers every product with an image.
    """

    def __init__(self, encoder, cfg: PipelineConfig, products: pd.DataFrame, stem_store=None) -> None:
        with_image = products[products["image_uri"].notna()]
        self.row = {p: i for i, p in enumerate(with_image["product_id"])}
        if stem_store is not None and stem_store.covers(with_image["product_id"]):
            self.features = stem_store.pooled(encoder.image_tower, with_image["product_id"])
        else:
            self.features = image_backbone_features(encoder, cfg, with_image)  # (N_image, C)

    def of(self, product_ids) -> np.ndarray:
        """Features (len(product_ids), C) of these products, in this order."""
        return self.features[[self.row[p] for p in product_ids]]


def linear_probe(pooled: PooledImageFeatures, products: pd.DataFrame, photos: pd.DataFrame, seed: int) -> tuple[dict, np.ndarray | None]:
    """Softmax regression on frozen image-backbone features, per level (fine = ``category``, coarse = ``aisle``).

    Fit on the photos of the products that are not held out (never the held-out ones), with features
    standardised by the training mean and std, and scored top-1 on the held-out photos.

    Args:
        pooled: the backbone features of every product with an image.
        products: the snapshot, which defines the classes (:func:`~.photos.class_names`).
        photos: the held-out photos.
        seed: the probe's initialisation seed.

    Returns:
        (``{"probe_fine_top1", "probe_coarse_top1"}``, fine-class log-probabilities (N_photos, C_fine) in
        ``class_names(products, "category")`` order, for text -> image ranking by the probe).
        ({}, None) without held-out photos or training photos.
    """
    import torch

    from dashclip_core.baselines.softmax_regression import SoftmaxRegression

    train = products[products["image_uri"].notna() & ~products["product_id"].isin(set(photos["product_id"]))]
    if photos.empty or train.empty:
        return {}, None
    x_train, x_test = pooled.of(train["product_id"]), pooled.of(photos["product_id"])
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # standardise: the probe's L2 then treats features alike
    x_train, x_test = ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)
    out, fine_log_probs = {}, None
    for col, name in ZERO_SHOT_LEVELS:
        classes = class_names(products, col)
        index = {c: i for i, c in enumerate(classes)}
        y = train[col].astype(str).map(index).to_numpy()
        probe = SoftmaxRegression(x_train.shape[1], l2=PROBE_L2, seed=seed, n_classes=len(classes)).fit(x_train, y, steps=PROBE_STEPS)
        out[f"probe_{name}_top1"] = float((probe.predict(x_test) == photos[col].astype(str).map(index).to_numpy()).mean())
        if name == "fine":
            with torch.no_grad():
                fine_log_probs = torch.log_softmax(probe.linear(torch.from_numpy(x_test)), dim=1).numpy()
    return out, fine_log_probs
