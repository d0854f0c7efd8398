"""Mixed precision and the non-finite-step guard shared by both training loops.

``train.amp`` picks the autocast dtype: ``auto`` (bf16 on CUDA, full precision on CPU), ``bf16``, ``fp16``
or ``off``. bf16 keeps fp32's exponent range, so it needs no loss scaling; fp16 does, through
``torch.amp.GradScaler`` (the recipe of the PyTorch AMP docs: scale the loss, unscale before the step,
skip steps whose gradients overflowed and lower the scale).

The guard: a step whose loss or gradients are not finite is *skipped* (no optimizer update), so one bad
batch cannot turn every weight into NaN and silently poison the nightly model. A run that keeps producing
them is broken (a too-high learning rate, fp16 overflow the scaler cannot fix, corrupt inputs), so after
``train.max_nonfinite_steps`` skipped steps in a row it fails with a message naming the stage, epoch and step.

Under DDP every worker must take the same decision, or the replicas' weights drift apart (DDP syncs
gradients, not parameters). Gradients are averaged across workers in ``backward``, so a NaN on one worker
reaches all of them, but the loss is local: the verdict is all-reduced (one scalar per step).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

AMP_MODES = ("auto", "bf16", "fp16", "off")


def autocast_dtype(mode: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device_type`` ("cuda" / "cpu"); None = full precision."""
    if mode not in AMP_MODES:
        raise ValueError(f"train.amp must be one of {AMP_MODES}, got {mode!r}")
    if mode == "off" or (mode == "auto" and device_type != "cuda"):
        return None
    return torch.float16 if mode == "fp16" else torch.bfloat16


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive training steps had a non-finite loss or gradient."""


def _every_worker_agrees(ok: bool, device: torch.device) -> bool:
    """True when ``ok`` holds on every DDP worker (a MIN all-reduce; just ``ok`` outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


class MixedPrecision:
    """Autocast + (fp16) loss scaling + the non-finite-step guard for one training loop.

    Use per step::

        with precision.autocast():
            loss = model(...)
        opt.zero_grad(); precision.backward(loss)
        applied = precision.step(opt, loss, epoch, step)
    """

    def __init__(self, mode: str, device: torch.device, max_nonfinite_steps: int, stage: str) -> None:
        if max_nonfinite_steps < 0:
            raise ValueError(f"train.max_nonfinite_steps must be >= 0, got {max_nonfinite_steps}")
        self.device = torch.device(device)
        self.dtype = autocast_dtype(mode, self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype is torch.float16 else None
        self.max_nonfinite_steps = max_nonfinite_steps
        self.stage = stage
        self.skipped_in_a_row = 0
        self.skipped_total = 0

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call ``backward`` on (multiplied by the fp16 loss scale; unchanged otherwise)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, loss: torch.Tensor) -> None:
        self.scale(loss).backward()

    def step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, epoch: int, step: int) -> bool:
        """Apply the optimizer step if the loss and every gradient are finite on every worker, else skip it.

        Returns:
            True when the step was applied.

        Raises:
            NonFiniteLossError: this was the ``max_nonfinite_steps + 1``-th skipped step in a row.
        """
        if self.scaler is not None:
            self.scaler.unscale_(opt)  # true gradients, so the check and any clipping see real values
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        finite = bool(torch.isfinite(loss.detach()).all())
        if finite and grads:
            finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        finite = _every_worker_agrees(finite, self.device)
        if finite:
            if self.scaler is not None:
                self.scaler.step(opt)
                self.scaler.update()
            else:
                opt.step()
            self.skipped_in_a_row = 0
            return True
        if self.scaler is not None:
            self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())  # lower the scale, as on an overflow
        opt.zero_grad(set_to_none=True)
        self.skipped_in_a_row += 1
        self.skipped_total += 1
        if self.skipped_in_a_row > self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.stage}: {self.skipped_in_a_row} training steps in a row had a non-finite loss or gradient "
                f"(last: epoch {epoch}, step {step}, loss {float(loss.detach().float()):.4g}, precision {self.name}); "
                f"every one was skipped, none reached the weights. Lower train.{self.stage}_lr, set train.amp to bf16 or off, "
                f"or check the inputs; train.max_nonfinite_steps={self.max_nonfinite_steps} sets how many are tolerated")
        return False

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_total = int(state.get("skipped_total", 0))
