"""Momentum machinery (ALBEF/BLIP): EMA encoder copy, feature queue, momentum-distilled ITC."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dashclip_core.losses import (
    FeatureQueue,
    ImageTextContrastiveLoss,
    LossOutput,
    MomentumDistillationITCLoss,
    MomentumEncoder,
    momentum_update_,
)

f64 = torch.float64


def unit_rows(seed: int, n: int, d: int, dtype: torch.dtype = f64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


def exact_md(temperature: float, learn_temperature: bool = False) -> MomentumDistillationITCLoss:
    loss_fn = MomentumDistillationITCLoss(temperature=temperature, learn_temperature=learn_temperature).double()
    with torch.no_grad():  # log_scale starts as float32; make it exact so hand values match to 1e-12
        loss_fn.log_scale.fill_(math.log(1.0 / temperature))
    return loss_fn


def filled_queue(queue_size: int, image: torch.Tensor, text: torch.Tensor, ids: list[int]) -> FeatureQueue:
    queue = FeatureQueue(queue_size, image.shape[1], dtype=image.dtype)
    queue.enqueue(image, text, torch.tensor(ids))
    return queue


def reference_md_itc(img, txt, img_m, txt_m, ids, q_img, q_txt, q_ids, scale: float, alpha: float) -> torch.Tensor:
    """The docstring's steps (1)-(5), row by row, with explicit exp/log (no softmax/cross_entropy helpers)."""
    text_cand = torch.cat([txt_m.detach(), q_txt])
    image_cand = torch.cat([img_m.detach(), q_img])
    cand_ids = list(ids) + list(q_ids)
    total = 0.0
    for anchors, anchors_m, cands in ((img, img_m.detach(), text_cand), (txt, txt_m.detach(), image_cand)):
        for i in range(len(ids)):
            s = scale * (cands @ anchors[i])  # (K,)
            s_m = scale * (cands @ anchors_m[i])  # (K,)
            q = torch.exp(s_m) / torch.exp(s_m).sum()
            log_p = s - torch.log(torch.exp(s).sum())
            pos = [k for k in range(len(cand_ids)) if cand_ids[k] == ids[i]]
            for k in range(len(cand_ids)):
                y = 1.0 / len(pos) if k in pos else 0.0
                total = total - (alpha * q[k] + (1 - alpha) * y) * log_p[k]
    return total / (2 * len(ids))


# ---- MomentumEncoder ---------------------------------------------------------------------------


def test_ema_update_hand_computed_m_09():
    # Given a 2->1 Linear copied at w=[1, 2], b=[3]; then the online weights move to w=[5, -2], b=[-1]
    online = nn.Linear(2, 1).double()
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[1.0, 2.0]]))
        online.bias.copy_(torch.tensor([3.0]))
    momentum = MomentumEncoder(online)
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[5.0, -2.0]]))
        online.bias.copy_(torch.tensor([-1.0]))
    # When one EMA step with m = 0.9
    momentum.update(online, momentum=0.9)
    # Then p_m = 0.9 * p_m + 0.1 * p: w = [0.9 + 0.5, 1.8 - 0.2] = [1.4, 1.6], b = 2.7 - 0.1 = 2.6
    torch.testing.assert_close(momentum.module.weight, torch.tensor([[1.4, 1.6]], dtype=f64))
    torch.testing.assert_close(momentum.module.bias, torch.tensor([2.6], dtype=f64))
    # And a second step compounds: w = 0.9 * [1.4, 1.6] + 0.1 * [5, -2] = [1.76, 1.24]
    momentum.update(online, momentum=0.9)
    torch.testing.assert_close(momentum.module.weight, torch.tensor([[1.76, 1.24]], dtype=f64))
    # And the online module is untouched
    torch.testing.assert_close(online.weight, torch.tensor([[5.0, -2.0]], dtype=f64))


def test_momentum_1_keeps_copy_and_0_copies_online():
    online = nn.Linear(3, 2)
    momentum = MomentumEncoder(online)
    before = momentum.module.weight.clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    momentum.update(online, momentum=1.0)
    assert torch.equal(momentum.module.weight, before)
    momentum.update(online, momentum=0.0)
    assert torch.equal(momentum.module.weight, online.weight)


def test_buffers_are_copied_not_averaged():
    online = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    momentum = MomentumEncoder(online)
    online.train()(torch.randn(8, 2))  # moves running_mean / running_var, num_batches_tracked = 1
    momentum.update(online, momentum=0.9)
    assert torch.equal(momentum.module[1].running_mean, online[1].running_mean)
    assert torch.equal(momentum.module[1].running_var, online[1].running_var)
    assert momentum.module[1].num_batches_tracked.item() == 1


def test_momentum_copy_has_no_grad_and_is_independent():
    online = nn.Linear(4, 3)
    momentum = MomentumEncoder(online)
    assert all(not p.requires_grad for p in momentum.parameters())
    assert all(p.requires_grad for p in online.parameters())
    # Distinct storage: an optimizer step on online does not leak into the copy.
    assert all(pm.data_ptr() != p.data_ptr() for pm, p in zip(momentum.parameters(), online.parameters()))
    x = torch.randn(2, 4, requires_grad=True)
    y = momentum(x)
    assert not y.requires_grad
    torch.testing.assert_close(y, online(x).detach())
    online(x).sum().backward()
    assert all(p.grad is None for p in momentum.parameters())


def test_update_rejects_a_module_it_was_not_copied_from():
    momentum = MomentumEncoder(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"'weight': momentum copy \(3, 4\) != online \(5, 4\)"):
        momentum.update(nn.Linear(4, 5), momentum=0.9)
    with pytest.raises(ValueError, match="only online"):
        momentum.update(nn.Sequential(nn.Linear(4, 3)), momentum=0.9)  # names "0.weight" vs "weight"
    with pytest.raises(ValueError, match="momentum must be in"):
        momentum.update(nn.Linear(4, 3), momentum=1.5)


def test_update_unwraps_distributed_data_parallel(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        online = nn.Linear(3, 2)
        ddp = DistributedDataParallel(online)
        momentum = MomentumEncoder(ddp)
        assert isinstance(momentum.module, nn.Linear)
        assert set(momentum.state_dict()) == {"module.weight", "module.bias"}
        start = momentum.module.weight.clone()
        with torch.no_grad():
            online.weight.add_(1.0)
        momentum.update(ddp, momentum=0.75)
        torch.testing.assert_close(momentum.module.weight, 0.75 * start + 0.25 * online.weight.detach())
    finally:
        dist.destroy_process_group()


def test_momentum_update_function_matches_method():
    online = nn.Linear(3, 3)
    a, b = MomentumEncoder(online), MomentumEncoder(online)
    with torch.no_grad():
        online.weight.mul_(-2.0)
    a.update(online, 0.3)
    momentum_update_(b.module, online, 0.3)
    assert torch.equal(a.module.weight, b.module.weight)
    assert not torch.equal(a.module.weight, online.weight)


# ---- FeatureQueue ------------------------------------------------------------------------------


def naive_enqueue(slots: list, ptr: int, items: list) -> int:
    for item in items:
        slots[ptr] = item
        ptr = (ptr + 1) % len(slots)
    return ptr


def test_queue_starts_empty_with_sentinels():
    queue = FeatureQueue(queue_size=4, dim=3)
    assert queue.num_filled() == 0
    assert not queue.valid_mask().any()
    assert torch.equal(queue.group_id_queue, torch.full((4,), -1))
    assert torch.equal(queue.image_queue, torch.zeros(4, 3))
    assert queue.queue_ptr.item() == 0


def test_queue_ring_buffer_wraparound_and_pointer():
    queue = FeatureQueue(queue_size=5, dim=2, dtype=f64)

    def feats(ids: list[int], sign: float) -> torch.Tensor:  # row k = sign * [id, id + 0.5] identifies the item
        return sign * torch.tensor([[i, i + 0.5] for i in ids], dtype=f64)

    queue.enqueue(feats([0, 1, 2], 1), feats([0, 1, 2], -1), torch.tensor([0, 1, 2]))
    assert queue.queue_ptr.item() == 3
    assert queue.group_id_queue.tolist() == [0, 1, 2, -1, -1]
    assert queue.num_filled() == 3
    # 4 more items: slots 3, 4, then wrap to 0, 1
    queue.enqueue(feats([3, 4, 5, 6], 1), feats([3, 4, 5, 6], -1), torch.tensor([3, 4, 5, 6]))
    assert queue.queue_ptr.item() == 2
    assert queue.group_id_queue.tolist() == [5, 6, 2, 3, 4]
    torch.testing.assert_close(queue.image_queue, feats([5, 6, 2, 3, 4], 1))
    torch.testing.assert_close(queue.text_queue, feats([5, 6, 2, 3, 4], -1))
    assert queue.valid_mask().all()


@pytest.mark.parametrize("sizes", [[3, 4], [7], [2, 9], [5, 5, 1], [12, 3]])
def test_queue_matches_one_by_one_writes_for_any_batch_size(sizes):
    # Batches larger than the queue, and sizes that do not divide it (ALBEF asserts they do).
    queue = FeatureQueue(queue_size=5, dim=1, dtype=f64)
    slots, ptr, next_id = [-1] * 5, 0, 0
    for n in sizes:
        ids = list(range(next_id, next_id + n))
        next_id += n
        x = torch.tensor(ids, dtype=f64)[:, None]
        queue.enqueue(x, -x, torch.tensor(ids))
        ptr = naive_enqueue(slots, ptr, ids)
        assert queue.group_id_queue.tolist() == slots
        assert queue.queue_ptr.item() == ptr
        assert queue.image_queue[:, 0].tolist() == [float(s) if s >= 0 else 0.0 for s in slots]


def test_queue_state_dict_round_trip():
    queue = FeatureQueue(queue_size=4, dim=3)
    queue.enqueue(unit_rows(0, 3, 3, torch.float32), unit_rows(1, 3, 3, torch.float32), torch.tensor([7, 8, 9]))
    state = queue.state_dict()
    assert set(state) == {"image_queue", "text_queue", "group_id_queue", "queue_ptr"}
    restored = FeatureQueue(queue_size=4, dim=3)
    restored.load_state_dict(state)
    for name in state:
        assert torch.equal(getattr(restored, name), getattr(queue, name)), name
    # The restored pointer is live: the next write lands in the same slots in both.
    nxt = (unit_rows(2, 2, 3, torch.float32), unit_rows(3, 2, 3, torch.float32), torch.tensor([1, 2]))
    queue.enqueue(*nxt)
    restored.enqueue(*nxt)
    assert restored.group_id_queue.tolist() == queue.group_id_queue.tolist() == [2, 8, 9, 1]
    assert restored.queue_ptr.item() == 1


def test_queue_lives_in_a_parent_state_dict():
    parent = nn.Module()
    parent.queue = FeatureQueue(queue_size=2, dim=2)
    assert {"queue.image_queue", "queue.text_queue", "queue.group_id_queue", "queue.queue_ptr"} <= set(parent.state_dict())


def test_queue_enqueue_detaches_and_casts():
    queue = FeatureQueue(queue_size=2, dim=2, dtype=torch.float32)
    x = unit_rows(4, 1, 2).requires_grad_()
    queue.enqueue(x * 1.0, x * 1.0, torch.tensor([3], dtype=torch.int32))
    assert not queue.image_queue.requires_grad
    assert queue.image_queue.dtype == torch.float32 and queue.group_id_queue.dtype == torch.long


@pytest.mark.parametrize(
    ("image", "text", "ids", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([-1, 0]), ">= 0"),
        (torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([0, 1]), "dim 3"),
        (torch.zeros(2, 3), torch.zeros(1, 3), torch.tensor([0, 1]), "dim 3"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.0, 1.0]), "integer"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1, 2]), "one id per row"),
    ],
)
def test_queue_rejects_bad_input(image, text, ids, match):
    queue = FeatureQueue(queue_size=4, dim=3)
    with pytest.raises(ValueError, match=match):
        queue.enqueue(image, text, ids)
    assert queue.num_filled() == 0 and queue.queue_ptr.item() == 0


# ---- MomentumDistillationITCLoss ---------------------------------------------------------------


def test_hand_computed_2x2_with_one_queue_item_alpha_half():
    # Given scale 2, batch ids [10, 20] and one queue item of group 20 (a positive for row 1)
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=f64)
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=f64)
    img_m = torch.tensor([[0.8, 0.6], [0.0, 1.0]], dtype=f64)
    txt_m = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=f64)
    q_img, q_txt = torch.tensor([[0.6, -0.8]], dtype=f64), torch.tensor([[-0.8, 0.6]], dtype=f64)
    queue = filled_queue(1, q_img, q_txt, [20])
    # When
    out = exact_md(0.5)(img, txt, img_m, txt_m, torch.tensor([10, 20]), queue=queue, alpha=0.5)
    # Then, by hand, candidates T' = [txt_m0, txt_m1, q_txt], V' = [img_m0, img_m1, q_img]:
    s_i2t = torch.tensor([[2.0, 0.0, -1.6], [0.0, 2.0, 1.2]], dtype=f64)  # 2 * img @ T'^T
    s_t2i = torch.tensor([[1.6, 0.0, 1.2], [1.92, 1.6, -0.56]], dtype=f64)  # 2 * txt @ V'^T
    s_i2t_m = torch.tensor([[1.6, 1.2, -0.56], [0.0, 2.0, 1.2]], dtype=f64)  # 2 * img_m @ T'^T
    s_t2i_m = torch.tensor([[1.6, 0.0, 1.2], [1.2, 2.0, -1.6]], dtype=f64)  # 2 * txt_m @ V'^T
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], dtype=f64)  # the queue item shares row 1's group
    t_cand, v_cand = torch.cat([txt_m, q_txt]), torch.cat([img_m, q_img])
    for hand, exact in ((s_i2t, img @ t_cand.T), (s_t2i, txt @ v_cand.T), (s_i2t_m, img_m @ t_cand.T), (s_t2i_m, txt_m @ v_cand.T)):
        torch.testing.assert_close(hand, 2 * exact)  # the hand arithmetic above is right

    def direction(s: torch.Tensor, s_m: torch.Tensor) -> torch.Tensor:
        q = torch.exp(s_m) / torch.exp(s_m).sum(dim=1, keepdim=True)
        target = 0.5 * q + 0.5 * y
        log_p = s - torch.log(torch.exp(s).sum(dim=1, keepdim=True))
        return -(target * log_p).sum(dim=1).mean()

    i2t, t2i = direction(s_i2t, s_i2t_m), direction(s_t2i, s_t2i_m)
    assert isinstance(out, LossOutput)
    assert out.parts["loss_i2t"].item() == pytest.approx(i2t.item(), rel=1e-12)
    assert out.parts["loss_t2i"].item() == pytest.approx(t2i.item(), rel=1e-12)
    assert out.loss.item() == pytest.approx((i2t + t2i).item() / 2, rel=1e-12)
    assert out.parts["loss_itc"].item() == pytest.approx(out.loss.item(), rel=1e-15)
    assert out.parts["scale"].item() == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("ids", "rtol"),
    [
        ([0, 1, 2, 3, 4], 1e-13),
        ([4, 4, 1, 9, 1], 1e-13),
        # ITC builds its targets in float32 (same.float() / n), so 1/5 is rounded there: equal to float32 precision.
        ([2, 2, 2, 2, 2], 1e-7),
    ],
)
def test_alpha_0_empty_queue_equals_plain_itc(ids, rtol):
    # Given momentum features == online features, alpha 0, and a queue that was never written
    img, txt, group_ids = unit_rows(0, 5, 6), unit_rows(1, 5, 6), torch.tensor(ids)
    itc = ImageTextContrastiveLoss(temperature=0.07).double()
    md = MomentumDistillationITCLoss(temperature=0.07).double()
    queue = FeatureQueue(queue_size=8, dim=6, dtype=f64)
    # When
    plain = itc(img, txt, group_ids)
    for q in (queue, None):
        out = md(img, txt, img, txt, group_ids, queue=q, alpha=0.0)
        # Then the values equal ITC's, part by part
        torch.testing.assert_close(out.loss, plain.loss, rtol=rtol, atol=0)
        torch.testing.assert_close(out.parts["loss_i2t"], plain.parts["loss_i2t"], rtol=rtol, atol=0)
        torch.testing.assert_close(out.parts["loss_t2i"], plain.parts["loss_t2i"], rtol=rtol, atol=0)
        assert out.parts["scale"].item() == plain.parts["scale"].item()


def test_temperature_parameterisation_is_shared_with_itc():
    itc = ImageTextContrastiveLoss(temperature=0.05)
    md = MomentumDistillationITCLoss(temperature=0.05)
    assert list(md.state_dict()) == list(itc.state_dict()) == ["log_scale"]
    assert md.log_scale.item() == itc.log_scale.item() == pytest.approx(math.log(20.0))
    with torch.no_grad():
        itc.log_scale.fill_(math.log(1000.0))  # above max_scale: clamped the same way after loading
    md.load_state_dict(itc.state_dict())
    assert md.scale.item() == pytest.approx(100.0)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_not_full_queue_equals_queue_of_its_written_items(alpha):
    img, txt, img_m, txt_m = (unit_rows(s, 4, 5) for s in range(4))
    ids = torch.tensor([0, 1, 1, 2])
    q_img, q_txt = unit_rows(10, 3, 5), unit_rows(11, 3, 5)
    md = exact_md(0.1)
    # Given a queue of 8 slots with 3 written vs a full queue of exactly those 3
    partial = filled_queue(8, q_img, q_txt, [1, 5, 6])
    full = filled_queue(3, q_img, q_txt, [1, 5, 6])
    assert partial.num_filled() == 3
    # Then the 5 empty slots change nothing
    a = md(img, txt, img_m, txt_m, ids, queue=partial, alpha=alpha)
    b = md(img, txt, img_m, txt_m, ids, queue=full, alpha=alpha)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-13, atol=0)
    # And the written items do matter (so the equality above is not vacuous)
    c = md(img, txt, img_m, txt_m, ids, queue=None, alpha=alpha)
    assert abs(a.loss.item() - c.loss.item()) > 1e-3


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_empty_queue_equals_no_queue_value_and_gradient(alpha):
    img, txt = unit_rows(20, 4, 5).requires_grad_(), unit_rows(21, 4, 5).requires_grad_()
    img_m, txt_m, ids = unit_rows(22, 4, 5), unit_rows(23, 4, 5), torch.tensor([3, 3, 0, 1])
    md = exact_md(0.07)
    with_empty = md(img, txt, img_m, txt_m, ids, queue=FeatureQueue(16, 5, dtype=f64), alpha=alpha).loss
    without = md(img, txt, img_m, txt_m, ids, queue=None, alpha=alpha).loss
    torch.testing.assert_close(with_empty, without, rtol=1e-13, atol=0)
    g_empty = torch.autograd.grad(with_empty, (img, txt))
    g_none = torch.autograd.grad(without, (img, txt))
    for a, b in zip(g_empty, g_none):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_empty_slots_are_never_positives_even_for_group_id_minus_1():
    # -1 is the empty-slot id; a batch that uses it as a real group must not match the empty slots.
    img, txt = unit_rows(24, 3, 4), unit_rows(25, 3, 4)
    ids = torch.tensor([-1, 0, 1])
    md = exact_md(0.1)
    with_empty = md(img, txt, img, txt, ids, queue=FeatureQueue(4, 4, dtype=f64), alpha=0.0).loss
    without = md(img, txt, img, txt, ids, queue=None, alpha=0.0).loss
    torch.testing.assert_close(with_empty, without, rtol=1e-13, atol=0)


def test_matches_row_by_row_reference_value_and_gradients():
    ids = [4, 4, 1, 9]
    img, txt = unit_rows(30, 4, 6).requires_grad_(), unit_rows(31, 4, 6).requires_grad_()
    img_m, txt_m = unit_rows(32, 4, 6), unit_rows(33, 4, 6)
    q_img, q_txt, q_ids = unit_rows(34, 3, 6), unit_rows(35, 3, 6), [1, 7, 4]
    queue = filled_queue(5, q_img, q_txt, q_ids)  # 2 empty slots
    md = exact_md(0.2)
    loss = md(img, txt, img_m, txt_m, torch.tensor(ids), queue=queue, alpha=0.3).loss
    ref = reference_md_itc(img, txt, img_m, txt_m, ids, q_img, q_txt, q_ids, scale=5.0, alpha=0.3)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(torch.autograd.grad(loss, (img, txt)), torch.autograd.grad(ref, (img, txt))):
        torch.testing.assert_close(g, r)


def test_gradients_reach_online_embeddings_and_temperature_not_momentum_inputs():
    img, txt = unit_rows(40, 4, 6).requires_grad_(), unit_rows(41, 4, 6).requires_grad_()
    img_m, txt_m = unit_rows(42, 4, 6).requires_grad_(), unit_rows(43, 4, 6).requires_grad_()
    queue = filled_queue(4, unit_rows(44, 2, 6), unit_rows(45, 2, 6), [0, 5])
    md = MomentumDistillationITCLoss(temperature=0.07).double()
    md(img, txt, img_m, txt_m, torch.tensor([0, 1, 2, 2]), queue=queue, alpha=0.4).loss.backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert txt.grad is not None and txt.grad.abs().sum() > 0
    assert md.log_scale.grad is not None and md.log_scale.grad.abs().item() > 0
    assert img_m.grad is None and txt_m.grad is None
    assert not queue.image_queue.requires_grad


def test_fixed_temperature_gets_no_gradient():
    img = unit_rows(46, 3, 4).requires_grad_()
    md = exact_md(0.07, learn_temperature=False)
    md(img, unit_rows(47, 3, 4), unit_rows(48, 3, 4), unit_rows(49, 3, 4), torch.arange(3), alpha=0.4).loss.backward()
    assert md.log_scale.grad is None and img.grad is not None


def test_same_group_queue_items_are_positives():
    # Given scale 1 and alpha 0, image 0 (group 5) and a queue item of group 5 or of group 6
    img, txt = unit_rows(50, 2, 4), unit_rows(51, 2, 4)
    q_img, q_txt = unit_rows(52, 1, 4), unit_rows(53, 1, 4)
    md = exact_md(1.0)
    ids = torch.tensor([5, 8])
    same = md(img, txt, img, txt, ids, queue=filled_queue(2, q_img, q_txt, [5]), alpha=0.0)
    other = md(img, txt, img, txt, ids, queue=filled_queue(2, q_img, q_txt, [6]), alpha=0.0)
    # Then row 0 targets [1/2, 0, 1/2] over [txt_0, txt_1, q_txt] when the queue item shares its group
    s = torch.cat([txt, q_txt]) @ img[0]  # (3,)
    log_p = s - torch.log(torch.exp(s).sum())
    s1 = torch.cat([txt, q_txt]) @ img[1]
    row1 = -(s1[1] - torch.log(torch.exp(s1).sum()))
    expected_i2t = (-(0.5 * log_p[0] + 0.5 * log_p[2]) + row1) / 2
    assert same.parts["loss_i2t"].item() == pytest.approx(expected_i2t.item(), rel=1e-12)
    expected_other = (-log_p[0] + row1) / 2
    assert other.parts["loss_i2t"].item() == pytest.approx(expected_other.item(), rel=1e-12)


def test_a_queue_duplicate_of_the_positive_lowers_the_loss_only_when_labelled_positive():
    # An image aligned with a queued text: labelled positive, the loss falls; labelled negative, it rises.
    img, txt = unit_rows(60, 3, 4), unit_rows(61, 3, 4)
    q_txt = img[:1].clone()  # the queue text is exactly image 0's direction
    md = exact_md(0.1)
    ids = torch.tensor([0, 1, 2])
    pos = md(img, txt, img, txt, ids, queue=filled_queue(1, q_txt, q_txt, [0]), alpha=0.0).parts["loss_i2t"]
    neg = md(img, txt, img, txt, ids, queue=filled_queue(1, q_txt, q_txt, [9]), alpha=0.0).parts["loss_i2t"]
    none = md(img, txt, img, txt, ids, queue=None, alpha=0.0).parts["loss_i2t"]
    assert pos.item() < none.item() < neg.item()


def test_enqueue_before_backward_does_not_change_gradients():
    img, txt = unit_rows(70, 3, 4).requires_grad_(), unit_rows(71, 3, 4).requires_grad_()
    img_m, txt_m, ids = unit_rows(72, 3, 4), unit_rows(73, 3, 4), torch.tensor([0, 1, 2])
    md = exact_md(0.1)

    def grads(enqueue_first: bool) -> tuple[torch.Tensor, ...]:
        queue = filled_queue(3, unit_rows(74, 2, 4), unit_rows(75, 2, 4), [1, 4])
        loss = md(img, txt, img_m, txt_m, ids, queue=queue, alpha=0.4).loss
        if enqueue_first:
            queue.enqueue(unit_rows(76, 3, 4), unit_rows(77, 3, 4), torch.tensor([5, 6, 7]))  # overwrites every slot
        return torch.autograd.grad(loss, (img, txt))

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_parts_are_detached_and_named():
    img = unit_rows(80, 3, 4).requires_grad_()
    out = exact_md(0.1)(img, unit_rows(81, 3, 4), unit_rows(82, 3, 4), unit_rows(83, 3, 4), torch.arange(3), alpha=0.4)
    assert out.loss.requires_grad
    assert sorted(out.parts) == ["loss_i2t", "loss_itc", "loss_t2i", "scale"]
    assert not any(v.requires_grad for v in out.parts.values())


@pytest.mark.parametrize(
    ("shapes", "ids", "alpha", "queue_dim", "match"),
    [
        ([(3, 4), (3, 4), (3, 4), (2, 4)], torch.arange(3), 0.4, 4, "equal shapes"),
        ([(3, 4), (3, 5), (3, 4), (3, 4)], torch.arange(3), 0.4, 4, "equal shapes"),
        ([(3,), (3,), (3,), (3,)], torch.arange(3), 0.4, 4, r"\(B, D\)"),
        ([(3, 4)] * 4, torch.arange(2), 0.4, 4, "one id per row"),
        ([(3, 4)] * 4, torch.tensor([0.0, 1.0, 2.0]), 0.4, 4, "integer"),
        ([(3, 4)] * 4, torch.arange(3), 1.5, 4, "alpha"),
        ([(3, 4)] * 4, torch.arange(3), -0.1, 4, "alpha"),
        ([(3, 4)] * 4, torch.arange(3), 0.4, 5, "queue has dim 5"),
    ],
)
def test_bad_input_raises(shapes, ids, alpha, queue_dim, match):
    embs = [torch.randn(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        MomentumDistillationITCLoss()(*embs, ids, queue=FeatureQueue(4, queue_dim), alpha=alpha)


@st.composite
def md_batches(draw):
    n = draw(st.integers(1, 6))
    d = draw(st.integers(2, 5))
    queue_size = draw(st.integers(1, 8))
    n_queued = draw(st.integers(0, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    ids = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    q_ids = draw(st.lists(st.integers(0, 3), min_size=n_queued, max_size=n_queued))
    alpha = draw(st.sampled_from([0.0, 0.4, 1.0]))
    temperature = draw(st.sampled_from([0.01, 0.07, 1.0]))
    perm = draw(st.permutations(range(n)))
    return n, d, queue_size, seed, ids, q_ids, alpha, temperature, perm


@settings(max_examples=60, deadline=None)
@given(md_batches())
def test_property_finite_nonnegative_and_batch_permutation_invariant(batch):
    n, d, queue_size, seed, ids, q_ids, alpha, temperature, perm = batch
    img, txt, img_m, txt_m = (unit_rows(seed + k, n, d) for k in range(4))
    queue = FeatureQueue(queue_size, d, dtype=f64)
    if q_ids:
        queue.enqueue(unit_rows(seed + 4, len(q_ids), d), unit_rows(seed + 5, len(q_ids), d), torch.tensor(q_ids))
    md = exact_md(temperature)
    group_ids, p = torch.tensor(ids), torch.tensor(perm)
    loss = md(img, txt, img_m, txt_m, group_ids, queue=queue, alpha=alpha).loss
    permuted = md(img[p], txt[p], img_m[p], txt_m[p], group_ids[p], queue=queue, alpha=alpha).loss
    assert torch.isfinite(loss) and loss.item() >= -1e-12
    torch.testing.assert_close(loss, permuted)
