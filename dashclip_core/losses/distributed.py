"""Gathering embeddings across data-parallel workers for contrastive losses.

With DDP every worker holds a slice of the global batch; a contrastive loss must see the whole batch
(every other item is a negative), or two workers of 16 train a different objective than one worker of
32. ``gather_with_grad`` concatenates the slices in rank order (the order ``shard_steps`` cut them), and
its backward sums each rank's gradient into the slice that produced it (torch.distributed.nn's autograd
all_gather). Every rank then computes the same global loss; DDP's gradient *average* of
``world_size`` identical objectives, each back-propagated through the summed all_gather, equals the
single-process gradient of that loss (open_clip's ``gather_features(gather_with_grad=True)``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


def gather_with_grad(x: Tensor) -> Tensor:
    """(B, ...) per rank -> (world_size * B, ...) in rank order; gradients flow back to every slice."""
    if world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Like :func:`gather_with_grad` for tensors that need no gradient (ids, labels); no autograd graph."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def rank() -> int:
    return torch.distributed.get_rank() if world_size() > 1 else 0


def local_rows(batch_size: int, device: torch.device | None = None) -> Tensor:
    """(B,) indices of this rank's items in the gathered global batch (rank order, equal slices)."""
    start = rank() * batch_size
    return torch.arange(start, start + batch_size, device=device)


def pad_to_global_max(x: Tensor, dim: int, value: float = 0.0) -> Tensor:
    """Pad ``x`` along ``dim`` to the longest size on any rank, so ranks whose tokenizer padded their
    slice to different lengths can all_gather. A no-op on one worker."""
    if world_size() == 1:
        return x
    longest = torch.tensor([x.shape[dim]], device=x.device)
    torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
    missing = int(longest.item()) - x.shape[dim]
    if missing == 0:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = missing
    return torch.cat([x, x.new_full(pad_shape, value)], dim=dim)
