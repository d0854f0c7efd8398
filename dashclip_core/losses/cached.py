"""GradCache for the stage-2 QCC loss: a large batch of queries, the memory of one mini-batch.

References: GradCache, Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup" (arXiv 2101.06983), Sec. 3; the code follows sentence-transformers' ``CachedMultipleNegativesRankingLoss``
(steps (1)(2)(3), ``RandContext``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import get_device_states, set_device_states

from dashclip_core.losses.output import LossOutput
from dashclip_core.losses.qcc import QueryCatalogContrastiveLoss


class RandContext:
    """Saves the CPU (and CUDA, for the devices of ``tensors``) RNG state when built; entering it restores
    that state inside a forked RNG, so a second forward pass draws the same dropout masks as the first, and
    leaving it puts back the RNG state from before entering (the global RNG stream is not disturbed).

    Same as sentence-transformers' ``RandContext`` (and ``torch.utils.checkpoint``'s RNG handling).

    Args:
        tensors: tensors whose CUDA devices' RNG states are saved as well (CPU tensors add nothing).
    """

    def __init__(self, *tensors: Tensor) -> None:
        self.fwd_cpu_state = torch.get_rng_state()
        self.fwd_gpu_devices, self.fwd_gpu_states = get_device_states(*tensors)
        self._fork: AbstractContextManager | None = None

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.fwd_gpu_devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.fwd_cpu_state)
        set_device_states(self.fwd_gpu_devices, self.fwd_gpu_states)

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        assert self._fork is not None, "RandContext.__exit__ without __enter__"
        self._fork.__exit__(exc_type, exc_val, exc_tb)
        self._fork = None


def cached_qcc_step(
    query_encoder: nn.Module,
    loss_fn: QueryCatalogContrastiveLoss,
    product_emb: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    positive_mask: Tensor | None,
    n_hard: int,
    hard_mask: Tensor | None,
    mini_batch_size: int,
    no_sync: Callable[[], AbstractContextManager] | None = None,
) -> LossOutput:
    r"""One stage-2 loss + backward with GradCache: the same loss and gradients as ``Stage2Model.forward``
    followed by ``loss.backward()``, but the query encoder only ever holds activations for
    ``mini_batch_size`` queries.

    The QCC loss couples every query with every anchor, so the batch cannot simply be split into
    gradient-accumulation steps. GradCache (Gao et al. 2021, arXiv 2101.06983, Sec. 3) splits the backward
    pass at the embeddings instead: the loss depends on the encoder only through the (N, D) query embeddings,
    so d loss / d theta = sum_n (d loss / d q_n) . (d q_n / d theta), and each chunk's share can be computed
    on its own once d loss / d q is known.

        (1) Embed all N queries in chunks of ``mini_batch_size`` under ``torch.no_grad()``, saving the RNG state
            before each chunk (:class:`RandContext`).
        (2) Compute the loss on the detached (N, D) embedding matrix with ``requires_grad=True`` and backward it:
            this caches G = d loss / d q (N, D) and accumulates the gradient of the loss's own parameters (a
            learnable ``log_scale``) and of ``product_emb`` if it requires grad, as a plain backward would.
        (3) For each chunk, restore its RNG state (so dropout draws the same masks as in (1)), embed it again with
            gradients and call ``torch.autograd.backward(q_chunk, G_chunk)``: parameter gradients accumulate in
            ``.grad`` chunk by chunk.

    The backward has already run when this returns: the caller goes straight to ``opt.step()`` and must NOT
    call ``loss.backward()`` (the returned loss is detached, so doing it raises). Check ``torch.isfinite(loss)``
    before ``opt.step()`` and zero the gradients if it is not finite; they were accumulated anyway.

    Under DistributedDataParallel each chunk's backward in (3) would all-reduce the gradients, N / mini_batch_size
    times per step. Pass ``no_sync=ddp_module.no_sync``: every chunk except the last then runs (forward and backward)
    inside it, so gradients accumulate locally and the last chunk's backward all-reduces them once. Two caveats:
    DDP only syncs gradients when the forward goes through the DDP wrapper, so ``query_encoder`` must be the
    DDP-wrapped encoder itself (not ``ddp_model.module.query_encoder``, whose gradients would silently stay
    local); and ``loss_fn``'s gradient from (2) is computed outside any DDP forward, so a learnable temperature
    must be all-reduced by hand (or kept fixed, the QCC default). Every rank must use the same N and
    ``mini_batch_size`` (the same number of DDP forwards and backwards).

    Other differences from a plain step: modules with running statistics (BatchNorm) update them twice, once in
    (1) and once in (3); with dropout, the masks match a plain forward over the same chunks, not one full-batch
    forward (a full batch draws its masks in one go). A ``torch.autocast`` context should enclose the whole call;
    a ``GradScaler`` is not supported (the backward in (2) happens here, unscaled).

    Args:
        query_encoder: ``query_encoder(input_ids, attention_mask) -> (n, D)`` unit-norm query embeddings, in the
            mode (train / eval) the step should use.
        loss_fn: the QCC loss.
        product_emb: (B, D) frozen anchor product embeddings.
        input_ids: (N, T) token ids, N = B + B * n_hard, laid out as in ``Stage2Model.forward``: the B positive
            queries, then the hard negatives row-major per anchor (rows B + i * n_hard + k, k < n_hard, belong to
            anchor i).
        attention_mask: (N, T), as ``input_ids``.
        labels: (B,) relevance 1 or 2 of (p_i, q_i).
        positive_mask: optional (B, B) bool, see :class:`QueryCatalogContrastiveLoss`.
        n_hard: hard-negative queries per anchor, H >= 0.
        hard_mask: (B, H) bool, True for real (non-padding) hard negatives; ignored when ``n_hard == 0``.
        mini_batch_size: queries embedded at once in (1) and (3); >= 1. At >= N there is one chunk.
        no_sync: optional context-manager factory (``ddp_model.no_sync``) entered for every chunk of (3) but the last.

    Returns:
        :class:`LossOutput` with ``loss`` detached (the backward is done) and the QCC ``parts``.

    Raises:
        ValueError: ``mini_batch_size`` < 1, ``n_hard`` < 0, or ``input_ids`` / ``attention_mask`` not of shape
            (B + B*n_hard, T).
    """
    if mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
    if n_hard < 0:
        raise ValueError(f"n_hard must be >= 0, got {n_hard}")
    batch_size = product_emb.shape[0]
    n_queries = batch_size * (1 + n_hard)
    if input_ids.ndim != 2 or input_ids.shape[0] != n_queries or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be "
            f"(B + B*n_hard, T) = ({n_queries}, T) for B={batch_size}, n_hard={n_hard}: the B positive queries, "
            f"then each anchor's n_hard hard negatives"
        )
    chunks = [(input_ids[s : s + mini_batch_size], attention_mask[s : s + mini_batch_size])
              for s in range(0, n_queries, mini_batch_size)]

    # Step (1): embed without a graph; remember each chunk's RNG state so (3) can replay its dropout.
    rand_states: list[RandContext] = []
    with torch.no_grad():
        emb_chunks = []
        for ids, mask in chunks:
            rand_states.append(RandContext(ids, mask))
            emb_chunks.append(query_encoder(ids, mask))  # (n, D)
    query_emb = torch.cat(emb_chunks).detach().requires_grad_()  # (N, D), a leaf: its .grad is the cache
    del emb_chunks

    # Step (2): the loss on the cached embeddings; backward fills query_emb.grad and the loss's own parameters.
    hard = query_emb[batch_size:].view(batch_size, n_hard, -1) if n_hard else None  # (B, H, D)
    out = loss_fn(product_emb, query_emb[:batch_size], labels, positive_mask=positive_mask,
                  hard_neg_query_emb=hard, hard_neg_mask=hard_mask if n_hard else None)
    out.loss.backward()
    grad_cache = query_emb.grad.split(mini_batch_size)  # chunks of (n, D), aligned with `chunks`

    # Step (3): re-embed each chunk with a graph under its replayed RNG state and push the cached gradient through.
    if any(p.requires_grad for p in query_encoder.parameters()):  # a frozen encoder has nothing to accumulate
        last = len(chunks) - 1
        for k, ((ids, mask), grad, rand_state) in enumerate(zip(chunks, grad_cache, rand_states)):
            sync_ctx = no_sync() if no_sync is not None and k < last else contextlib.nullcontext()
            with sync_ctx, rand_state:
                chunk_emb = query_encoder(ids, mask)  # (n, D)
                torch.autograd.backward(chunk_emb, grad)
    return LossOutput(out.loss.detach(), out.parts)
