"""Stage-2 query-catalog contrastive (QCC) loss: trains the query encoder into the frozen product space."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dashclip_core.losses.output import LossOutput


class QueryCatalogContrastiveLoss(nn.Module):
    r"""Product-anchored, label-weighted InfoNCE between products and relevant search queries.

    Row i of the batch is a product p_i with a query q_i relevant to it (label 1 = moderately, 2 = highly
    relevant). With scale = 1/temperature, s_ij = scale * <p_i, q_j> and h_ik = scale * <p_i, n_ik> for the
    optional hard-negative queries n_ik (label-0 queries of product i, k < H, used where hard_neg_mask[i, k]):
        C_i = {i} + {in-batch j : not positive_mask[i, j]} + {hard negatives k : hard_neg_mask[i, k]}
        L_i = -w_i * log( exp(s_ii) / (sum_{j in C_i, in batch} exp(s_ij) + sum_{k in C_i, hard} exp(h_ik)) )
        w_i = 1 if labels[i] == 2 else moderate_weight
        L_qcc = sum_i L_i / sum_i w_i
    In-batch queries that are also relevant to p_i (positive_mask off the diagonal: the same query string, or
    the same product in two rows) are left out of the denominator rather than pushed away as false negatives.

    References: DashCLIP, Gurjar et al. 2025 (arXiv 2504.07110), Sec. 3, query-catalog contrastive loss of the
    second (query alignment) stage; InfoNCE, van den Oord et al. 2018 (arXiv 1807.03748), Eq. 4. The section
    number was not checked against the PDF. The label weights w_i, the false-negative mask and the extra
    hard-negative queries are dashclip's handling of graded 0/1/2 labels, not taken from the paper's formula.

    Inputs:
        product_emb: (B, D) product embeddings from the frozen stage-1 encoder, expected L2-normalised.
        query_emb: (B, D) query embeddings, row-aligned with ``product_emb``, expected L2-normalised.
        labels: (B,) integer relevance of (p_i, q_i), each 1 or 2. Label-0 pairs belong in the hard negatives.
        positive_mask: optional (B, B) bool, True where q_j is relevant to p_i; default the identity. The
            diagonal is always treated as positive, whatever the mask says. See :func:`qcc_positive_mask`.
        hard_neg_query_emb: optional (B, H, D) embeddings of irrelevant queries for each product, padded.
        hard_neg_mask: optional (B, H) bool, True for real (non-padding) hard negatives; default all True.

    Output: :class:`LossOutput` with ``loss`` = L_qcc and parts ``loss_qcc``, ``pos_sim`` (mean cosine
    <p_i, q_i>), ``hardest_neg_sim`` (mean over rows of the largest cosine among row i's negatives, in-batch
    and hard; NaN if no row has a negative) and ``scale``.

    Relations:
        - With labels all 2, no hard negatives and the default mask, L_qcc is the one-directional (product ->
          query) half of :class:`~dashclip_core.losses.contrastive.ImageTextContrastiveLoss` with distinct ids:
          ``F.cross_entropy(scale * product_emb @ query_emb.T, arange(B))``.
        - Only the product -> query direction is trained: the product side is a fixed catalog index, and
          stage 2 moves the query encoder towards it.

    Args:
        temperature: temperature (initial one if learned); stored as ``log_scale = log(1/temperature)``.
        moderate_weight: weight w_i of label-1 (moderately relevant) rows; label-2 rows weigh 1. Must be > 0.
        learn_temperature: if True, ``log_scale`` is trained; by default the temperature stays fixed.
        max_scale: the scale is clamped to at most this, as in the ITC loss.
    """

    def __init__(
        self,
        temperature: float = 0.05,
        moderate_weight: float = 0.5,
        learn_temperature: bool = False,
        max_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if moderate_weight <= 0:
            raise ValueError(
                f"moderate_weight must be > 0, got {moderate_weight}; drop label-1 rows from the batch instead of "
                f"weighting them 0"
            )
        if max_scale <= 0:
            raise ValueError(f"max_scale must be > 0, got {max_scale}")
        self.moderate_weight = moderate_weight
        self.max_scale = max_scale
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)

    @property
    def scale(self) -> Tensor:
        """scale = 1/temperature = exp(log_scale), clamped to ``max_scale``; a () Tensor with autograd history."""
        return self.log_scale.exp().clamp(max=self.max_scale)

    def forward(
        self,
        product_emb: Tensor,
        query_emb: Tensor,
        labels: Tensor,
        positive_mask: Tensor | None = None,
        hard_neg_query_emb: Tensor | None = None,
        hard_neg_mask: Tensor | None = None,
    ) -> LossOutput:
        """Compute L_qcc; see the class docstring for shapes and the formula."""
        batch_size = _check_inputs(product_emb, query_emb, labels, positive_mask, hard_neg_query_emb, hard_neg_mask)
        eye = torch.eye(batch_size, dtype=torch.bool, device=product_emb.device)  # (B, B)
        positives = eye if positive_mask is None else positive_mask | eye  # (B, B)
        negatives = ~positives  # (B, B): in-batch queries that count as negatives of anchor i
        sim = product_emb @ query_emb.T  # (B, B) cosine
        if hard_neg_query_emb is not None:
            hard_sim = torch.einsum("bd,bhd->bh", product_emb, hard_neg_query_emb)  # (B, H)
            if hard_neg_mask is None:
                hard_neg_mask = torch.ones(hard_sim.shape, dtype=torch.bool, device=hard_sim.device)
            sim = torch.cat([sim, hard_sim], dim=1)  # (B, B + H)
            negatives = torch.cat([negatives, hard_neg_mask], dim=1)  # (B, B + H)
            eye = torch.cat([eye, torch.zeros_like(hard_neg_mask)], dim=1)  # (B, B + H)

        scale = self.scale
        logits = (scale * sim).masked_fill(~(negatives | eye), float("-inf"))  # (B, B + H)
        nll = torch.logsumexp(logits, dim=1) - logits[:, :batch_size].diagonal()  # (B,) = -log softmax at the positive
        weights = torch.where(labels == 2, 1.0, self.moderate_weight).to(nll.dtype)  # (B,)
        loss_qcc = (weights * nll).sum() / weights.sum()

        with torch.no_grad():
            hardest = sim.masked_fill(~negatives, float("-inf")).amax(dim=1)  # (B,), -inf where row i has no negative
            has_negative = negatives.any(dim=1)  # (B,)
            hardest_neg_sim = hardest[has_negative].mean()  # NaN when no row has a negative
            pos_sim = sim[:, :batch_size].diagonal().mean()
        parts = {"loss_qcc": loss_qcc, "pos_sim": pos_sim, "hardest_neg_sim": hardest_neg_sim, "scale": scale}
        return LossOutput(loss_qcc, parts)

    def extra_repr(self) -> str:
        return (
            f"temperature={1.0 / self.scale.item():.4g}, moderate_weight={self.moderate_weight}, "
            f"learn_temperature={self.log_scale.requires_grad}"
        )


def qcc_positive_mask(product_ids: Tensor, query_ids: Tensor) -> Tensor:
    """The (B, B) ``positive_mask`` known from the batch itself: q_j is relevant to p_i if it is the same query
    as q_i (relevant to p_i by construction) or if p_j is the same product as p_i (q_j is relevant to p_j).

    Relevance known only from the label table (q_j labelled relevant to p_i in some other row) is not covered;
    OR it in if the data loader has it.

    Args:
        product_ids: (B,) integer product ids.
        query_ids: (B,) integer query ids (map query strings to ints in the data loader).
    """
    if product_ids.ndim != 1 or product_ids.shape != query_ids.shape:
        raise ValueError(
            f"product_ids {tuple(product_ids.shape)} and query_ids {tuple(query_ids.shape)} must both be (B,)"
        )
    same_product = product_ids[:, None] == product_ids[None, :]  # (B, B)
    same_query = query_ids[:, None] == query_ids[None, :]  # (B, B)
    return same_product | same_query


def _check_inputs(
    product_emb: Tensor,
    query_emb: Tensor,
    labels: Tensor,
    positive_mask: Tensor | None,
    hard_neg_query_emb: Tensor | None,
    hard_neg_mask: Tensor | None,
) -> int:
    """Validate shapes and label values; return B."""
    if product_emb.ndim != 2 or product_emb.shape != query_emb.shape:
        raise ValueError(
            f"product_emb {tuple(product_emb.shape)} and query_emb {tuple(query_emb.shape)} must both be (B, D)"
        )
    batch_size, dim = product_emb.shape
    if labels.shape != (batch_size,):
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected ({batch_size},)")
    bad = (labels != 1) & (labels != 2)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"labels must be 1 or 2 (relevant pairs only); rows {rows} have {labels[rows].tolist()}. "
            f"Pass label-0 queries as hard_neg_query_emb instead"
        )
    if positive_mask is not None and (
        positive_mask.shape != (batch_size, batch_size) or positive_mask.dtype != torch.bool
    ):
        raise ValueError(
            f"positive_mask must be a ({batch_size}, {batch_size}) bool tensor, "
            f"got {tuple(positive_mask.shape)} {positive_mask.dtype}"
        )
    if hard_neg_query_emb is None:
        if hard_neg_mask is not None:
            raise ValueError("hard_neg_mask was given without hard_neg_query_emb")
        return batch_size
    if hard_neg_query_emb.ndim != 3 or hard_neg_query_emb.shape[0] != batch_size or hard_neg_query_emb.shape[2] != dim:
        raise ValueError(
            f"hard_neg_query_emb has shape {tuple(hard_neg_query_emb.shape)}, expected ({batch_size}, H, {dim})"
        )
    if hard_neg_mask is not None and (
        hard_neg_mask.shape != hard_neg_query_emb.shape[:2] or hard_neg_mask.dtype != torch.bool
    ):
        raise ValueError(
            f"hard_neg_mask must be a {tuple(hard_neg_query_emb.shape[:2])} bool tensor, "
            f"got {tuple(hard_neg_mask.shape)} {hard_neg_mask.dtype}"
        )
    return batch_size
