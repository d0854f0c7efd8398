"""ImageTextContrastiveLoss: hand-computed values, CLIP equivalence, gradients, properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dashclip_core.losses import ImageTextContrastiveLoss, LossOutput


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def unit_rows(seed: int, n: int, d: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


def exact_itc(temperature: float) -> ImageTextContrastiveLoss:
    itc = ImageTextContrastiveLoss(temperature=temperature, learn_temperature=False).double()
    with torch.no_grad():  # log_scale starts as float32; make it exact so hand values match to 1e-12
        itc.log_scale.fill_(math.log(1.0 / temperature))
    return itc


def test_hand_computed_2x2_distinct_ids():
    # Given scale 2 and cosines <v0,t0>=1, <v0,t1>=0.6, <v1,t0>=0, <v1,t1>=0.8
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    itc = exact_itc(0.5)
    # When
    out = itc(img, txt, torch.tensor([10, 20]))
    # Then: logits [[2, 1.2], [0, 1.6]]
    i2t = ((lse(2.0, 1.2) - 2.0) + (lse(0.0, 1.6) - 1.6)) / 2
    t2i = ((lse(2.0, 0.0) - 2.0) + (lse(1.2, 1.6) - 1.6)) / 2
    assert isinstance(out, LossOutput)
    assert out.parts["loss_i2t"].item() == pytest.approx(i2t, rel=1e-12)
    assert out.parts["loss_t2i"].item() == pytest.approx(t2i, rel=1e-12)
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-12)
    assert out.parts["scale"].item() == pytest.approx(2.0)


def test_hand_computed_3x3_duplicate_ids_are_soft_positives():
    # Given images = e_0, e_1, e_2, so logits (scale 1) s_ij = t_j[i]: [[1, 0, 0], [0, .6, 0], [0, .8, 1]];
    # rows 0 and 1 are the same product (id 7), so each targets [.5, .5, 0].
    img = torch.eye(3, dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]], dtype=torch.float64)
    itc = exact_itc(1.0)
    out = itc(img, txt, torch.tensor([7, 7, 3]))
    l0, l1, l2 = lse(1, 0, 0), lse(0, 0.6, 0), lse(0, 0.8, 1)
    i2t = (-(0.5 * (1 - l0) + 0.5 * (0 - l0)) - (0.5 * (0 - l1) + 0.5 * (0.6 - l1)) - (1 - l2)) / 3
    c0, c1, c2 = lse(1, 0, 0), lse(0, 0.6, 0.8), lse(0, 0, 1)
    t2i = (-(0.5 * (1 - c0) + 0.5 * (0 - c0)) - (0.5 * (0 - c1) + 0.5 * (0.6 - c1)) - (1 - c2)) / 3
    assert out.parts["loss_i2t"].item() == pytest.approx(i2t, rel=1e-12)
    assert out.parts["loss_t2i"].item() == pytest.approx(t2i, rel=1e-12)
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-12)


def test_distinct_ids_equal_plain_clip_loss():
    img, txt = unit_rows(0, 8, 16), unit_rows(1, 8, 16)
    itc = ImageTextContrastiveLoss(temperature=0.07)
    out = itc(img, txt, torch.arange(100, 108))
    logits = (1 / 0.07) * img @ txt.T
    labels = torch.arange(8)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(out.loss, clip.to(out.loss.dtype))


def reference_itc(img: torch.Tensor, txt: torch.Tensor, ids: list[int], scale: float) -> torch.Tensor:
    """The docstring formula, row by row, without cross_entropy."""
    s = scale * img @ txt.T
    n = len(ids)
    total_i2t, total_t2i = 0.0, 0.0
    for i in range(n):
        pos = [j for j in range(n) if ids[j] == ids[i]]
        total_i2t = total_i2t - sum(s[i, j] - torch.logsumexp(s[i, :], 0) for j in pos) / len(pos)
        total_t2i = total_t2i - sum(s[j, i] - torch.logsumexp(s[:, i], 0) for j in pos) / len(pos)
    return (total_i2t + total_t2i) / (2 * n)


def test_gradients_match_hand_formula_and_gradcheck():
    ids = [4, 4, 1, 9, 1]
    img = unit_rows(2, 5, 6).requires_grad_()
    txt = unit_rows(3, 5, 6).requires_grad_()
    itc = exact_itc(0.1)
    loss = itc(img, txt, torch.tensor(ids)).loss
    g_img, g_txt = torch.autograd.grad(loss, (img, txt))
    ref = reference_itc(img, txt, ids, scale=10.0)
    r_img, r_txt = torch.autograd.grad(ref, (img, txt))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g_img, r_img)
    torch.testing.assert_close(g_txt, r_txt)
    assert torch.autograd.gradcheck(lambda a, b: itc(a, b, torch.tensor(ids)).loss, (img, txt))


def test_log_scale_gets_gradient_only_when_learnable():
    img, txt, ids = unit_rows(4, 4, 8), unit_rows(5, 4, 8), torch.arange(4)
    learned = ImageTextContrastiveLoss(temperature=0.07, learn_temperature=True).double()
    learned(img, txt, ids).loss.backward()
    assert learned.log_scale.grad is not None and learned.log_scale.grad.abs().item() > 0
    fixed = ImageTextContrastiveLoss(temperature=0.07, learn_temperature=False).double()
    fixed(img.clone().requires_grad_(), txt, ids).loss.backward()
    assert fixed.log_scale.grad is None


def test_scale_is_clamped_to_max_scale():
    itc = ImageTextContrastiveLoss(temperature=0.001)  # scale 1000 -> clamped
    img, txt = unit_rows(6, 4, 8, torch.float32), unit_rows(7, 4, 8, torch.float32)
    out = itc(img, txt, torch.arange(4))
    out.loss.backward()
    assert out.parts["scale"].item() == pytest.approx(100.0)
    assert itc.log_scale.grad.item() == 0.0  # above the bound the clamp passes no gradient


def test_similarities_are_scaled_logits():
    itc = exact_itc(0.25)
    img, txt = unit_rows(8, 3, 4), unit_rows(9, 3, 4)
    torch.testing.assert_close(itc.similarities(img, txt), 4.0 * img @ txt.T)


def test_parts_are_detached():
    img = unit_rows(10, 3, 4).requires_grad_()
    out = ImageTextContrastiveLoss().double()(img, unit_rows(11, 3, 4), torch.arange(3))
    assert out.loss.requires_grad
    assert not any(v.requires_grad for v in out.parts.values())


@pytest.mark.parametrize(
    ("img_shape", "txt_shape", "ids"),
    [((3, 4), (3, 5), torch.arange(3)), ((3, 4), (2, 4), torch.arange(3)), ((3, 4), (3, 4), torch.arange(2))],
)
def test_bad_shapes_raise(img_shape, txt_shape, ids):
    with pytest.raises(ValueError):
        ImageTextContrastiveLoss()(torch.randn(img_shape), torch.randn(txt_shape), ids)


def test_float_ids_raise():
    with pytest.raises(ValueError, match="integer"):
        ImageTextContrastiveLoss()(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0.0, 1.0]))


@st.composite
def itc_batches(draw):
    n = draw(st.integers(1, 8))
    d = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    ids = torch.tensor(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    perm = torch.tensor(draw(st.permutations(range(n))))
    temperature = draw(st.sampled_from([0.01, 0.07, 1.0]))
    return unit_rows(seed, n, d), unit_rows(seed + 1, n, d), ids, perm, temperature


@settings(max_examples=60, deadline=None)
@given(itc_batches())
def test_property_permutation_invariant_finite_nonnegative(batch):
    img, txt, ids, perm, temperature = batch
    itc = ImageTextContrastiveLoss(temperature=temperature, learn_temperature=False).double()
    loss = itc(img, txt, ids).loss
    permuted = itc(img[perm], txt[perm], ids[perm]).loss
    assert torch.isfinite(loss) and loss.item() >= 0.0
    torch.testing.assert_close(loss, permuted)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(0, 1000))
def test_property_identical_embeddings_float32_stay_finite(n, seed):
    # Degenerate but legal input: every image and text is the same unit vector.
    v = unit_rows(seed, 1, 4, torch.float32).expand(n, 4)
    loss = ImageTextContrastiveLoss(temperature=0.01)(v, v, torch.arange(n)).loss
    assert torch.isfinite(loss) and loss.item() == pytest.approx(math.log(n), abs=1e-5)
