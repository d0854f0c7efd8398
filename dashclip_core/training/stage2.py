"""Stage 2: train the text-only query encoder into the frozen product space with the QCC loss (DashCLIP Sec. 3).

Anchors are products; each training row is (product, relevant query, grade 1/2). Negatives are the
other queries in the batch plus up to ``HARD_NEGATIVES`` label-0 queries of the same product.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from dashclip_core.config import PipelineConfig
from dashclip_core.layout import IMAGE_STEM, Stage2
from dashclip_core.losses import QueryCatalogContrastiveLoss, cached_qcc_step
from dashclip_core.models.encoders import WEIGHTS, QueryEncoder, count_parameters, load_product_encoder, save_encoder
from dashclip_core.models.inputs import InputBuilder, embed_products
from dashclip_core.storage.images import ImagePolicy
from dashclip_core.training.stage1 import (
    epoch_shard,
    examples_dataset,
    parameter_groups,
    stream_frames,
    trainable_products,
)

logger = logging.getLogger(__name__)

HARD_NEGATIVES = 2  # label-0 queries per anchor product


class Stage2Model(torch.nn.Module):
    """Query encoder + QCC loss (its optional learnable temperature is a parameter, so DDP syncs it)."""

    def __init__(self, query_encoder: QueryEncoder, cfg: PipelineConfig) -> None:
        super().__init__()
        self.query_encoder = query_encoder
        self.qcc = QueryCatalogContrastiveLoss(cfg.loss.qcc_temperature, cfg.loss.qcc_moderate_weight)

    def forward(self, product_emb, input_ids, attention_mask, labels, positive_mask, n_hard: int, hard_mask):
        """product_emb (B, D) frozen; queries: B positives then B*n_hard hard negatives, tokenised together."""
        q = self.query_encoder(input_ids, attention_mask)  # (B + B*H, D)
        b = product_emb.shape[0]
        hard = q[b:].view(b, n_hard, -1) if n_hard else None  # (B, H, D)
        out = self.qcc(product_emb, q[:b], labels, positive_mask=positive_mask, hard_neg_query_emb=hard, hard_neg_mask=hard_mask if n_hard else None)
        return out.loss, out.parts


def stage2_examples(labels: pd.DataFrame, product_index: dict[str, int]) -> tuple[pd.DataFrame, dict[int, list[str]]]:
    """Training rows (label >= 1, train split) and each product's label-0 queries (hard negatives)."""
    train = labels[(labels["split"] == "train") & labels["product_id"].isin(product_index)]
    pos = train[train["label"] >= 1][["query", "product_id", "label"]].drop_duplicates(["query", "product_id"]).reset_index(drop=True)
    pos["product_idx"] = pos["product_id"].map(product_index).astype(np.int64)
    neg = train[train["label"] == 0]
    hard = {int(product_index[p]): sorted(set(g["query"])) for p, g in neg.groupby("product_id")}
    return pos, hard


def stage2_worker(config: dict) -> None:
    """Ray Train loop. ``config`` = {"pipeline", "n_examples", "hard_negatives", "product_emb", "stage1_dir", "mlflow"};
    the examples arrive as the Ray Data dataset ``examples`` (each epoch, this worker keeps its rows: ``epoch_shard``)."""
    import ray.train
    import ray.train.torch

    from dashclip_core.training.checkpoints import epoch_seed
    from dashclip_core.training.ray_launcher import EpochMeter, start_worker
    from dashclip_core.training.schedule import apply_lr, stage_lr_factor

    cfg = PipelineConfig.from_dict(config["pipeline"])
    torch.set_num_threads(cfg.train.torch_threads_per_worker)

    n_examples = int(config["n_examples"])
    hard = {int(k): v for k, v in json.loads(Path(config["hard_negatives"]).read_text()).items()}
    product_emb = torch.from_numpy(np.load(config["product_emb"]))
    # Which (query, product) pairs are known positives (never each other's in-batch negatives), from one pass.
    positive_pairs = {pair for frame in stream_frames("examples") for pair in zip(frame["query"], frame["product_idx"])}
    builder = InputBuilder(cfg.model, images=ImagePolicy.for_pipeline(cfg))  # the catalog's roots and limits
    torch.manual_seed(cfg.train.seed)
    product_encoder = load_product_encoder(Path(config["stage1_dir"]))
    model = Stage2Model(QueryEncoder.from_product_encoder(product_encoder, cfg.model.text.trainable_layers), cfg)
    del product_encoder
    w = start_worker(cfg, config, "stage2", model, parameter_groups(model, cfg, cfg.train.stage2_lr))
    rank, world, device, opt, base_lrs, precision, mlflow_log = w.rank, w.world, w.device, w.opt, w.base_lrs, w.precision, w.mlflow_log
    start_epoch, step = w.start_epoch, w.step
    cache_chunk = cfg.train.stage2_grad_cache_chunk
    if cache_chunk > 0:
        # GradCache runs its own backward through the query encoder, so DDP must wrap the encoder itself
        # (the QCC temperature is fixed here, so no parameter lives outside it).
        ddp_encoder = ray.train.torch.prepare_model(model.query_encoder)
    else:
        model = ray.train.torch.prepare_model(model)

    for epoch in range(start_epoch, cfg.train.stage2_epochs):
        # Random streams restart from (seed, rank, epoch): a resumed run draws what an uninterrupted one would
        # (dropout from torch's global generator, hard-negative picks from rng).
        torch.manual_seed(epoch_seed(cfg.train.seed, rank, epoch, 0))
        rng = np.random.default_rng(epoch_seed(cfg.train.seed, rank, epoch, 3))
        model.train()
        meter = EpochMeter(mlflow_log, cfg.train.stage2_batch_size)
        pos, steps = epoch_shard(stream_frames("examples"), n_examples, cfg.train.stage2_batch_size, world, rank,
                                 cfg.train.seed + 17, epoch)
        for idx in steps:
            rows = pos.iloc[idx]
            queries = rows["query"].tolist()
            pidx = rows["product_idx"].to_numpy()
            # positive_mask[i, j]: query j is known relevant to product i, so it is no negative for i.
            pmask = torch.tensor([[(qj, int(pi)) in positive_pairs for qj in queries] for pi in pidx])
            hard_q, hard_mask = [], []
            for pi in pidx:
                cands = hard.get(int(pi), [])
                picks = list(rng.choice(cands, size=min(HARD_NEGATIVES, len(cands)), replace=False)) if cands else []
                hard_mask.append([True] * len(picks) + [False] * (HARD_NEGATIVES - len(picks)))
                hard_q.extend(picks + [""] * (HARD_NEGATIVES - len(picks)))  # padding rows are masked out
            tok = builder.queries(queries + hard_q)
            inputs = (product_emb[pidx].to(device), tok["input_ids"].to(device), tok["attention_mask"].to(device),
                      torch.as_tensor(rows["label"].to_numpy()).to(device), pmask.to(device))
            opt.zero_grad(set_to_none=True)
            with precision.autocast():
                if cache_chunk > 0:  # loss and backward in one go, chunk by chunk (fp32 or bf16: no loss scale)
                    out = cached_qcc_step(ddp_encoder, model.qcc, *inputs, n_hard=HARD_NEGATIVES, hard_mask=torch.tensor(hard_mask).to(device),
                                          mini_batch_size=cache_chunk, no_sync=getattr(ddp_encoder, "no_sync", None))
                    loss, parts = out.loss, out.parts
                else:
                    loss, parts = model(*inputs, HARD_NEGATIVES, torch.tensor(hard_mask).to(device))
            if cache_chunk <= 0:
                precision.backward(loss)
            apply_lr(opt, base_lrs, stage_lr_factor(cfg.train, step, len(steps), cfg.train.stage2_epochs))
            applied = precision.step(opt, loss, epoch, step)  # a non-finite step is skipped (and too many in a row fail)
            step += 1
            meter.add({**parts, "skipped_step": torch.tensor(0.0 if applied else 1.0)}, step)
        metrics = meter.finish(epoch, step)
        if rank == 0:  # the progress line `dashclip run` shows ("<what> epoch i/n ...")
            logger.info("stage2 epoch %d/%d: loss_qcc %.4f, %.1f samples/s", epoch + 1, cfg.train.stage2_epochs,
                        metrics.get("loss_qcc", float("nan")), metrics["samples_per_s"])
        w.end_epoch(model, epoch, step, metrics)


def wise_interpolate(trained: nn.Module, initial: nn.Module, alpha: float) -> None:
    """WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022), in place:
    theta = (1 - alpha) * theta_initial + alpha * theta_trained.

    Why: stage 2 pulls queries towards the multimodal product embeddings of the labelled queries and away
    from what stage 1 learned about short names vs photos; mixing the weights back keeps most of the
    search gain and most of the zero-shot skill (both encoders share one initialisation, so the mix is
    meaningful). alpha = 1 is plain fine-tuning, 0 is the stage-1 text side.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"train.stage2_wise_alpha must be in [0, 1], got {alpha}")
    start = initial.state_dict()
    with torch.no_grad():
        for name, value in trained.state_dict().items():
            if value.is_floating_point():
                value.copy_((1.0 - alpha) * start[name] + alpha * value)


def anchor_embeddings(encoder, cfg: PipelineConfig, products: pd.DataFrame, ray_storage: Path) -> np.ndarray:
    """Frozen stage-1 embeddings of the anchor products: from the run's cached image stem when stage 1
    left one that covers them (only the image tower's tail runs), else from the photos."""
    from dashclip_core.models.image_stem import StemStore, embeddings_from_pooled

    builder = InputBuilder(cfg.model, images=ImagePolicy.for_pipeline(cfg))
    with_image = products.loc[products["image_uri"].notna(), "product_id"]
    store = StemStore.open(ray_storage / IMAGE_STEM, cfg.model)
    if store is None or not store.covers(with_image):
        return embed_products(encoder, builder, products)
    return embeddings_from_pooled(encoder.eval(), builder, products, store.pooled(encoder.image_tower, with_image))[0]


def train_stage2(cfg: PipelineConfig, products: pd.DataFrame, labels: pd.DataFrame, stage1_dir: Path, out_dir: Path,
                 ray_storage: Path, ray_name: str, mlflow_run: dict) -> dict:
    """Embed the anchor products with the frozen stage-1 encoder, train the query encoder, write ``out_dir/query_encoder``.

    ``products``: catalog rows covering the labelled products (the task passes exactly those, read chunk by chunk;
    the rest of the catalog plays no part in stage 2), in catalog order."""
    from dashclip_core.training.checkpoints import file_digest, frame_digest, stage_fingerprint
    from dashclip_core.training.precision import autocast_dtype
    from dashclip_core.training.ray_launcher import fit, read_checkpoint

    if autocast_dtype(cfg.train.amp, "cuda") is torch.float16 and cfg.train.stage2_grad_cache_chunk > 0:
        raise ValueError("train.amp=fp16 needs loss scaling, which the GradCache path (train.stage2_grad_cache_chunk > 0) "
                         "does not do; use train.amp=bf16 with GradCache, or set train.stage2_grad_cache_chunk: 0")

    product_index = {p: i for i, p in enumerate(products["product_id"])}
    allowed = set(trainable_products(products, cfg)["product_id"])
    pos, hard = stage2_examples(labels[labels["product_id"].isin(allowed)], product_index)
    if len(pos) < cfg.train.stage2_batch_size:
        raise ValueError(f"stage2 needs at least train.stage2_batch_size={cfg.train.stage2_batch_size} relevant (label>=1) train pairs, got {len(pos)}")
    used = sorted(set(pos["product_idx"]))
    # The anchor matrix holds the products the examples use, not the catalog: product_idx becomes their row in it.
    compact = {old: new for new, old in enumerate(used)}
    pos["product_idx"] = pos["product_idx"].map(compact).astype(np.int64)
    hard = {compact[k]: v for k, v in hard.items() if k in compact}  # hard negatives are drawn for batch products only
    torch.set_num_threads(max(1, cfg.ray.num_cpus))
    encoder = load_product_encoder(stage1_dir)
    emb = anchor_embeddings(encoder, cfg, products.iloc[used], ray_storage).astype(np.float32)  # (len(used), D)
    del encoder
    outputs = Stage2(out_dir)
    np.save(outputs.anchor_product_emb, emb)
    pos.to_parquet(outputs.examples, index=False)
    outputs.hard_negatives.write_text(json.dumps({str(k): v for k, v in hard.items()}))

    t0 = time.time()
    loop = {
        "pipeline": cfg.to_dict(), "n_examples": len(pos),
        "hard_negatives": str(outputs.hard_negatives), "product_emb": str(outputs.anchor_product_emb),
        "stage1_dir": str(stage1_dir), "mlflow": mlflow_run,
    }
    product_encoder = load_product_encoder(stage1_dir)
    model = Stage2Model(QueryEncoder.from_product_encoder(product_encoder, cfg.model.text.trainable_layers), cfg)
    final_metrics: dict = {}
    precision = None
    if cfg.train.stage2_epochs > 0:
        # What the checkpoints are trained from (a retry resumes them only when unchanged): the labelled
        # examples, the hard negatives, the frozen stage-1 encoder and the anchor products it embeds.
        fingerprint = stage_fingerprint(cfg, "stage2", {
            "examples": frame_digest(pos, ["query", "product_id", "label", "product_idx"]),
            "hard_negatives": file_digest(outputs.hard_negatives),
            "stage1_encoder": file_digest(Path(stage1_dir) / WEIGHTS),
            "anchor_products": frame_digest(products.iloc[used], ["product_id", "title", "description", "image_uri"]),
        })
        result = fit(stage2_worker, loop, cfg, ray_name, ray_storage, fingerprint, "stage2",
                     datasets={"examples": examples_dataset(cfg, pos)})
        model.load_state_dict(read_checkpoint(result)["model"])
        final_metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        precision = result.metrics.get("precision", "fp32")
    if cfg.train.stage2_wise_alpha != 1.0:
        wise_interpolate(model.query_encoder, QueryEncoder.from_product_encoder(product_encoder, 0), cfg.train.stage2_wise_alpha)
    save_encoder(model.query_encoder, cfg.model, outputs.query_encoder)
    outputs.anchor_product_emb.unlink()  # only the workers needed it; backfill writes the real table
    info = {
        "n_examples": len(pos), "n_products": len(used), "n_hard_negative_products": len(hard),
        "train_seconds": round(time.time() - t0, 1), "precision": precision,
        **{f"final_{k}": v for k, v in final_metrics.items()}, **count_parameters(model.query_encoder),
    }
    outputs.metrics.write_text(json.dumps(info, indent=2))
    return info
