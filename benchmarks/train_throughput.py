"""Training throughput: Ray TorchTrainer vs a plain single-process torch loop at the same global batch.

Prints samples/s of stage 1 (ITC + ITM) and stage 2 (QCC, human train labels) both ways and their ratio. Both include
batch building (image decoding, tokenisation), as a real epoch does, and both leave out their first (warm-up) step. The plain loop uses every core
through torch's intra-op threads; Ray uses ``num_workers`` processes with
``train.torch_threads_per_worker`` threads each, so the ratio is the cost (or gain) of going through Ray.

    .venv/bin/python benchmarks/train_throughput.py [--config configs/demo.yaml] [--workers 2] [--steps 12]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def plain_stage1(cfg, pairs, steps: int) -> float:
    import torch

    from dashclip_core.models.inputs import InputBuilder
    from dashclip_core.training.stage1 import build_stage1, parameter_groups, shard_steps

    torch.set_num_threads(os.cpu_count() or 1)
    model = build_stage1(cfg).train()
    opt = torch.optim.AdamW(parameter_groups(model, cfg, cfg.train.stage1_lr))
    builder, gen = InputBuilder(cfg.model), torch.Generator().manual_seed(0)
    batches = shard_steps(len(pairs), cfg.train.stage1_batch_size, 1, 0, cfg.train.seed, 0)[: steps + 1]
    t0 = None
    for i, idx in enumerate(batches):
        if i == 1:
            t0 = time.time()  # the first step warms up allocators and caches
        rows = pairs.iloc[idx]
        b = builder.products(rows["title"].tolist(), rows["description"].tolist(), rows["image_uri"].tolist())
        loss, _ = model(b["pixels"], b["input_ids"], b["attention_mask"], torch.as_tensor(rows["group_id"].to_numpy()), gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (len(batches) - 1) * cfg.train.stage1_batch_size / (time.time() - t0)


def ray_stage1(cfg, products, steps: int, workdir: Path) -> float:
    from dashclip_core.training.stage1 import train_stage1

    n = (steps + 1) * cfg.train.stage1_batch_size
    out = workdir / f"s1-{cfg.train.num_workers}"
    out.mkdir()
    info = train_stage1(cfg.with_overrides(**{"train.stage1_epochs": 1}), products.iloc[:n], out, workdir / "ray", out.name,
                        {"tracking_uri": "", "run_id": ""})
    return info["final_steady_samples_per_s"]  # the first step excluded, as in the plain loop


def plain_stage2(cfg, products, labels, stage1_dir: Path, steps: int) -> float:
    import torch

    from dashclip_core.models.encoders import QueryEncoder, load_product_encoder
    from dashclip_core.models.inputs import InputBuilder
    from dashclip_core.training.stage1 import parameter_groups, shard_steps
    from dashclip_core.training.stage2 import HARD_NEGATIVES, Stage2Model, stage2_examples

    torch.set_num_threads(os.cpu_count() or 1)
    pos, _ = stage2_examples(labels, {p: i for i, p in enumerate(products["product_id"])})
    model = Stage2Model(QueryEncoder.from_product_encoder(load_product_encoder(stage1_dir), cfg.model.text.trainable_layers), cfg).train()
    opt = torch.optim.AdamW(parameter_groups(model, cfg, cfg.train.stage2_lr))
    builder = InputBuilder(cfg.model)
    product_emb = torch.nn.functional.normalize(torch.randn(len(products), cfg.model.embed_dim), dim=-1)  # frozen input
    batches = shard_steps(len(pos), cfg.train.stage2_batch_size, 1, 0, cfg.train.seed, 0)[: steps + 1]
    t0 = None
    for i, idx in enumerate(batches):
        if i == 1:
            t0 = time.time()
        rows = pos.iloc[idx]
        b = len(rows)
        tok = builder.queries(rows["query"].tolist() + [""] * (b * HARD_NEGATIVES))  # hard-negative slots, masked
        loss, _ = model(product_emb[rows["product_idx"].to_numpy()], tok["input_ids"], tok["attention_mask"],
                        torch.as_tensor(rows["label"].to_numpy()), None, HARD_NEGATIVES, torch.zeros(b, HARD_NEGATIVES, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (len(batches) - 1) * cfg.train.stage2_batch_size / (time.time() - t0)


def ray_stage2(cfg, products, labels, stage1_dir: Path, steps: int, workdir: Path) -> float:
    from dashclip_core.training.stage2 import train_stage2

    out = workdir / f"s2-{cfg.train.num_workers}"
    out.mkdir()
    n = (steps + 1) * cfg.train.stage2_batch_size
    pos = labels[(labels["label"] >= 1) & (labels["split"] == "train")].drop_duplicates(["query", "product_id"]).iloc[:n]
    info = train_stage2(cfg.with_overrides(**{"train.stage2_epochs": 1}), products, pos, stage1_dir, out, workdir / "ray", out.name,
                        {"tracking_uri": "", "run_id": ""})
    return info["final_steady_samples_per_s"]  # the first step excluded, as in the plain loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()

    import pandas as pd

    from dashclip_core.catalog.snapshot import ensure_source_catalog, extract_snapshot
    from dashclip_core.config import PipelineConfig
    from dashclip_core.layout import Snapshot
    from dashclip_core.training.stage1 import stage1_pairs

    # Same work both ways: the plain loop decodes photos and runs the whole image tower every step, so the
    # Ray side does too (no cached stem). The stem cache speeds up both equally and is not what this measures.
    cfg = PipelineConfig.from_file(args.config).with_overrides(**{"train.num_workers": args.workers, "train.stage1_stem_cache": False})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        extract_snapshot(cfg, ensure_source_catalog(cfg), work)
        snapshot = Snapshot(work)
        products = pd.read_parquet(snapshot.products)
        products = products[products["image_uri"].notna() & (products["title"].notna() | products["description"].notna())]
        pairs = stage1_pairs(products)
        plain1 = plain_stage1(cfg, pairs, args.steps)
        ray1 = ray_stage1(cfg, products, args.steps, work)

        from dashclip_core.labeling.pairs import combine_labels
        from dashclip_core.models.encoders import save_encoder
        from dashclip_core.training.stage1 import build_stage1

        human = pd.read_parquet(snapshot.human_labels)
        labels = combine_labels(human[human["product_id"].isin(set(products["product_id"]))], human.iloc[:0])
        stage1_dir = save_encoder(build_stage1(cfg).encoder, cfg.model, work / "stage1")
        plain2 = plain_stage2(cfg, products.reset_index(drop=True), labels, stage1_dir, args.steps)
        ray2 = ray_stage2(cfg, products.reset_index(drop=True), labels, stage1_dir, args.steps, work)
    for stage, batch, plain, ray in (("stage1", cfg.train.stage1_batch_size, plain1, ray1), ("stage2", cfg.train.stage2_batch_size, plain2, ray2)):
        print(f"{stage}  global batch {batch}  plain loop {plain:7.1f} samples/s  "
              f"Ray TorchTrainer ({args.workers} workers) {ray:7.1f} samples/s  ratio {ray / plain:.2f}")


if __name__ == "__main__":
    main()
