"""cached_qcc_step (GradCache): same loss and gradients as Stage2Model.forward + backward, dropout replay, no_sync.

Like sentence-transformers' tests/test_cmnrl.py: the cached and uncached paths must agree on the loss *and* on
every parameter gradient. The encoder is the real QueryEncoder over a tiny random BERT, in float64.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dashclip_core.config import PipelineConfig, TextTowerConfig
from dashclip_core.losses import LossOutput, QueryCatalogContrastiveLoss, cached_qcc_step
from dashclip_core.losses import cached as cached_module
from dashclip_core.models.encoders import QueryEncoder
from dashclip_core.models.towers import TextTower
from dashclip_core.training.stage2 import Stage2Model

F64 = torch.float64
B, H, T, D = 4, 2, 6, 8  # anchors, hard negatives per anchor, tokens, embedding dim
N = B + B * H  # 12 queries: B positives, then B*H hard negatives
MINI_BATCH_SIZES = [1, 3, 5, N]  # one query per chunk, a divisor of N, a ragged last chunk, one chunk
RTOL, ATOL = 1e-9, 1e-12


@pytest.fixture(scope="module")
def tiny_query_encoder() -> QueryEncoder:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    conf = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      vocab_size=100, max_position_embeddings=16)  # dropout 0.1 in hidden states and attention
    bert = BertModel(conf, add_pooling_layer=False)
    tower = TextTower(TextTowerConfig(pretrained="random", trainable_layers=-1), encoder=bert)
    return QueryEncoder(tower, nn.Linear(16, D)).double()


@pytest.fixture()
def encoder(tiny_query_encoder: QueryEncoder) -> QueryEncoder:
    return copy.deepcopy(tiny_query_encoder)


def qcc_loss(learn_temperature: bool = True) -> QueryCatalogContrastiveLoss:
    return QueryCatalogContrastiveLoss(temperature=0.1, learn_temperature=learn_temperature).double()


def make_batch(seed: int = 1) -> dict:
    """A stage-2 batch with label weights, an off-diagonal positive and one padded hard negative."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 100, (N, T), generator=g)  # (N, T)
    lengths = torch.randint(2, T + 1, (N,), generator=g)
    attention_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (N, T), right padding
    positive_mask = torch.eye(B, dtype=torch.bool)
    positive_mask[0, 1] = positive_mask[1, 0] = True  # rows 0 and 1 share a product: no false negative
    hard_mask = torch.ones(B, H, dtype=torch.bool)
    hard_mask[3, 1] = False  # anchor 3 had only one label-0 query; its second slot is padding
    return {
        "product_emb": F.normalize(torch.randn(B, D, generator=g, dtype=F64), dim=-1),  # (B, D)
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.tensor([2, 1, 2, 1]),
        "positive_mask": positive_mask,
        "n_hard": H,
        "hard_mask": hard_mask,
    }


def stage2_model(encoder: QueryEncoder, loss_fn: QueryCatalogContrastiveLoss) -> Stage2Model:
    model = Stage2Model(encoder, PipelineConfig())
    model.qcc = loss_fn  # float64, learnable temperature
    return model


def stage2_forward_backward(model: Stage2Model, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
    """The uncached reference: Stage2Model.forward on the whole batch, then loss.backward()."""
    loss, parts = model(batch["product_emb"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                        batch["positive_mask"], batch["n_hard"], batch["hard_mask"])
    loss.backward()
    return loss.detach(), parts


def chunked_forward_backward(
    encoder: nn.Module, loss_fn: QueryCatalogContrastiveLoss, batch: dict, chunk: int
) -> Tensor:
    """The uncached reference with dropout: the encoder runs, with a graph, on the same chunks in the same order
    (so it draws the same dropout masks as the cached step's first pass), then one loss.backward(). At chunk >= N
    this is Stage2Model.forward."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    q = torch.cat([encoder(ids[s : s + chunk], mask[s : s + chunk]) for s in range(0, N, chunk)])  # (N, D)
    hard = q[B:].view(B, H, -1)  # (B, H, D)
    out = loss_fn(batch["product_emb"], q[:B], batch["labels"], positive_mask=batch["positive_mask"],
                  hard_neg_query_emb=hard, hard_neg_mask=batch["hard_mask"])
    out.loss.backward()
    return out.loss.detach()


def grads(*modules: nn.Module) -> dict[str, Tensor]:
    return {f"{i}.{name}": p.grad.clone() for i, m in enumerate(modules) for name, p in m.named_parameters()
            if p.requires_grad}


def assert_same_grads(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=RTOL, atol=ATOL, msg=f"gradient of {name}")


@pytest.mark.parametrize("mini_batch_size", MINI_BATCH_SIZES)
def test_matches_stage2_forward_backward_in_eval_mode(encoder, mini_batch_size):
    # Given: two copies of one encoder and one loss with a learnable temperature, no dropout (eval)
    batch = make_batch()
    ref_model = stage2_model(copy.deepcopy(encoder).eval(), qcc_loss())
    loss_fn = qcc_loss()
    encoder.eval()
    # When: the plain step runs Stage2Model.forward + backward, the cached one runs in chunks
    ref_loss, ref_parts = stage2_forward_backward(ref_model, batch)
    out = cached_qcc_step(encoder, loss_fn, **batch, mini_batch_size=mini_batch_size)
    # Then: same loss, same logged parts, same gradients for every encoder parameter and for log_scale
    torch.testing.assert_close(out.loss, ref_loss, rtol=RTOL, atol=ATOL)
    for name, value in ref_parts.items():
        torch.testing.assert_close(out.parts[name], value, rtol=RTOL, atol=ATOL, equal_nan=True, msg=name)
    assert_same_grads(grads(encoder, loss_fn), grads(ref_model.query_encoder, ref_model.qcc))
    assert loss_fn.log_scale.grad.abs().item() > 0


@pytest.mark.parametrize("mini_batch_size", MINI_BATCH_SIZES)
def test_matches_plain_step_with_dropout(encoder, mini_batch_size):
    # Given: dropout active (train mode) and the same seed for both steps
    batch = make_batch()
    ref_encoder, ref_loss_fn = copy.deepcopy(encoder).train(), qcc_loss()
    loss_fn = qcc_loss()
    encoder.train()
    # When: the plain step embeds the same chunks with a graph; the cached one embeds them twice
    torch.manual_seed(123)
    ref_loss = chunked_forward_backward(ref_encoder, ref_loss_fn, batch, mini_batch_size)
    rng_after_ref = torch.get_rng_state()
    torch.manual_seed(123)
    out = cached_qcc_step(encoder, loss_fn, **batch, mini_batch_size=mini_batch_size)
    # Then: the replayed RNG gives the same dropout masks in step (3) as in step (1), so loss and gradients
    # match, and the global RNG ends where the plain step left it
    torch.testing.assert_close(out.loss, ref_loss, rtol=RTOL, atol=ATOL)
    assert_same_grads(grads(encoder, loss_fn), grads(ref_encoder, ref_loss_fn))
    assert torch.equal(torch.get_rng_state(), rng_after_ref)


def test_dropout_without_rng_replay_gives_other_gradients(encoder, monkeypatch):
    # Given: RandContext replaced by a no-op, so step (3) draws fresh dropout masks
    class NoReplay(contextlib.nullcontext):
        def __init__(self, *tensors: Tensor) -> None:
            super().__init__()

    monkeypatch.setattr(cached_module, "RandContext", NoReplay)
    batch = make_batch()
    ref_encoder = copy.deepcopy(encoder).train()
    encoder.train()
    # When
    torch.manual_seed(123)
    chunked_forward_backward(ref_encoder, qcc_loss(), batch, 3)
    torch.manual_seed(123)
    cached_qcc_step(encoder, qcc_loss(), **batch, mini_batch_size=3)
    # Then: the gradients differ, so dropout is live in the test above and the replay is what makes it pass
    got, expected = grads(encoder), grads(ref_encoder)
    assert any(not torch.allclose(got[k], expected[k], rtol=1e-6, atol=1e-9) for k in expected)


def test_without_hard_negatives(encoder):
    # Given: n_hard = 0, so N = B and hard_mask is ignored
    batch = make_batch()
    batch.update(input_ids=batch["input_ids"][:B], attention_mask=batch["attention_mask"][:B], n_hard=0, hard_mask=None)
    ref_model = stage2_model(copy.deepcopy(encoder).eval(), qcc_loss())
    loss_fn = qcc_loss()
    encoder.eval()
    # When
    ref_loss, _ = stage2_forward_backward(ref_model, batch)
    out = cached_qcc_step(encoder, loss_fn, **batch, mini_batch_size=3)
    # Then
    torch.testing.assert_close(out.loss, ref_loss, rtol=RTOL, atol=ATOL)
    assert_same_grads(grads(encoder, loss_fn), grads(ref_model.query_encoder, ref_model.qcc))


@pytest.mark.parametrize(("mini_batch_size", "n_chunks"), [(1, N), (5, 3), (N, 1), (100, 1)])
def test_no_sync_wraps_every_chunk_but_the_last(encoder, mini_batch_size, n_chunks):
    # Given: a counting stand-in for ddp_model.no_sync, and an encoder that records, for each forward with a
    # graph (step (3)), whether it ran inside no_sync
    entered: list[int] = []
    inside = [False]

    @contextlib.contextmanager
    def no_sync():
        entered.append(1)
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    calls: list[tuple[bool, bool]] = []  # (grad enabled, inside no_sync) per encoder forward
    encoder.register_forward_hook(lambda module, args, output: calls.append((torch.is_grad_enabled(), inside[0])))
    encoder.eval()
    # When
    cached_qcc_step(encoder, qcc_loss(), **make_batch(), mini_batch_size=mini_batch_size, no_sync=no_sync)
    # Then: step (1) ran without a graph and outside no_sync; step (3) ran every chunk but the last inside it
    assert len(entered) == n_chunks - 1
    assert calls[:n_chunks] == [(False, False)] * n_chunks
    assert calls[n_chunks:] == [(True, True)] * (n_chunks - 1) + [(True, False)]


def test_loss_is_detached_so_a_second_backward_fails(encoder):
    # Given / When
    out = cached_qcc_step(encoder, qcc_loss(), **make_batch(), mini_batch_size=4)
    # Then: the backward is done; calling it again raises instead of doubling the gradients
    assert isinstance(out, LossOutput)
    assert not out.loss.requires_grad
    with pytest.raises(RuntimeError):
        out.loss.backward()


def test_frozen_encoder_still_trains_the_temperature(encoder):
    # Given: an encoder with no trainable parameter and a learnable temperature
    encoder.requires_grad_(False)
    ref_model = stage2_model(copy.deepcopy(encoder).eval(), qcc_loss())
    loss_fn = qcc_loss()
    encoder.eval()
    # When
    stage2_forward_backward(ref_model, make_batch())
    cached_qcc_step(encoder, loss_fn, **make_batch(), mini_batch_size=3)
    # Then: only log_scale has a gradient, and it matches
    assert all(p.grad is None for p in encoder.parameters())
    torch.testing.assert_close(loss_fn.log_scale.grad, ref_model.qcc.log_scale.grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"mini_batch_size": 0}, "mini_batch_size must be >= 1"),
        ({"n_hard": -1}, "n_hard must be >= 0"),
        ({"n_hard": 1}, r"must both be \(B \+ B\*n_hard, T\) = \(8, T\)"),
        ({"attention_mask": torch.ones(N, T + 1, dtype=torch.long)}, "attention_mask"),
    ],
)
def test_bad_inputs_raise(encoder, change, match):
    kwargs = {**make_batch(), "mini_batch_size": 3, **change}
    with pytest.raises(ValueError, match=match):
        cached_qcc_step(encoder, qcc_loss(), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks the CUDA RNG replay")
def test_matches_plain_step_with_dropout_on_cuda(encoder):
    # Given: the same check as on CPU, with dropout drawing from the CUDA generator
    device = torch.device("cuda")
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in make_batch().items()}
    encoder = encoder.to(device).train()
    ref_encoder, ref_loss_fn, loss_fn = copy.deepcopy(encoder), qcc_loss().to(device), qcc_loss().to(device)
    # When
    torch.manual_seed(7)
    ref_loss = chunked_forward_backward(ref_encoder, ref_loss_fn, batch, 3)
    torch.manual_seed(7)
    out = cached_qcc_step(encoder, loss_fn, **batch, mini_batch_size=3)
    # Then
    torch.testing.assert_close(out.loss, ref_loss, rtol=RTOL, atol=ATOL)
    assert_same_grads(grads(encoder, loss_fn), grads(ref_encoder, ref_loss_fn))
