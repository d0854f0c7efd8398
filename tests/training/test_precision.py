"""Mixed precision (train.amp) and the non-finite-step guard of both training loops."""

from __future__ import annotations

import pytest
import torch

from dashclip_core.training.precision import MixedPrecision, NonFiniteLossError, autocast_dtype


@pytest.mark.parametrize(("mode", "device", "dtype"), [
    ("auto", "cuda", torch.bfloat16), ("auto", "cpu", None), ("bf16", "cpu", torch.bfloat16),
    ("fp16", "cuda", torch.float16), ("off", "cuda", None),
])
def test_amp_mode_resolves_to_the_autocast_dtype(mode, device, dtype):
    assert autocast_dtype(mode, device) is dtype


def test_an_unknown_amp_mode_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match=r"train\.amp must be one of .*'float8'"):
        autocast_dtype("float8", "cuda")


def _model_and_opt(lr: float = 0.1):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=lr)


def _loss(model, poison: bool = False):
    out = model(torch.ones(2, 4)).pow(2).mean()
    return out * float("nan") if poison else out


def test_bf16_autocast_is_active_inside_the_context_on_cpu():
    precision = MixedPrecision("bf16", torch.device("cpu"), 0, "stage1")
    model, _ = _model_and_opt()
    with precision.autocast():
        assert model(torch.ones(2, 4)).dtype is torch.bfloat16
    assert model(torch.ones(2, 4)).dtype is torch.float32
    assert precision.name == "bf16" and precision.scaler is None


def test_a_non_finite_step_is_skipped_and_never_reaches_the_weights():
    precision = MixedPrecision("off", torch.device("cpu"), 3, "stage2")
    model, opt = _model_and_opt()
    before = [p.detach().clone() for p in model.parameters()]

    loss = _loss(model, poison=True)
    opt.zero_grad()
    precision.backward(loss)
    assert precision.step(opt, loss, epoch=0, step=0) is False
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) and p.grad is None  # untouched, and the NaN gradients are gone
    assert precision.skipped_in_a_row == 1 and precision.skipped_total == 1

    loss = _loss(model)
    opt.zero_grad()
    precision.backward(loss)
    assert precision.step(opt, loss, epoch=0, step=1) is True
    assert not torch.equal(model.weight, before[0]) and torch.isfinite(model.weight).all()
    assert precision.skipped_in_a_row == 0 and precision.skipped_total == 1  # a good step resets the streak only


def test_finite_loss_with_non_finite_gradient_is_skipped_too():
    precision = MixedPrecision("off", torch.device("cpu"), 3, "stage1")
    model, opt = _model_and_opt()
    loss = _loss(model)
    opt.zero_grad()
    loss.backward()
    model.weight.grad[0, 0] = float("inf")
    assert precision.step(opt, loss, 0, 0) is False


def test_too_many_skipped_steps_in_a_row_fail_the_run_with_where_and_what_to_do():
    precision = MixedPrecision("off", torch.device("cpu"), 2, "stage1")
    model, opt = _model_and_opt()
    for step in range(2):
        loss = _loss(model, poison=True)
        precision.backward(loss)
        assert precision.step(opt, loss, epoch=1, step=step) is False
    loss = _loss(model, poison=True)
    precision.backward(loss)
    with pytest.raises(NonFiniteLossError, match=r"stage1: 3 training steps in a row .*epoch 1, step 7.*train\.stage1_lr.*max_nonfinite_steps=2"):
        precision.step(opt, loss, epoch=1, step=7)


def test_zero_tolerance_fails_on_the_first_non_finite_step():
    precision = MixedPrecision("off", torch.device("cpu"), 0, "stage2")
    model, opt = _model_and_opt()
    loss = _loss(model, poison=True)
    precision.backward(loss)
    with pytest.raises(NonFiniteLossError, match="stage2: 1 training steps"):
        precision.step(opt, loss, 0, 0)


def test_fp16_scales_the_loss_skips_an_overflow_and_lowers_the_scale():
    precision = MixedPrecision("fp16", torch.device("cpu"), 5, "stage2")
    assert precision.scaler is not None and precision.name == "fp16"
    model, opt = _model_and_opt()
    scale = precision.scaler.get_scale()

    loss = _loss(model)
    opt.zero_grad()
    precision.backward(loss)
    # the gradient was computed on the scaled loss ...
    plain = torch.autograd.grad(_loss(model), model.weight)[0]
    torch.testing.assert_close(model.weight.grad, plain * scale)
    before = model.weight.detach().clone()
    assert precision.step(opt, loss, 0, 0) is True
    # ... and unscaled before the update: SGD moved the weight by lr * the true gradient
    torch.testing.assert_close(model.weight.detach(), before - 0.1 * plain)

    loss = _loss(model)
    opt.zero_grad()
    precision.backward(loss)
    model.weight.grad[0, 0] = float("inf")  # an fp16 overflow
    after_good = model.weight.detach().clone()
    assert precision.step(opt, loss, 0, 1) is False
    assert torch.equal(model.weight.detach(), after_good)
    assert precision.scaler.get_scale() == scale * precision.scaler.get_backoff_factor()

    # the scale survives a checkpoint (a resumed fp16 run does not start over at 2**16)
    restored = MixedPrecision("fp16", torch.device("cpu"), 5, "stage2")
    restored.load_state_dict(precision.state_dict())
    assert restored.scaler.get_scale() == precision.scaler.get_scale() and restored.skipped_total == 1


def test_the_guard_agrees_across_ddp_workers(tmp_path):
    """A loss that is NaN on one gloo worker only makes *every* worker skip, so the replicas stay identical."""
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0]["applied"] == results[1]["applied"] == [True, False, True]
    torch.testing.assert_close(results[0]["weight"], results[1]["weight"], rtol=0, atol=0)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        precision = MixedPrecision("off", torch.device("cpu"), 5, "stage1")
        model, opt = _model_and_opt()
        applied = []
        for step in range(3):
            # rank 1's loss is NaN at step 1; its gradients stay finite (nothing is all-reduced here), so only the
            # all-reduced verdict keeps rank 0 from stepping alone
            loss = _loss(model)
            opt.zero_grad()
            loss.backward()
            if rank == 1 and step == 1:
                loss = loss * float("nan")
            applied.append(precision.step(opt, loss, 0, step))
        torch.save({"applied": applied, "weight": model.weight.detach().clone()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_stage1_step_under_bf16_autocast_matches_fp32_closely():
    """BLIP's ITC + ITM forward (towers, fusion, gathers, sampling) runs under CPU bf16 autocast; gradients stay fp32."""
    from pathlib import Path

    from dashclip_core.config import PipelineConfig
    from dashclip_core.training.stage1 import build_stage1

    cfg = PipelineConfig.from_file(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = build_stage1(cfg).train()
    data = torch.Generator().manual_seed(1)
    pixels = torch.randn(8, 3, cfg.model.image.image_size, cfg.model.image.image_size, generator=data)
    input_ids = torch.randint(5, 100, (8, 9), generator=data)
    input_ids[:, 0] = 2
    losses = {}
    for mode in ("off", "bf16"):
        precision = MixedPrecision(mode, torch.device("cpu"), 0, "stage1")
        model.zero_grad()
        with precision.autocast():
            loss, parts = model(pixels, input_ids, torch.ones(8, 9, dtype=torch.long), torch.arange(8), torch.Generator().manual_seed(0))
        precision.backward(loss)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(g.dtype is torch.float32 and torch.isfinite(g).all() for g in grads)
        losses[mode] = {k: float(parts[k].detach()) for k in ("loss_itc", "loss_itm")}
    assert losses["bf16"]["loss_itc"] == pytest.approx(losses["off"]["loss_itc"], rel=0.1)
    assert losses["bf16"]["loss_itm"] == pytest.approx(losses["off"]["loss_itm"], rel=0.15)
