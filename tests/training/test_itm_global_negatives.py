"""ITM hard negatives are drawn from the global batch across data-parallel workers (BLIP's concat_all_gather)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dashclip_core.losses import sample_itm_negatives

ROOT = Path(__file__).resolve().parents[2]


def test_rows_of_a_global_batch_draw_from_every_worker_and_never_a_positive():
    # Given a global batch of 8 where "worker 0" (rows 0-3) holds only product 7
    ids = torch.tensor([7, 7, 7, 7, 1, 2, 7, 3])
    sim = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    rows = torch.arange(4)
    # When worker 0 samples for its rows 300 times
    draws = [sample_itm_negatives(sim, ids, torch.Generator().manual_seed(s), rows=rows) for s in range(300)]
    text_idx = torch.stack([d.text_idx for d in draws])  # (300, 4), global indices
    image_idx = torch.stack([d.image_idx for d in draws])
    # Then every row is valid (alone it would have no negative) and draws come from the other worker's slice
    assert all(d.valid.all() for d in draws)
    assert set(text_idx.flatten().tolist()) == {4, 5, 7}  # every non-product-7 column, never 6 (same product)
    assert set(image_idx.flatten().tolist()) == {4, 5, 7}


def test_rows_draw_from_the_same_rows_of_the_global_matrix():
    # The rows-subset draw follows row r of the global softmax: a peaked row always picks its hardest negative.
    sim = torch.full((6, 6), -50.0)
    sim.fill_diagonal_(50.0)
    sim[4, 1] = 0.0  # image 4's hardest text is 1
    sim[2, 5] = 0.0  # text 5's hardest image is 2
    out = sample_itm_negatives(sim, torch.arange(6), torch.Generator().manual_seed(0), rows=torch.tensor([4, 5]))
    assert out.text_idx.tolist()[0] == 1 and out.image_idx.tolist()[1] == 2


@pytest.mark.parametrize("rows", [torch.tensor([0, 6]), torch.tensor([[0, 1]]), torch.tensor([-1])])
def test_bad_rows_raise(rows):
    with pytest.raises(ValueError, match="rows"):
        sample_itm_negatives(torch.randn(6, 6), torch.arange(6), torch.Generator(), rows=rows)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One gloo rank: a Stage1Model step on a single-product slice whose text length differs per rank."""
    import torch.distributed as dist

    from dashclip_core.config import PipelineConfig
    from dashclip_core.training import stage1

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = PipelineConfig.from_file(ROOT / "configs" / "tiny.yaml")
    model = stage1.build_stage1(cfg)
    recorded = []
    real_sampler = stage1.sample_itm_negatives

    def recording_sampler(*args, **kwargs):
        out = real_sampler(*args, **kwargs)
        recorded.append(out)
        return out

    stage1.sample_itm_negatives = recording_sampler
    batch, size, length = 4, cfg.model.image.image_size, 6 + 3 * rank  # ranks pad their texts differently
    data = torch.Generator().manual_seed(10 + rank)
    pixels = torch.randn(batch, 3, size, size, generator=data)
    input_ids = torch.randint(5, 100, (batch, length), generator=data)
    input_ids[:, 0] = 2
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, length - 2 :] = 0
    group_ids = torch.full((batch,), 100 + rank)  # one product per worker: no in-slice negative exists
    loss, parts = model(pixels, input_ids, attention_mask, group_ids, torch.Generator().manual_seed(rank))
    loss.backward()
    neg = recorded[0]
    head_grad = sum(float(p.grad.abs().sum()) for p in model.encoder.itm_head.parameters())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "valid": neg.valid.tolist(), "text_idx": neg.text_idx.tolist(), "image_idx": neg.image_idx.tolist(),
        "loss_itm": float(parts["loss_itm"]), "head_grad": head_grad,
    }))
    dist.destroy_process_group()


def test_two_gloo_workers_draw_itm_negatives_from_each_other(tmp_path):
    # Given two workers whose slices each hold a single product (the old per-worker sampling found no negative)
    mp.start_processes(_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Then every row has a negative, and it comes from the other worker's slice (global indices 0-3 | 4-7)
    for rank, res in enumerate(results):
        other = set(range(4)) if rank == 1 else set(range(4, 8))
        assert all(res["valid"])
        assert set(res["text_idx"]) <= other and set(res["image_idx"]) <= other
        # and the ITM loss over positives + cross-worker negatives is finite and trains the ITM head
        assert torch.isfinite(torch.tensor(res["loss_itm"])) and res["head_grad"] > 0
