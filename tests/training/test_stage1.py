"""Stage-1 step math on a toy model (no Ray): losses finite, gradients reach every trainable part; sharding."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dashclip_core.config import PipelineConfig
from dashclip_core.training.stage1 import build_stage1, epoch_shard, shard_steps, stage1_pairs


@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    cfg = PipelineConfig.from_file(tiny_config)
    return cfg, build_stage1(cfg)


def test_forward_backward_reaches_every_trainable_parameter(tiny_model):
    cfg, base = tiny_model
    model = copy.deepcopy(base).train()
    b, s = 6, cfg.model.image.image_size
    pixels = torch.randn(b, 3, s, s)
    ids = torch.randint(1000, 2000, (b, 7))
    mask = torch.ones(b, 7, dtype=torch.long)
    groups = torch.tensor([0, 0, 1, 2, 3, 4])  # two copies of one product
    loss, parts = model(pixels, ids, mask, groups, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss > 0
    assert set(parts) >= {"loss_itc", "loss_itm", "itm_accuracy", "scale"}
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    # Position embeddings past the 7 tokens and token-type rows never used get zero (not None) grads.
    assert missing == []


def test_product_embedding_handles_missing_modalities(tiny_model):
    cfg, base = tiny_model
    enc = base.encoder.eval()
    s = cfg.model.image.image_size
    emb = enc.encode_product(torch.randn(3, 3, s, s), torch.tensor([True, False, True]),
                             torch.randint(1000, 2000, (3, 5)), torch.ones(3, 5, dtype=torch.long), torch.tensor([False, True, True]))
    assert emb.shape == (3, cfg.model.embed_dim)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="neither an image nor text"):
        enc.encode_product(torch.randn(1, 3, s, s), torch.tensor([False]), torch.zeros(1, 3, dtype=torch.long),
                           torch.ones(1, 3, dtype=torch.long), torch.tensor([False]))


@given(n=st.integers(1, 200), batch=st.integers(2, 32), world=st.integers(1, 4), epoch=st.integers(0, 3))
def test_shards_are_disjoint_equal_and_within_range(n, batch, world, epoch):
    if batch < world:
        return
    shards = [shard_steps(n, batch, world, r, seed=0, epoch=epoch) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # same step count on every worker (DDP)
    seen = np.concatenate([np.concatenate(s) for s in shards if s]) if shards[0] else np.array([], int)
    assert len(seen) == len(set(seen.tolist())) and (seen < n).all()


def test_an_epoch_of_a_configured_sample_size_draws_that_many_rows_afresh_each_epoch():
    first = np.concatenate(shard_steps(10_000, 16, 1, 0, seed=0, epoch=0, samples=160))
    second = np.concatenate(shard_steps(10_000, 16, 1, 0, seed=0, epoch=1, samples=160))
    assert len(first) == len(second) == 160 and len(set(first.tolist())) == 160
    assert set(first.tolist()) != set(second.tolist())  # another draw of the large catalog, not the same 160 rows
    assert len(shard_steps(100, 16, 2, 1, seed=0, epoch=0, samples=1000)) == 100 // 16  # capped by the catalog


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("samples", [0, 40])
def test_a_worker_keeps_from_a_shuffled_stream_exactly_the_rows_of_its_steps(world, samples):
    """epoch_shard over a stream in any block order gives each worker the rows shard_steps picks, in step order,
    and holds no other row (what lets training read Ray Data instead of a table every worker loads)."""
    table = pd.DataFrame({"row": np.arange(103), "title": [f"t{i}" for i in range(103)]})
    blocks = [table.iloc[s:s + 10] for s in range(0, 103, 10)]
    for epoch in range(2):
        stream = [blocks[i] for i in np.random.default_rng(epoch).permutation(len(blocks))]  # Ray Data gives no order
        for rank in range(world):
            shard, steps = epoch_shard(iter(stream), 103, 12, world, rank, seed=5, epoch=epoch, samples=samples)
            expected = shard_steps(103, 12, world, rank, seed=5, epoch=epoch, samples=samples)
            assert len(steps) == len(expected) > 0
            for got, want in zip(steps, expected):
                assert shard.iloc[got]["title"].tolist() == table.iloc[want]["title"].tolist()
            assert len(shard) == sum(len(s) for s in expected)  # nothing else kept
    with pytest.raises(ValueError, match="rows"):
        epoch_shard(iter(blocks[:3]), 103, 12, 1, 0, seed=5, epoch=0)  # a stream missing rows


def test_stage1_pairs_groups_identical_text():
    products = pd.DataFrame({
        "product_id": ["a", "b", "c", "d"], "title": ["Oat milk", "oat milk", "Bread", None],
        "description": [None, None, None, None], "image_uri": ["x.png", "y.png", None, "z.png"],
    })
    pairs = stage1_pairs(products)
    assert pairs["product_id"].tolist() == ["a", "b"]  # c has no image, d no text
    assert pairs["group_id"].nunique() == 1 and (pairs["group_id"] >= 0).all()  # >= 0: the momentum queue's rule


@pytest.mark.parametrize("momentum", [False, True])
def test_group_ids_are_labels_only_hashed_or_numbered_the_loss_is_the_same(tiny_config, momentum):
    """stage1_pairs hashes texts into 63-bit group ids (it used to number them 0..G-1): ITC targets, ITM negatives
    and the momentum queue compare ids for equality only, so any one-to-one relabelling gives the same step."""
    from dashclip_core.training.stage1 import text_group_ids

    cfg = PipelineConfig.from_file(tiny_config).with_overrides(
        **({"loss.momentum_distillation": True, "loss.queue_size": 8} if momentum else {}))
    b, s = 6, cfg.model.image.image_size
    torch.manual_seed(0)
    pixels, ids = torch.randn(b, 3, s, s), torch.randint(1000, 2000, (b, 7))
    mask = torch.ones(b, 7, dtype=torch.long)
    numbered = torch.tensor([0, 0, 1, 2, 3, 1])
    hashed = torch.as_tensor(text_group_ids(["oat milk", "oat milk", "bread", "kiwi", "gala", "bread"]))
    assert (hashed >= 0).all() and len(set(hashed.tolist())) == 4
    losses = []
    for groups in (numbered, hashed):
        model = build_stage1(cfg).train()
        torch.manual_seed(1)  # dropout
        losses.append(model(pixels, ids, mask, groups, torch.Generator().manual_seed(0), alpha=0.4)[0].item())
    assert losses[0] == losses[1]


def test_stage1_pairs_written_chunk_by_chunk_equal_the_whole_catalogs(tiny_config, tmp_path):
    """train_stage1 reads the clean parts one chunk at a time: the pairs it writes are those of the whole frame, and
    a text's group id does not depend on the chunk it fell in (identical texts far apart still share a group)."""
    from dashclip_core.storage.partitions import PartWriter, count_rows
    from dashclip_core.training.stage1 import write_stage1_pairs

    rng = np.random.default_rng(0)
    titles = rng.choice(["Oat milk", "oat MILK", "Bread", "Kiwi", "Gala apple"], 50)
    products = pd.DataFrame({"product_id": [f"g-{'val' if i % 9 == 0 else 'train'}-{i}" for i in range(50)], "title": titles,
                             "description": [None] * 50, "image_uri": [None if i % 11 == 0 else f"{i}.png" for i in range(50)]})
    with PartWriter(tmp_path / "clean.parquet") as writer:
        for start in range(0, 50, 16):
            writer.write(products.iloc[start:start + 16])
    cfg = PipelineConfig.from_file(tiny_config).with_overrides(**{"catalog.chunk_rows": 7, "train.holdout_product_regex": "^g-val-"})

    table = write_stage1_pairs(cfg, tmp_path / "clean.parquet", tmp_path / "pairs.parquet")

    from dashclip_core.training.stage1 import trainable_products

    whole = stage1_pairs(trainable_products(products, cfg))
    got = pd.read_parquet(table.path)
    assert got.drop(columns="group_id").equals(whole.drop(columns="group_id"))
    assert got["group_id"].tolist() == whole["group_id"].tolist()
    assert table.n_pairs == len(whole) == count_rows(table.path) and table.n_groups == 4  # oat milk in either case is one
    assert not got["product_id"].str.startswith("g-val-").any()
    from dashclip_core.training.checkpoints import frame_digest

    again = write_stage1_pairs(cfg.with_overrides(**{"catalog.chunk_rows": 5}), products, tmp_path / "again.parquet")
    # What the checkpoints' fingerprint records: the whole table's digest, whatever the chunks or the parts.
    assert again.digest == table.digest == frame_digest(whole, ["product_id", "title", "description", "image_uri", "group_id"])


def test_holdout_products_are_never_trained_on(tiny_config):
    from dashclip_core.training.stage1 import trainable_products

    cfg = PipelineConfig.from_file(tiny_config).with_overrides(**{"train.holdout_product_regex": "^g-val-"})
    products = pd.DataFrame({"product_id": ["g-train-1", "g-val-1", "g-iconic-1", "xg-val-2"]})
    assert trainable_products(products, cfg)["product_id"].tolist() == ["g-train-1", "g-iconic-1", "xg-val-2"]
    assert len(trainable_products(products, PipelineConfig.from_file(tiny_config))) == 4


def test_momentum_distillation_step_updates_the_ema_copy_and_fills_the_queue(tiny_config):
    base = PipelineConfig.from_file(tiny_config)
    cfg = base.with_overrides(**{"loss.momentum_distillation": True, "loss.queue_size": 8, "loss.momentum": 0.5})
    model = build_stage1(cfg).train()
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    b, s = 6, cfg.model.image.image_size
    pixels, ids = torch.randn(b, 3, s, s), torch.randint(1000, 2000, (b, 7))
    mask, groups = torch.ones(b, 7, dtype=torch.long), torch.tensor([0, 0, 1, 2, 3, 4])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss, _ = model(pixels, ids, mask, groups, torch.Generator().manual_seed(0), alpha=0.4)
    assert torch.isfinite(loss) and model.queue.num_filled() == b
    assert model.queue.group_id_queue[:b].tolist() == groups.tolist()
    loss.backward()
    opt.step()
    online = model.encoder.text_proj.weight.detach().clone()
    before = model.momentum_encoder.module.text_proj.weight.detach().clone()
    model(pixels, ids, mask, groups, torch.Generator().manual_seed(0), alpha=0.4)
    after = model.momentum_encoder.module.text_proj.weight
    assert torch.allclose(after, 0.5 * before + 0.5 * online, atol=1e-6)  # EMA with m = 0.5
    assert model.queue.num_filled() == 8  # ring buffer of 8 after 12 items
    assert "queue.group_id_queue" in model.state_dict()  # checkpoints carry the queue (resume)

    with pytest.raises(ValueError, match="needs loss.momentum_distillation"):
        build_stage1(base.with_overrides(**{"loss.queue_size": 8}))
