"""ALBEF/BLIP momentum machinery for stage-1 ITC: an EMA copy of the encoder, feature queues, and the
momentum-distilled contrastive loss.

References: ALBEF, Li et al. 2021 (arXiv 2107.07651), Sec. 3.2 (ITC with queues of momentum features,
Eq. 1-2) and Sec. 3.3 "Momentum Distillation" (Eq. 5); BLIP, Li et al. 2022 (arXiv 2201.12086), Sec. 3.2,
which keeps ALBEF's momentum encoder and queues for ITC. Code: ALBEF ``models/model_retrieval.py``
(``copy_params``, ``_momentum_update``, ``_dequeue_and_enqueue``), BLIP ``models/blip_retrieval.py``.

One training step, in ALBEF's order (names as in :mod:`dashclip_core.training.stage1`)::

    image_emb, text_emb = online encoder(batch)                               # (B, D) each, with grad
    with torch.no_grad():
        momentum.update(online_encoder, m)                                    # (1) EMA from the last optimizer step
        image_emb_m, text_emb_m = momentum.module encodes the same batch      # (B, D) each
    out = md_itc(gather_with_grad(image_emb), gather_with_grad(text_emb),
                 gather_no_grad(image_emb_m), gather_no_grad(text_emb_m), gather_no_grad(group_ids),
                 queue=queue, alpha=alpha)                                    # (2) loss against batch + queue
    queue.enqueue(gather_no_grad(image_emb_m), gather_no_grad(text_emb_m), gather_no_grad(group_ids))  # (3)
    out.loss.backward(); optimizer.step()                                     # (4)

Enqueue comes after the loss, so a batch is never its own queue negative/positive twice; it may come
before ``backward`` because the loss copies the queue (``torch.cat``) rather than saving the buffers.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from dashclip_core.losses.contrastive import ImageTextContrastiveLoss
from dashclip_core.losses.output import LossOutput

EMPTY_GROUP_ID = -1  # group id of a queue slot that was never written; real group ids must be >= 0


def unwrap_module(module: nn.Module) -> nn.Module:
    """The wrapped module of a ``DistributedDataParallel`` / ``DataParallel``; any other module unchanged."""
    return module.module if isinstance(module, (DistributedDataParallel, DataParallel)) else module


@torch.no_grad()
def momentum_update_(momentum_module: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place: p_m <- m * p_m + (1 - m) * p for every parameter, and copy every buffer (ALBEF ``_momentum_update``).

    Parameters and buffers are paired by name, so ``momentum_module`` must be a copy of ``online`` (same
    names, same shapes); frozen parameters of ``online`` are averaged too (they do not move, so neither
    does their copy). Buffers (e.g. BatchNorm running statistics) are copied, not averaged.

    Args:
        momentum_module: the EMA copy, updated in place.
        online: the trained module; a DDP / DataParallel wrapper is unwrapped (``.module``) first.
        momentum: m in [0, 1]; 1 keeps the copy unchanged, 0 copies ``online``. ALBEF and BLIP use 0.995.

    Raises:
        ValueError: if ``momentum`` is outside [0, 1], or a parameter or buffer is missing on either side or
            has a different shape (the copy was not made from this module).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    online = unwrap_module(online)
    for kind, m_named, o_named in (
        ("parameter", momentum_module.named_parameters(), online.named_parameters()),
        ("buffer", momentum_module.named_buffers(), online.named_buffers()),
    ):
        m_tensors, o_tensors = dict(m_named), dict(o_named)
        if m_tensors.keys() != o_tensors.keys():
            only_m = sorted(m_tensors.keys() - o_tensors.keys())[:5]
            only_o = sorted(o_tensors.keys() - m_tensors.keys())[:5]
            raise ValueError(
                f"momentum copy and online module have different {kind}s: only in the copy {only_m}, only online "
                f"{only_o}; build the copy from this module (pass the unwrapped model, not e.g. its DDP parent)"
            )
        for name, t_m in m_tensors.items():
            t = o_tensors[name]
            if t_m.shape != t.shape:
                raise ValueError(f"{kind} {name!r}: momentum copy {tuple(t_m.shape)} != online {tuple(t.shape)}")
            if kind == "parameter":
                t_m.mul_(momentum).add_(t.detach(), alpha=1.0 - momentum)
            else:
                t_m.copy_(t)


class MomentumEncoder(nn.Module):
    """A frozen EMA copy of an encoder (ALBEF Sec. 3.3: "exponential-moving-average versions" of the encoders).

    The copy is a ``deepcopy`` with ``requires_grad=False`` on every parameter, so the optimizer (our
    ``parameter_groups`` skips frozen parameters) and DDP's gradient all-reduce both ignore it. As a
    submodule of the training model it lands in ``state_dict`` (keys ``<name>.module.*``) and follows
    ``.to(device)`` and ``.train()`` / ``.eval()``; ALBEF keeps the momentum model in train mode (dropout on).

    Args:
        online: the encoder to copy. A DDP / DataParallel wrapper is unwrapped first; preferably pass the
            unwrapped module (inside the DDP model's ``forward``, ``self.encoder`` already is).

    Example:
        >>> enc = nn.Linear(4, 2)
        >>> momentum = MomentumEncoder(enc)
        >>> momentum.update(enc, momentum=0.995)  # once per step, before computing momentum features
        >>> momentum(torch.randn(3, 4)).requires_grad
        False
    """

    def __init__(self, online: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(unwrap_module(online))
        self.module.requires_grad_(False)

    def update(self, online: nn.Module, momentum: float) -> None:
        """EMA step p_m <- momentum * p_m + (1 - momentum) * p; see :func:`momentum_update_`."""
        momentum_update_(self.module, online, momentum)

    def forward(self, *args, **kwargs):
        """Call the copy without building a graph. For other entry points (``encode_image``) use
        ``self.module.<method>`` under ``torch.no_grad()``."""
        with torch.no_grad():
            return self.module(*args, **kwargs)


class FeatureQueue(nn.Module):
    """Ring buffer of the most recent momentum image/text features and their group ids (ALBEF ``image_queue``,
    ``text_queue``, ``idx_queue``, ``queue_ptr``), registered as buffers so they are saved in checkpoints.

    Empty slots hold zero features and group id ``EMPTY_GROUP_ID`` (-1); :meth:`valid_mask` marks the written
    slots and :class:`MomentumDistillationITCLoss` masks the rest out of the softmax. (ALBEF/BLIP start from
    random unit features, which act as fake negatives until the queue has been filled once.)

    :meth:`enqueue` is equivalent to writing the rows one by one at ``queue_ptr`` and advancing it modulo
    ``queue_size``, so any batch size works (ALBEF asserts ``queue_size % batch_size == 0`` instead); a
    batch larger than the queue keeps only its last ``queue_size`` rows. Because any pointer value is valid,
    the LAVIS workaround of resetting ``queue_ptr`` after loading a checkpoint is not needed here.

    Under data parallelism enqueue the *gathered* global batch (``gather_no_grad``) on every rank, so every
    rank holds the same queue, as in ALBEF's ``_dequeue_and_enqueue``.

    Args:
        queue_size: number of slots M (ALBEF: 65,536; BLIP retrieval: 57,600).
        dim: feature dimension D (the projection's ``embed_dim``).
        dtype: dtype of the stored features; features are cast to it on enqueue.

    Raises:
        ValueError: if ``queue_size`` or ``dim`` is < 1.
    """

    image_queue: Tensor
    text_queue: Tensor
    group_id_queue: Tensor
    queue_ptr: Tensor

    def __init__(self, queue_size: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if queue_size < 1 or dim < 1:
            raise ValueError(f"queue_size and dim must be >= 1, got queue_size={queue_size}, dim={dim}")
        self.register_buffer("image_queue", torch.zeros(queue_size, dim, dtype=dtype))  # (M, D)
        self.register_buffer("text_queue", torch.zeros(queue_size, dim, dtype=dtype))  # (M, D)
        self.register_buffer("group_id_queue", torch.full((queue_size,), EMPTY_GROUP_ID, dtype=torch.long))  # (M,)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # () next slot to write

    @property
    def queue_size(self) -> int:
        return self.image_queue.shape[0]

    @property
    def dim(self) -> int:
        return self.image_queue.shape[1]

    def valid_mask(self) -> Tensor:
        """(M,) bool: True for slots that hold a real item."""
        return self.group_id_queue != EMPTY_GROUP_ID

    def num_filled(self) -> int:
        """Number of written slots (syncs with the device; for logging and tests)."""
        return int(self.valid_mask().sum())

    @torch.no_grad()
    def enqueue(self, image_feats: Tensor, text_feats: Tensor, group_ids: Tensor) -> None:
        """Write N items at ``queue_ptr`` (wrapping around) and advance the pointer by N modulo ``queue_size``.

        Args:
            image_feats: (N, D) unit momentum image features, already gathered from all workers.
            text_feats: (N, D) unit momentum text features, row-aligned with ``image_feats``.
            group_ids: (N,) integer group ids >= 0.

        Raises:
            ValueError: on mismatched shapes, a wrong D, non-integer ids, or a negative id (-1 marks empty slots).
        """
        n = image_feats.shape[0]
        if image_feats.ndim != 2 or image_feats.shape != text_feats.shape or image_feats.shape[1] != self.dim:
            raise ValueError(
                f"image_feats {tuple(image_feats.shape)} and text_feats {tuple(text_feats.shape)} must both be "
                f"(N, {self.dim}) to enter a queue of dim {self.dim}"
            )
        _check_group_ids(group_ids, n)
        if bool((group_ids < 0).any()):
            raise ValueError(
                f"group_ids must be >= 0 to enter the queue ({EMPTY_GROUP_ID} marks empty slots), got min "
                f"{int(group_ids.min())}"
            )
        # Rows before `start` would be overwritten within this call; dropping them keeps the scatter free of
        # duplicate slots, whose write order is undefined on CUDA.
        start = max(0, n - self.queue_size)
        slots = (self.queue_ptr + torch.arange(start, n, device=self.queue_ptr.device)) % self.queue_size  # (n-start,)
        self.image_queue[slots] = image_feats[start:].detach().to(self.image_queue.dtype)
        self.text_queue[slots] = text_feats[start:].detach().to(self.text_queue.dtype)
        self.group_id_queue[slots] = group_ids[start:].to(torch.long)
        self.queue_ptr.copy_((self.queue_ptr + n) % self.queue_size)

    def extra_repr(self) -> str:
        return f"queue_size={self.queue_size}, dim={self.dim}"


class MomentumDistillationITCLoss(ImageTextContrastiveLoss):
    r"""ITC against the current batch plus a queue of momentum features, with momentum-distilled soft targets
    (ALBEF/BLIP ``loss_ita`` with ``distill=True``), generalised to multi-positive group ids.

    Candidates (1): the momentum features of the batch followed by the queue,
        T' = [text_emb_m; text_queue],  V' = [image_emb_m; image_queue],  ids' = [group_ids; group_id_queue]
    (K = B + M columns). Logits (2), with scale = 1/temperature:
        s_i2t = scale * image_emb @ T'^T,   s_t2i = scale * text_emb @ V'^T                         (B, K)
    Ground truth (3): y_ik = [group_ids[i] == ids'_k] / n_i, with n_i the number of such k (every column of
    the same group, queue items included, is a positive; the batch diagonal guarantees n_i >= 1).
    Pseudo-targets (4) from the momentum features against the same candidates, without gradient:
        q_i2t = softmax(scale * image_emb_m @ T'^T),   q_t2i = softmax(scale * text_emb_m @ V'^T)
        y~_i2t = alpha * q_i2t + (1 - alpha) * y,     y~_t2i = alpha * q_t2i + (1 - alpha) * y
    Loss (5):
        L_i2t = -1/B sum_i sum_k y~_i2t[i, k] log softmax_k(s_i2t[i, .]);   L_t2i likewise;   L = (L_i2t + L_t2i) / 2
    Empty queue slots (never written) get logit -inf in (2) and (4) and target 0 in (3), so a queue that is not
    full yet gives exactly the loss of the written slots alone.

    References: ALBEF, Li et al. 2021 (arXiv 2107.07651): Eq. 1-2 (Sec. 3.2) define p^i2t, p^t2i over the
    queue of momentum features and L_itc = 1/2 E[H(y^i2t, p^i2t) + H(y^t2i, p^t2i)]; Eq. 5 (Sec. 3.3) is
    L_itc^mod = (1 - alpha) L_itc + alpha/2 E[KL(q^i2t || p^i2t) + KL(q^t2i || p^t2i)]. Step (5) is the
    cross-entropy against the blended target, as in ALBEF's and BLIP's code; it equals Eq. 5 plus
    alpha/2 * (H(q^i2t) + H(q^t2i)), a term without gradient, so the gradients are Eq. 5's. BLIP, Li et al.
    2022 (arXiv 2201.12086), Sec. 3.2 keeps this ITC. Multi-positive ``y`` is BLIP/ALBEF retrieval's
    ``pos_idx / pos_idx.sum(1)`` over ``idx_all = [idx; idx_queue]``.

    Inputs:
        image_emb, text_emb: (B, D) online unit embeddings, with gradient.
        image_emb_m, text_emb_m: (B, D) momentum unit embeddings of the same items; detached here.
        group_ids: (B,) integer ids; equal ids are positives, within the batch and against the queue.
        queue: a :class:`FeatureQueue` of dim D, or None for in-batch candidates only. Read, not modified.
        alpha: distillation weight in [0, 1]; ALBEF/BLIP use 0.4, ramped linearly from 0 during the first epoch
            (ALBEF ``Retrieval.py``: ``alpha * min(1, i / len(data_loader))`` in epoch 0).

    Output: :class:`LossOutput` with ``loss`` = L and parts ``loss_itc`` (= L), ``loss_i2t``, ``loss_t2i``, ``scale``.

    Relations:
        - Subclasses :class:`~dashclip_core.losses.contrastive.ImageTextContrastiveLoss`: the same ``log_scale``
          parameter (init log(1/temperature), clamp to ``max_scale``), so a checkpoint of either loads into the
          other, and the same :meth:`similarities` for ITM hard-negative sampling.
        - With alpha = 0, no (or an empty) queue and momentum features equal to the online ones, the loss value
          equals :class:`ImageTextContrastiveLoss`'s; the gradient differs, since here the candidates
          (momentum features) carry none.

    Args:
        temperature: initial temperature; learned as ``log_scale = log(1/temperature)``.
        learn_temperature: if False, ``log_scale`` gets no gradient and the scale stays fixed.
        max_scale: the scale is clamped to at most this (100 as in CLIP).

    Example:
        >>> loss_fn = MomentumDistillationITCLoss(temperature=0.07)
        >>> queue = FeatureQueue(queue_size=16, dim=8)
        >>> img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
        >>> ids = torch.tensor([0, 1, 1, 2])
        >>> out = loss_fn(img, txt, img.detach(), txt.detach(), ids, queue=queue, alpha=0.4)
        >>> queue.enqueue(img.detach(), txt.detach(), ids)
        >>> sorted(out.parts)
        ['loss_i2t', 'loss_itc', 'loss_t2i', 'scale']
    """

    def forward(  # type: ignore[override]  # adds momentum features, queue and alpha to the parent's inputs
        self,
        image_emb: Tensor,
        text_emb: Tensor,
        image_emb_m: Tensor,
        text_emb_m: Tensor,
        group_ids: Tensor,
        *,
        queue: FeatureQueue | None = None,
        alpha: float,
    ) -> LossOutput:
        """Compute L; see the class docstring for shapes and the numbered steps."""
        embs = {"image_emb": image_emb, "text_emb": text_emb, "image_emb_m": image_emb_m, "text_emb_m": text_emb_m}
        if image_emb.ndim != 2 or any(t.shape != image_emb.shape for t in embs.values()):
            shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in embs.items())
            raise ValueError(f"{shapes}: all four must be (B, D) with equal shapes")
        batch_size, dim = image_emb.shape
        _check_group_ids(group_ids, batch_size)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if queue is not None and queue.dim != dim:
            raise ValueError(f"queue has dim {queue.dim} but the embeddings have D={dim}")
        image_emb_m, text_emb_m = image_emb_m.detach(), text_emb_m.detach()

        # (1) candidates; torch.cat copies the queue, so enqueue before backward cannot corrupt the graph.
        if queue is None:
            image_cand, text_cand, cand_ids = image_emb_m, text_emb_m, group_ids  # (B, D), (B, D), (B,)
            empty = torch.zeros(batch_size, dtype=torch.bool, device=group_ids.device)  # (K,) with K = B
        else:
            image_cand = torch.cat([image_emb_m, queue.image_queue.to(image_emb_m.dtype)])  # (K, D), K = B + M
            text_cand = torch.cat([text_emb_m, queue.text_queue.to(text_emb_m.dtype)])  # (K, D)
            cand_ids = torch.cat([group_ids.to(torch.long), queue.group_id_queue])  # (K,)
            empty = torch.cat([torch.zeros_like(group_ids, dtype=torch.bool), ~queue.valid_mask()])  # (K,)

        # (2) logits; empty slots get -inf, i.e. probability 0 in every softmax.
        scale = self.scale
        sim_i2t = (scale * image_emb @ text_cand.T).masked_fill(empty, float("-inf"))  # (B, K)
        sim_t2i = (scale * text_emb @ image_cand.T).masked_fill(empty, float("-inf"))  # (B, K)

        # (3) multi-positive ground truth, shared by both directions.
        same = (group_ids[:, None] == cand_ids[None, :]) & ~empty  # (B, K)
        targets = same.to(sim_i2t.dtype) / same.sum(dim=1, keepdim=True)  # (B, K), rows sum to 1

        # (4) momentum pseudo-targets, blended with the ground truth (skipped at alpha = 0: exactly y).
        targets_i2t, targets_t2i = targets, targets
        if alpha > 0:
            with torch.no_grad():
                scale_m = scale.detach()
                sim_i2t_m = (scale_m * image_emb_m @ text_cand.T).masked_fill(empty, float("-inf"))  # (B, K)
                sim_t2i_m = (scale_m * text_emb_m @ image_cand.T).masked_fill(empty, float("-inf"))  # (B, K)
                targets_i2t = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * targets
                targets_t2i = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * targets

        # (5) cross-entropy with soft targets, both directions.
        loss_i2t = _soft_cross_entropy(sim_i2t, targets_i2t, empty)
        loss_t2i = _soft_cross_entropy(sim_t2i, targets_t2i, empty)
        loss = (loss_i2t + loss_t2i) / 2
        return LossOutput(loss, {"loss_itc": loss, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i, "scale": scale})


def _soft_cross_entropy(logits: Tensor, targets: Tensor, empty: Tensor) -> Tensor:
    """-1/B sum_i sum_k targets_ik log softmax_k(logits_i.), skipping empty columns.

    ``F.cross_entropy`` would compute 0 * log(0) = 0 * -inf = nan at the masked columns; zeroing the
    log-probabilities there first keeps both the value and the gradient finite.
    """
    log_p = F.log_softmax(logits, dim=1).masked_fill(empty, 0.0)  # (B, K)
    return -(targets * log_p).sum(dim=1).mean()


def _check_group_ids(group_ids: Tensor, n: int) -> None:
    if group_ids.shape != (n,):
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, expected ({n},): one id per row")
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
