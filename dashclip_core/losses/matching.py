"""Stage-1 image-text matching (BLIP ITM): hard-negative sampling and the binary matching loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dashclip_core.losses.output import LossOutput


class ITMNegatives(NamedTuple):
    """Hard negatives drawn by :func:`sample_itm_negatives`; unpacks as ``text_idx, image_idx, valid``.

    Attributes:
        text_idx: (B,) long, for image i the index of its negative text; -1 where ``valid`` is False.
        image_idx: (B,) long, for text i the index of its negative image; -1 where ``valid`` is False.
        valid: (B,) bool, False for rows whose every batch item shares their product_id (no negative exists).
    """

    text_idx: Tensor
    image_idx: Tensor
    valid: Tensor


@torch.no_grad()
def sample_itm_negatives(sim_i2t: Tensor, product_ids: Tensor, generator: torch.Generator, rows: Tensor | None = None) -> ITMNegatives:
    """Sample one hard negative text per image and one hard negative image per text, as BLIP does for ITM.

    Steps (BLIP, Li et al. 2022, arXiv 2201.12086, Sec. 3.2, ITM paragraph; the strategy is ALBEF's,
    arXiv 2107.07651, Sec. 3.2: in-batch negatives with a higher contrastive similarity are more likely to be
    sampled):
        (1) same_ij = [product_ids[i] == product_ids[j]]; every same-product entry, the diagonal included, is a
            positive and can never be drawn.
        (2) w_i2t[i, j] = softmax_j(sim_i2t[i, j]) over the j with not same_ij, 0 elsewhere; w_t2i likewise on
            sim_i2t.T. The softmax is taken over the allowed entries only, which is proportional to BLIP's
            "softmax over all, then zero the positives" (so it samples the same distribution) but cannot
            underflow to an all-zero row, so BLIP's ``+ 1e-4`` is not needed.
        (3) torch.multinomial draws one index per row from w (sampled, not the argmax: hard but random),
            for all rows at once.
        (4) Rows with no allowed entry get index -1 and ``valid`` False.

    Data-parallel training (BLIP's ``concat_all_gather``): each worker passes the *global* (G, G) matrix over every
    worker's items and ``rows``, the global indices of its own items; it draws negatives for those rows only,
    from all G candidates, so a worker's image can be matched against a text another worker encoded. The
    returned indices then point into the global batch. ``rows=None`` means every row (one worker).

    Invalid rows: row i has no negative exactly when every id in the batch equals product_ids[i], i.e. when the
    batch holds a single distinct product, so in this square, in-batch setting ``valid`` is either all True or
    all False. The caller must drop invalid rows (``idx[valid]``) before indexing; do not index with the -1
    entries (torch would silently wrap them to the last row). With ``valid.any()`` False, skip ITM negatives for
    the step.

    Args:
        sim_i2t: (B, B) image-to-text similarities, usually the scaled logits of
            :meth:`ImageTextContrastiveLoss.similarities`; gradients are never taken through it.
        product_ids: (B,) integer product ids, row-aligned with both the images and the texts.
        generator: torch.Generator on ``sim_i2t.device``; seeds the draws so they can be replayed.
        rows: (R,) long, the rows to draw for (this worker's items in the global batch); None for all B.

    Returns:
        :class:`ITMNegatives` ``(text_idx (R,), image_idx (R,), valid (R,))``, indices into the B columns.

    Raises:
        ValueError: on a non-square ``sim_i2t``, mismatched ``product_ids``, or a generator on another device.
    """
    if sim_i2t.ndim != 2 or sim_i2t.shape[0] != sim_i2t.shape[1]:
        raise ValueError(f"sim_i2t has shape {tuple(sim_i2t.shape)}, expected a square (B, B) in-batch matrix")
    batch_size = sim_i2t.shape[0]
    if product_ids.shape != (batch_size,):
        raise ValueError(f"product_ids has shape {tuple(product_ids.shape)}, expected ({batch_size},)")
    if generator.device.type != sim_i2t.device.type:
        raise ValueError(
            f"generator is on {generator.device} but sim_i2t is on {sim_i2t.device}; "
            f"create it with torch.Generator(device=sim_i2t.device)"
        )

    if rows is None:
        rows = torch.arange(batch_size, device=sim_i2t.device)
    elif rows.ndim != 1 or bool(((rows < 0) | (rows >= batch_size)).any()):
        raise ValueError(f"rows must be a 1-D tensor of indices in [0, {batch_size}), got {rows.tolist()}")

    # Step (1)
    same = product_ids[rows][:, None] == product_ids[None, :]  # (R, B); same product for text or image alike
    valid = ~same.all(dim=1)  # (R,)
    # Step (2): at least float32, so bf16/fp16 logits do not lose the ordering of close similarities.
    sim = sim_i2t.detach().to(torch.promote_types(sim_i2t.dtype, torch.float32))  # (B, B)
    # Invalid rows get uniform weights only so that multinomial accepts them; their draw is overwritten in step (4).
    blocked = same & valid[:, None]  # (R, B); ids match both ways, so it masks both directions
    weights_i2t = sim[rows].masked_fill(blocked, float("-inf")).softmax(dim=1)  # (R, B)
    weights_t2i = sim.T[rows].masked_fill(blocked, float("-inf")).softmax(dim=1)  # (R, B)
    # Step (3)
    text_idx = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)  # (R,)
    image_idx = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)  # (R,)
    # Step (4)
    text_idx = text_idx.masked_fill(~valid, -1)
    image_idx = image_idx.masked_fill(~valid, -1)
    return ITMNegatives(text_idx, image_idx, valid)


def itm_labels(batch_size: int, num_neg: int, device: torch.device | str | None = None) -> Tensor:
    """ITM targets ``[1] * batch_size + [0] * num_neg`` (long), matching logits laid out positives first.

    BLIP concatenates B positive pairs, then B (image, negative text) and B (negative image, text) pairs, so
    ``num_neg = 2 * B``; after dropping invalid rows of :func:`sample_itm_negatives` it is ``2 * valid.sum()``.
    """
    if batch_size < 0 or num_neg < 0:
        raise ValueError(f"batch_size ({batch_size}) and num_neg ({num_neg}) must be >= 0")
    return torch.cat(
        [torch.ones(batch_size, dtype=torch.long, device=device), torch.zeros(num_neg, dtype=torch.long, device=device)]
    )


class ImageTextMatchingLoss(nn.Module):
    r"""Image-text matching (ITM) loss: binary cross-entropy over "match" / "no match" logits.

        L_itm = -1/N sum_n log softmax(itm_logits[n])[itm_labels[n]]      (class 1 = the pair matches)

    Reference: BLIP, Li et al. 2022 (arXiv 2201.12086), Sec. 3.2, ITM paragraph (ALBEF, arXiv 2107.07651,
    Sec. 3.2, Eq. 3). The ITM head sits on the image-grounded text encoder, so it sees (image, text) *pairs*; the
    trainer builds them:
        (1) ITC similarities -> :func:`sample_itm_negatives` (one hard negative text per image and image per text);
        (2) pairs = B positives, then (image_i, text_neg_i) and (image_neg_j, text_j) for the valid rows;
        (3) the fusion encoder + ITM head give ``itm_logits`` (N, 2); labels from :func:`itm_labels`.

    Inputs:
        itm_logits: (N, 2) logits, column 1 = "matches".
        itm_labels: (N,) long in {0, 1}.

    Output: :class:`LossOutput` with ``loss`` = L_itm and parts ``loss_itm``, ``itm_accuracy`` (fraction of pairs
    whose argmax equals the label).

    Relations: complements :class:`~dashclip_core.losses.contrastive.ImageTextContrastiveLoss` (ITC aligns the two
    unimodal embeddings; ITM learns fine-grained pair matching on the fused representation, and its hard negatives
    come from ITC's similarities). Stage 1 minimises L_itc + itm_weight * L_itm.
    """

    def forward(self, itm_logits: Tensor, itm_labels: Tensor) -> LossOutput:
        """Compute L_itm; see the class docstring for shapes."""
        if itm_logits.ndim != 2 or itm_logits.shape[1] != 2:
            raise ValueError(f"itm_logits has shape {tuple(itm_logits.shape)}, expected (N, 2)")
        if itm_labels.shape != itm_logits.shape[:1]:
            raise ValueError(f"itm_labels has shape {tuple(itm_labels.shape)}, expected ({itm_logits.shape[0]},)")
        loss_itm = F.cross_entropy(itm_logits, itm_labels)
        itm_accuracy = (itm_logits.argmax(dim=1) == itm_labels).float().mean()
        return LossOutput(loss_itm, {"loss_itm": loss_itm, "itm_accuracy": itm_accuracy})
