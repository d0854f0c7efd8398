"""Stage-1 image-text contrastive loss (BLIP / ALBEF ITC) with multi-positive targets for repeated products."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dashclip_core.losses.output import LossOutput


class ImageTextContrastiveLoss(nn.Module):
    r"""Image-text contrastive loss (ITC) between L2-normalised product image and title embeddings.

    With s_ij = scale * <v_i, t_j> (image i, text j; scale = 1/temperature) and soft targets
    y_ij = same_ij / n_i, where same_ij = [product_ids[i] == product_ids[j]] and n_i = sum_j same_ij:
        L_i2t = -1/B sum_i sum_j y_ij log softmax_j(s_i.)        (each image against all texts)
        L_t2i = -1/B sum_i sum_j y_ij log softmax_j(s_.i)        (each text against all images)
        L_itc = (L_i2t + L_t2i) / 2
    same is symmetric and n_i = n_j wherever same_ij holds, so one target matrix serves both directions.

    References: BLIP, Li et al. 2022 (arXiv 2201.12086), Sec. 3.2 "Pre-training Objectives", ITC paragraph,
    which follows ALBEF, Li et al. 2021 (arXiv 2107.07651), Sec. 3.2, Eq. 1-2. The multi-positive targets are
    BLIP's retrieval fine-tuning ``sim_targets = pos_idx / pos_idx.sum(1)``: in a catalog the same product can
    appear twice in a batch, and treating its second copy as a negative would push a product away from itself.
    BLIP's momentum encoders, feature queues and momentum-distilled targets (``alpha``) are not part of this loss.

    Inputs:
        image_emb: (B, D) image embeddings, expected L2-normalised (not normalised here).
        text_emb: (B, D) text embeddings of the same B products, row-aligned with ``image_emb``.
        product_ids: (B,) integer ids; equal ids mark positives.

    Output: :class:`LossOutput` with ``loss`` = L_itc and parts ``loss_i2t``, ``loss_t2i``, ``scale``.

    Relations:
        - With all ids distinct the targets are the identity and this is the plain symmetric CLIP loss
          (Radford et al. 2021, Fig. 3), i.e. InfoNCE (van den Oord et al. 2018, arXiv 1807.03748, Eq. 4) both ways.
        - :meth:`similarities` returns the scaled (B, B) logits; stage 1 feeds them (detached) to
          :func:`dashclip_core.losses.matching.sample_itm_negatives` to draw hard negatives for
          :class:`~dashclip_core.losses.matching.ImageTextMatchingLoss`, as BLIP does.
        - :class:`~dashclip_core.losses.qcc.QueryCatalogContrastiveLoss` (stage 2) is the one-directional,
          product-anchored, label-weighted counterpart for queries.

    Args:
        temperature: initial temperature; learned as ``log_scale = log(1/temperature)``.
        learn_temperature: if False, ``log_scale`` gets no gradient and the scale stays fixed.
        max_scale: the scale is clamped to at most this (100 as in CLIP) so the logits cannot blow up. Above the
            bound the clamp passes no gradient to ``log_scale``, which therefore stops growing there.

    Example:
        >>> itc = ImageTextContrastiveLoss(temperature=0.07)
        >>> img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
        >>> out = itc(img, txt, torch.tensor([0, 1, 1, 2]))
        >>> sorted(out.parts)
        ['loss_i2t', 'loss_t2i', 'scale']
    """

    def __init__(self, temperature: float = 0.07, learn_temperature: bool = True, max_scale: float = 100.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if max_scale <= 0:
            raise ValueError(f"max_scale must be > 0, got {max_scale}")
        self.max_scale = max_scale
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)

    @property
    def scale(self) -> Tensor:
        """scale = 1/temperature = exp(log_scale), clamped to ``max_scale``; a () Tensor with autograd history."""
        return self.log_scale.exp().clamp(max=self.max_scale)

    def similarities(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """Scaled image-to-text logits s_ij = scale * <v_i, t_j>, shape (B, B); the text-to-image logits are ``.T``.

        Keeps the autograd graph; detach before hard-negative sampling.
        """
        _check_embeddings(image_emb, text_emb)
        return self.scale * image_emb @ text_emb.T  # (B, B)

    def forward(self, image_emb: Tensor, text_emb: Tensor, product_ids: Tensor) -> LossOutput:
        """Compute L_itc; see the class docstring for shapes and the formula."""
        sim_i2t = self.similarities(image_emb, text_emb)  # (B, B)
        targets = multi_positive_targets(product_ids, batch_size=sim_i2t.shape[0]).to(sim_i2t.dtype)  # (B, B)
        loss_i2t = F.cross_entropy(sim_i2t, targets)
        loss_t2i = F.cross_entropy(sim_i2t.T, targets.T)
        parts = {"loss_i2t": loss_i2t, "loss_t2i": loss_t2i, "scale": self.scale}
        return LossOutput((loss_i2t + loss_t2i) / 2, parts)

    def extra_repr(self) -> str:
        return f"temperature={1.0 / self.scale.item():.4g}, learn_temperature={self.log_scale.requires_grad}"


def multi_positive_targets(product_ids: Tensor, batch_size: int) -> Tensor:
    """BLIP's soft ITC targets: y_ij = [id_i == id_j] / (number of copies of id_i in the batch), shape (B, B) float.

    Raises:
        ValueError: if ``product_ids`` is not a (batch_size,) integer tensor.
    """
    if product_ids.shape != (batch_size,):
        raise ValueError(f"product_ids has shape {tuple(product_ids.shape)}, expected ({batch_size},): one id per row")
    if product_ids.is_floating_point() or product_ids.is_complex():
        raise ValueError(
            f"product_ids must be an integer tensor (map string ids to ints first), got {product_ids.dtype}"
        )
    same = product_ids[:, None] == product_ids[None, :]  # (B, B), symmetric, True on the diagonal
    return same.float() / same.sum(dim=1, keepdim=True)


def _check_embeddings(image_emb: Tensor, text_emb: Tensor) -> None:
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} must both be (B, D) with equal shapes"
        )
