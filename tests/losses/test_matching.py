"""ITM hard-negative sampling and ImageTextMatchingLoss."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dashclip_core.losses import ImageTextMatchingLoss, itm_labels, sample_itm_negatives


def draw_many(sim: torch.Tensor, ids: torch.Tensor, seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    draws = [sample_itm_negatives(sim, ids, g) for _ in range(n)]
    return torch.stack([d.text_idx for d in draws]), torch.stack([d.image_idx for d in draws])  # (n, B) each


def test_never_picks_a_same_product_index():
    # Given a batch where products 0 and 1 appear two and three times
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    sim.fill_diagonal_(10.0)  # positives are the most similar, as after training
    # When sampling 500 times
    text_idx, image_idx = draw_many(sim, ids, seed=1, n=500)
    # Then no draw shares the row's product
    assert (ids[text_idx] != ids[None, :]).all()
    assert (ids[image_idx] != ids[None, :]).all()
    # and every allowed index of row 0 shows up at least once (it samples, it does not pick one)
    assert set(text_idx[:, 0].tolist()) == {2, 3, 4, 5}


def test_sampling_follows_the_softmax_not_the_argmax():
    # Given image 0 close to text 1 (sim 2) and far from text 2 (sim 0);
    # text 0 close to image 2 (sim[2, 0] = 2) and far from image 1 (sim[1, 0] = 0)
    sim = torch.tensor([[5.0, 2.0, 0.0], [0.0, 5.0, 0.0], [2.0, 0.0, 5.0]])
    ids = torch.tensor([0, 1, 2])
    text_idx, image_idx = draw_many(sim, ids, seed=2, n=4000)
    p_hard = math.exp(2) / (math.exp(2) + math.exp(0))  # 0.881
    freq_text = (text_idx[:, 0] == 1).double().mean().item()
    freq_image = (image_idx[:, 0] == 2).double().mean().item()
    # Then the hard negative wins at the softmax rate (+-5 sd), and the easy one is still drawn
    sd = math.sqrt(p_hard * (1 - p_hard) / 4000)
    assert abs(freq_text - p_hard) < 5 * sd
    assert abs(freq_image - p_hard) < 5 * sd
    assert (text_idx[:, 0] == 2).any() and (image_idx[:, 0] == 1).any()


def test_same_seed_gives_same_draws_and_another_seed_differs():
    sim = torch.randn(16, 16, generator=torch.Generator().manual_seed(3))
    ids = torch.arange(16) // 2
    a = sample_itm_negatives(sim, ids, torch.Generator().manual_seed(7))
    b = sample_itm_negatives(sim, ids, torch.Generator().manual_seed(7))
    c = sample_itm_negatives(sim, ids, torch.Generator().manual_seed(8))
    assert torch.equal(a.text_idx, b.text_idx) and torch.equal(a.image_idx, b.image_idx)
    assert not (torch.equal(a.text_idx, c.text_idx) and torch.equal(a.image_idx, c.image_idx))


@pytest.mark.parametrize("n", [1, 4])
def test_single_product_batch_is_invalid(n):
    out = sample_itm_negatives(torch.randn(n, n), torch.full((n,), 5), torch.Generator().manual_seed(0))
    assert not out.valid.any()
    assert (out.text_idx == -1).all() and (out.image_idx == -1).all()


def test_peaked_similarities_do_not_underflow():
    # Positives at +100, negatives at -100 (scale 100): BLIP's unmasked softmax underflows to 0 for every negative.
    sim = torch.full((4, 4), -100.0)
    sim.fill_diagonal_(100.0)
    sim[0, 3] = -90.0
    out = sample_itm_negatives(sim, torch.arange(4), torch.Generator().manual_seed(0))
    assert out.valid.all()
    assert out.text_idx[0].item() == 3  # e^10 times likelier than the others


def test_no_gradient_flows_and_outputs_are_long():
    sim = torch.randn(4, 4, requires_grad=True)
    text_idx, image_idx, valid = sample_itm_negatives(sim, torch.arange(4), torch.Generator().manual_seed(0))
    assert text_idx.dtype == image_idx.dtype == torch.long and valid.dtype == torch.bool
    assert text_idx.grad_fn is None and image_idx.grad_fn is None


@pytest.mark.parametrize(("sim_shape", "n_ids"), [((3, 4), 3), ((3, 3), 4), ((3,), 3)])
def test_bad_shapes_raise(sim_shape, n_ids):
    with pytest.raises(ValueError):
        sample_itm_negatives(torch.randn(sim_shape), torch.arange(n_ids), torch.Generator())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=10), st.integers(0, 2**31 - 1))
def test_property_valid_iff_a_negative_exists_and_draws_are_negatives(id_list, seed):
    ids = torch.tensor(id_list)
    n = len(id_list)
    sim = 10.0 * torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = sample_itm_negatives(sim, ids, torch.Generator().manual_seed(seed))
    has_negative = torch.tensor([any(o != i for o in id_list) for i in id_list])
    assert torch.equal(out.valid, has_negative)
    v = out.valid
    assert (ids[out.text_idx[v]] != ids[v]).all() and (ids[out.image_idx[v]] != ids[v]).all()
    assert (out.text_idx[~v] == -1).all() and (out.image_idx[~v] == -1).all()


def test_itm_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.5]], dtype=torch.float64)
    labels = torch.tensor([1, 1, 0])
    out = ImageTextMatchingLoss()(logits, labels)
    expected = (math.log(math.exp(2) + 1) + (math.log(1 + math.e) - 1) + (math.log(math.e + math.exp(0.5)) - 1)) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.parts["loss_itm"].item() == pytest.approx(expected, rel=1e-12)
    assert out.parts["itm_accuracy"].item() == pytest.approx(2 / 3)


def test_itm_labels_layout():
    assert itm_labels(3, 6).tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert itm_labels(2, 0).dtype == torch.long
    with pytest.raises(ValueError):
        itm_labels(-1, 2)


def test_itm_pipeline_end_to_end_with_filtered_rows():
    # The trainer's path: ITC logits -> negatives (filtered by valid) -> pairs -> labels -> loss.
    sim = torch.randn(4, 4)
    ids = torch.tensor([0, 1, 2, 3])
    text_idx, image_idx, valid = sample_itm_negatives(sim, ids, torch.Generator().manual_seed(0))
    num_neg = int(text_idx[valid].numel() + image_idx[valid].numel())
    labels = itm_labels(4, num_neg)
    logits = torch.randn(labels.numel(), 2, requires_grad=True)
    out = ImageTextMatchingLoss()(logits, labels)
    out.loss.backward()
    assert labels.numel() == 12 and logits.grad is not None


@pytest.mark.parametrize(("logit_shape", "n_labels"), [((3, 3), 3), ((3, 2), 2), ((3,), 3)])
def test_itm_loss_bad_shapes_raise(logit_shape, n_labels):
    with pytest.raises(ValueError):
        ImageTextMatchingLoss()(torch.randn(logit_shape), torch.zeros(n_labels, dtype=torch.long))
