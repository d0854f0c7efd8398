"""Losses: small ``nn.Module``s that turn embeddings (never the model) into a :class:`LossOutput`.

Stage 1 (product encoders): :class:`ImageTextContrastiveLoss` (ITC) + :class:`ImageTextMatchingLoss` (ITM) with
hard negatives from :func:`sample_itm_negatives`. Stage 2 (query encoder): :class:`QueryCatalogContrastiveLoss`,
and :func:`cached_qcc_step` to compute it with GradCache for batches larger than memory.
"""

from dashclip_core.losses.cached import cached_qcc_step
from dashclip_core.losses.contrastive import ImageTextContrastiveLoss
from dashclip_core.losses.matching import ImageTextMatchingLoss, ITMNegatives, itm_labels, sample_itm_negatives
from dashclip_core.losses.momentum import FeatureQueue, MomentumDistillationITCLoss, MomentumEncoder, momentum_update_
from dashclip_core.losses.output import LossOutput
from dashclip_core.losses.qcc import QueryCatalogContrastiveLoss, qcc_positive_mask

__all__ = [
    "FeatureQueue",
    "ITMNegatives",
    "ImageTextContrastiveLoss",
    "ImageTextMatchingLoss",
    "LossOutput",
    "MomentumDistillationITCLoss",
    "MomentumEncoder",
    "QueryCatalogContrastiveLoss",
    "cached_qcc_step",
    "itm_labels",
    "momentum_update_",
    "qcc_positive_mask",
    "sample_itm_negatives",
]
