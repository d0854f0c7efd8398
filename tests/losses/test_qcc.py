"""QueryCatalogContrastiveLoss: hand-computed values, weights, masks, hard negatives, gradients, properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dashclip_core.losses import QueryCatalogContrastiveLoss, qcc_positive_mask

F64 = torch.float64


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def unit(seed: int, *shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64), dim=-1)


# Products e_0, e_1, e_2, so cosines s_ij = <p_i, q_j> = q_j[i]: [[.8, .6, 0], [0, .8, 0], [.6, 0, 1]].
PRODUCTS = torch.eye(3, dtype=F64)
QUERIES = torch.tensor([[0.8, 0.0, 0.6], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
LABELS = torch.tensor([2, 1, 2])


def qcc(**kwargs) -> QueryCatalogContrastiveLoss:
    kwargs = {"temperature": 0.5, "moderate_weight": 0.5, **kwargs}  # scale 2
    loss_fn = QueryCatalogContrastiveLoss(**kwargs).double()
    with torch.no_grad():  # log_scale starts as float32; make it exact so hand values match to 1e-12
        loss_fn.log_scale.fill_(math.log(1.0 / kwargs["temperature"]))
    return loss_fn


def test_hand_computed_3x3_with_label_weights():
    out = qcc()(PRODUCTS, QUERIES, LABELS)
    # logits = 2 * cosines: row 0 [1.6, 1.2, 0], row 1 [0, 1.6, 0], row 2 [1.2, 0, 2]; weights 1, 0.5, 1
    l0, l1, l2 = lse(1.6, 1.2, 0) - 1.6, lse(0, 1.6, 0) - 1.6, lse(1.2, 0, 2) - 2
    assert out.loss.item() == pytest.approx((l0 + 0.5 * l1 + l2) / 2.5, rel=1e-12)
    assert out.parts["loss_qcc"].item() == pytest.approx(out.loss.item())
    assert out.parts["pos_sim"].item() == pytest.approx((0.8 + 0.8 + 1.0) / 3)
    assert out.parts["hardest_neg_sim"].item() == pytest.approx((0.6 + 0.0 + 0.6) / 3)
    assert out.parts["scale"].item() == pytest.approx(2.0)


def test_label_one_rows_weigh_moderate_weight():
    # Given row 1 relabelled 2, its term weighs 1 instead of 0.5
    out = qcc()(PRODUCTS, QUERIES, torch.tensor([2, 2, 2]))
    l0, l1, l2 = lse(1.6, 1.2, 0) - 1.6, lse(0, 1.6, 0) - 1.6, lse(1.2, 0, 2) - 2
    assert out.loss.item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-12)
    out = qcc(moderate_weight=0.25)(PRODUCTS, QUERIES, torch.tensor([1, 2, 1]))
    assert out.loss.item() == pytest.approx((0.25 * l0 + l1 + 0.25 * l2) / 1.5, rel=1e-12)


def test_masked_positive_leaves_the_denominator():
    # Given q_1 also relevant to p_0 (and q_0 to p_2)
    mask = torch.eye(3, dtype=torch.bool)
    mask[0, 1] = mask[2, 0] = True
    out = qcc()(PRODUCTS, QUERIES, LABELS, positive_mask=mask)
    l0, l1, l2 = lse(1.6, 0) - 1.6, lse(0, 1.6, 0) - 1.6, lse(0, 2) - 2
    assert out.loss.item() == pytest.approx((l0 + 0.5 * l1 + l2) / 2.5, rel=1e-12)
    # and it is no longer a negative either: row 0's hardest negative is now q_2 (cosine 0)
    assert out.parts["hardest_neg_sim"].item() == pytest.approx((0.0 + 0.0 + 0.0) / 3)


def test_mask_diagonal_is_always_positive():
    plain = qcc()(PRODUCTS, QUERIES, LABELS).loss
    no_diag = qcc()(PRODUCTS, QUERIES, LABELS, positive_mask=torch.zeros(3, 3, dtype=torch.bool)).loss
    torch.testing.assert_close(plain, no_diag)


def test_hard_negatives_hand_computed_and_padding_ignored():
    hard = torch.zeros(3, 2, 3, dtype=F64)
    hard[0, 0] = torch.tensor([0.9, 0.0, math.sqrt(1 - 0.81)], dtype=F64)  # cosine 0.9 with p_0
    hard[0, 1] = torch.tensor([1.0, 0.0, 0.0])  # padding: would be cosine 1 if counted
    hard[2, 0] = torch.tensor([0.0, 1.0, 0.0])  # cosine 0 with p_2
    mask = torch.tensor([[True, False], [False, False], [True, False]])
    out = qcc()(PRODUCTS, QUERIES, LABELS, hard_neg_query_emb=hard, hard_neg_mask=mask)
    l0, l1, l2 = lse(1.6, 1.2, 0, 1.8) - 1.6, lse(0, 1.6, 0) - 1.6, lse(1.2, 0, 2, 0) - 2
    assert out.loss.item() == pytest.approx((l0 + 0.5 * l1 + l2) / 2.5, rel=1e-12)
    assert out.parts["hardest_neg_sim"].item() == pytest.approx((0.9 + 0.0 + 0.6) / 3)
    # Given every hard negative masked out, the loss is the in-batch one
    none = qcc()(PRODUCTS, QUERIES, LABELS, hard_neg_query_emb=hard, hard_neg_mask=torch.zeros(3, 2, dtype=torch.bool))
    torch.testing.assert_close(none.loss, qcc()(PRODUCTS, QUERIES, LABELS).loss)


def test_similar_hard_negatives_increase_the_loss():
    p, q = unit(0, 6, 8), unit(1, 6, 8)
    labels = torch.tensor([2, 1, 2, 2, 1, 2])
    base = qcc(temperature=0.05)(p, q, labels).loss
    # hard negatives close to their product (p + small noise)
    hard = F.normalize(p[:, None, :] + 0.1 * unit(2, 6, 3, 8), dim=-1)  # (6, 3, 8)
    with_hard = qcc(temperature=0.05)(p, q, labels, hard_neg_query_emb=hard).loss
    assert with_hard.item() > base.item()


def test_labels_all_two_without_extras_is_one_directional_clip():
    p, q = unit(3, 5, 8), unit(4, 5, 8)
    out = QueryCatalogContrastiveLoss(temperature=0.05).double()(p, q, torch.full((5,), 2))
    torch.testing.assert_close(out.loss, F.cross_entropy(20.0 * p @ q.T, torch.arange(5)))


def reference_qcc(p, q, labels, pos_mask, hard, hard_mask, scale, moderate_weight):
    """The docstring formula with an explicit candidate list per anchor."""
    num, den = 0.0, 0.0
    for i in range(p.shape[0]):
        cands = [scale * p[i] @ q[j] for j in range(p.shape[0]) if j == i or not pos_mask[i, j]]
        cands += [scale * p[i] @ hard[i, k] for k in range(hard.shape[1]) if hard_mask[i, k]]
        w = 1.0 if labels[i] == 2 else moderate_weight
        num = num - w * (scale * p[i] @ q[i] - torch.logsumexp(torch.stack(cands), 0))
        den += w
    return num / den


def test_gradients_match_hand_formula_and_gradcheck():
    p, q, hard = unit(5, 5, 6).requires_grad_(), unit(6, 5, 6).requires_grad_(), unit(7, 5, 3, 6).requires_grad_()
    labels = torch.tensor([2, 1, 1, 2, 2])
    pos_mask = qcc_positive_mask(torch.tensor([0, 1, 0, 2, 3]), torch.tensor([0, 1, 2, 3, 1]))
    hard_mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
    loss_fn = qcc(temperature=0.1, moderate_weight=0.3)
    loss = loss_fn(p, q, labels, pos_mask, hard, hard_mask).loss
    ref = reference_qcc(p, q, labels, pos_mask, hard, hard_mask, scale=10.0, moderate_weight=0.3)
    torch.testing.assert_close(loss, ref)
    for g, r in zip(torch.autograd.grad(loss, (p, q, hard)), torch.autograd.grad(ref, (p, q, hard)), strict=True):
        torch.testing.assert_close(g, r)
    assert torch.autograd.gradcheck(lambda a, b, c: loss_fn(a, b, labels, pos_mask, c, hard_mask).loss, (p, q, hard))


def test_temperature_fixed_by_default_learnable_on_request():
    p, q, labels = unit(8, 4, 6), unit(9, 4, 6).requires_grad_(), torch.tensor([2, 1, 2, 1])
    fixed = qcc()
    fixed(p, q, labels).loss.backward()
    assert fixed.log_scale.grad is None
    learned = qcc(learn_temperature=True)
    learned(p, q, labels).loss.backward()
    assert learned.log_scale.grad is not None and learned.log_scale.grad.abs().item() > 0


def test_single_row_without_negatives_has_zero_loss_and_nan_hardest():
    out = qcc()(unit(10, 1, 4), unit(11, 1, 4), torch.tensor([2]))
    assert out.loss.item() == 0.0
    assert math.isnan(out.parts["hardest_neg_sim"].item())


def test_positive_mask_helper():
    mask = qcc_positive_mask(torch.tensor([5, 6, 5, 7]), torch.tensor([0, 1, 2, 1]))
    expected = torch.tensor(
        [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool
    )  # rows 0/2 share a product, rows 1/3 share a query
    assert torch.equal(mask, expected)


def test_label_zero_raises_with_the_rows():
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        qcc()(PRODUCTS, QUERIES, torch.tensor([2, 0, 1]))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"positive_mask": torch.eye(2, dtype=torch.bool)},
        {"positive_mask": torch.eye(3)},  # not bool
        {"hard_neg_query_emb": torch.zeros(3, 2, 4, dtype=F64)},  # wrong D
        {"hard_neg_query_emb": torch.zeros(3, 2, 3, dtype=F64), "hard_neg_mask": torch.ones(3, 3, dtype=torch.bool)},
        {"hard_neg_mask": torch.ones(3, 2, dtype=torch.bool)},  # mask without embeddings
    ],
)
def test_bad_inputs_raise(kwargs):
    with pytest.raises(ValueError):
        qcc()(PRODUCTS, QUERIES, LABELS, **kwargs)


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"moderate_weight": 0.0}, {"max_scale": -1.0}])
def test_bad_hyperparameters_raise(kwargs):
    with pytest.raises(ValueError):
        QueryCatalogContrastiveLoss(**kwargs)


@st.composite
def qcc_batches(draw):
    n = draw(st.integers(1, 7))
    h = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    labels = torch.tensor(draw(st.lists(st.sampled_from([1, 2]), min_size=n, max_size=n)))
    product_ids = torch.tensor(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    query_ids = torch.tensor(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    hard_mask = torch.tensor(draw(st.lists(st.booleans(), min_size=n * h, max_size=n * h)), dtype=torch.bool)
    perm = torch.tensor(draw(st.permutations(range(n))))
    temperature = draw(st.sampled_from([0.01, 0.05, 1.0]))
    p, q, hard = unit(seed, n, 4), unit(seed + 1, n, 4), unit(seed + 2, n, h, 4)
    pos_mask = qcc_positive_mask(product_ids, query_ids)
    return p, q, labels, pos_mask, hard, hard_mask.reshape(n, h), perm, temperature


@settings(max_examples=60, deadline=None)
@given(qcc_batches())
def test_property_finite_nonnegative_permutation_invariant(batch):
    p, q, labels, pos_mask, hard, hard_mask, perm, temperature = batch
    loss_fn = qcc(temperature=temperature)
    loss = loss_fn(p, q, labels, pos_mask, hard, hard_mask).loss
    assert torch.isfinite(loss) and loss.item() >= 0.0
    permuted = loss_fn(p[perm], q[perm], labels[perm], pos_mask[perm][:, perm], hard[perm], hard_mask[perm]).loss
    torch.testing.assert_close(loss, permuted)
