"""Stage 1: continual pretraining of the BLIP-style product encoder with ITC + ITM (DashCLIP Sec. 3, BLIP Sec. 3.2).

Layout follows Ray's torch examples: data -> model -> ``stage1_worker(config)`` -> launcher (``train_stage1``).
The per-step math (``Stage1Model.forward``) runs without Ray too (tests call it directly).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from dashclip_core.config import PipelineConfig, per_worker_batch_size
from dashclip_core.layout import IMAGE_STEM, Stage1
from dashclip_core.losses import (
    FeatureQueue,
    ImageTextContrastiveLoss,
    ImageTextMatchingLoss,
    MomentumDistillationITCLoss,
    MomentumEncoder,
    itm_labels,
    sample_itm_negatives,
)
from dashclip_core.losses.distributed import gather_no_grad, gather_with_grad, local_rows, pad_to_global_max
from dashclip_core.models.encoders import ProductEncoder, count_parameters, save_encoder
from dashclip_core.models.inputs import InputBuilder, product_text

logger = logging.getLogger(__name__)



# ---- data --------------------------------------------------------------------------------------

STAGE1_DATA_COLUMNS = ("product_id", "title", "description", "image_uri", "group_id")  # what a stage-1 run is trained from


def text_group_ids(keys) -> np.ndarray:
    """A 63-bit id per product text (lowercased): equal texts get equal ids in any chunk of any catalog, so groups
    need no pass over the whole catalog to be numbered. Two different texts share an id with probability about
    n^2 / 2^64 (5e-4 at 1e8 distinct texts); they would then count as each other's positives."""
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") >> 1 for k in keys],
                    dtype=np.int64)


def stage1_pairs(products: pd.DataFrame) -> pd.DataFrame:
    """Products with both an image and text (ITC/ITM need pairs), with an integer ``group_id``.

    Items with identical product text share a group and are each other's positives in ITC and never
    ITM negatives: a catalog lists the same item many times (sizes, sellers, photos of one class).
    Row by row (:func:`text_group_ids`), so a catalog read in chunks gives the same pairs.
    """
    text = [product_text(t, d) for t, d in zip(products["title"], products["description"])]
    keep = products["image_uri"].notna().to_numpy() & np.array([t is not None for t in text], dtype=bool)
    pairs = products.loc[keep, ["product_id", "title", "description", "image_uri"]].reset_index(drop=True)
    pairs["group_id"] = text_group_ids([t.lower() for t, k in zip(text, keep) if k])
    return pairs


@dataclass(frozen=True)
class PairsTable:
    """The stage-1 pairs written as parts: where, how many, how many text groups, and their digest."""

    path: Path
    n_pairs: int
    n_groups: int
    digest: str


def write_stage1_pairs(cfg: PipelineConfig, products, path: Path) -> PairsTable:
    """:func:`stage1_pairs` of the trainable products, ``catalog.chunk_rows`` catalog rows at a time, into a folder of
    parts at ``path``. ``products``: the clean catalog (a parquet path or a frame). Memory: one chunk and the group ids."""
    from dashclip_core.storage.partitions import PartWriter, frame_chunks
    from dashclip_core.training.checkpoints import StreamedFrameDigest

    empty = pd.DataFrame({c: pd.Series(dtype=object) for c in STAGE1_DATA_COLUMNS[:-1]}).assign(group_id=pd.Series(dtype=np.int64))
    digest, groups = StreamedFrameDigest(list(STAGE1_DATA_COLUMNS)), []  # the whole table's frame_digest, streamed
    with PartWriter(path, empty) as writer:
        for chunk in frame_chunks(products, cfg.catalog.chunk_rows, columns=list(STAGE1_DATA_COLUMNS[:-1])):
            pairs = stage1_pairs(trainable_products(chunk, cfg))
            if len(pairs):
                writer.write(pairs)
                digest.update(pairs)
                groups.append(pairs["group_id"].to_numpy())
    n_groups = len(np.unique(np.concatenate(groups))) if groups else 0
    return PairsTable(path, digest.rows, n_groups, digest.hexdigest())


def trainable_products(products: pd.DataFrame, cfg: PipelineConfig) -> pd.DataFrame:
    """Products training may see: all but those matching ``train.holdout_product_regex`` (held-out photos)."""
    if not cfg.train.holdout_product_regex:
        return products
    return products[~products["product_id"].astype(str).str.match(cfg.train.holdout_product_regex)]


def shard_steps(n_rows: int, global_batch: int, world_size: int, rank: int, seed: int, epoch: int,
                samples: int = 0) -> list[np.ndarray]:
    """Row indices for each step of this worker: a seeded shuffle per epoch, cut into global batches,
    each global batch split into ``world_size`` equal slices. The last partial batch is dropped so every
    worker runs the same number of steps (DDP needs matching collectives). ``samples`` > 0 makes an epoch
    the first ``samples`` rows of that shuffle (a large catalog: each epoch a fresh draw of the same size)."""
    per_worker = per_worker_batch_size(global_batch, world_size)
    order = np.random.default_rng(seed + epoch).permutation(n_rows)
    if samples > 0:
        order = order[:samples]
    steps = len(order) // (per_worker * world_size)
    return [order[s * per_worker * world_size + rank * per_worker :][:per_worker] for s in range(steps)]




def epoch_shard(batches, n_rows: int, global_batch: int, world_size: int, rank: int, seed: int, epoch: int,
                samples: int = 0) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """This worker's rows for one epoch, kept from one pass over a stream of the whole table.

    ``batches`` yields frames with a ``row`` column (the row's position in the table, 0..n_rows-1), in any order
    (a Ray Data iterator). The rows :func:`shard_steps` gives this worker are kept, in the order its steps visit
    them; everything else streams past. Returns (those rows, one positional index array per step), so
    ``shard.iloc[steps[i]]`` are exactly the rows ``table.iloc[shard_steps(...)[i]]`` would be: the same data
    order on 1 or N workers, and a worker holds its share of one epoch, not the table.

    Raises:
        ValueError: the stream lacks rows this worker needs, or repeats one.
    """
    steps = shard_steps(n_rows, global_batch, world_size, rank, seed, epoch, samples=samples)
    wanted = np.concatenate(steps) if steps else np.zeros(0, np.int64)
    visit = np.full(n_rows, -1, np.int64)
    visit[wanted] = np.arange(len(wanted))
    kept = []
    for frame in batches:
        rows = frame["row"].to_numpy(np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= n_rows):
            raise ValueError(f"epoch_shard: row ids outside 0..{n_rows - 1} in the stream")
        at = visit[rows]
        if (at >= 0).any():
            kept.append(frame[at >= 0].assign(_visit=at[at >= 0]))
    shard = pd.concat(kept, ignore_index=True) if kept else pd.DataFrame({"row": [], "_visit": []})
    if len(shard) != len(wanted) or (len(shard) and shard["_visit"].duplicated().any()):
        raise ValueError(f"epoch_shard: the stream gave {len(shard)} of this worker's {len(wanted)} rows (a row missing or repeated)")
    shard = shard.sort_values("_visit", kind="stable").drop(columns="_visit").reset_index(drop=True)
    per_step = len(steps[0]) if steps else 0
    return shard, [np.arange(i * per_step, (i + 1) * per_step) for i in range(len(steps))]


def stream_frames(name: str, batch_rows: int = 65_536):
    """The frames of the Ray Train dataset ``name`` (inside a worker), ``batch_rows`` at a time."""
    import ray.train

    return ray.train.get_dataset_shard(name).iter_batches(batch_size=batch_rows, batch_format="pandas")


def image_stem_store(cfg: PipelineConfig, products: pd.DataFrame, ray_storage: Path):
    """The run's frozen image stem for every product photo (computed once, then shared by stage 2 and
    evaluate); None when ``train.stage1_stem_cache`` is off or the image tower has no frozen stem."""
    from dashclip_core.models.image_stem import build_stem_store
    from dashclip_core.storage.images import ImagePolicy

    if not cfg.train.stage1_stem_cache:
        return None
    return build_stem_store(build_stage1(cfg).encoder, cfg.model, products, ray_storage / IMAGE_STEM,
                            threads=cfg.ray.num_cpus, images=ImagePolicy.for_pipeline(cfg))


def flip_horizontally(images: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    """Mirror each image (or stem feature map: the same operation on a (C, h, w) map) with probability ``prob``."""
    if prob <= 0:
        return images
    flip = torch.rand(images.shape[0], generator=generator) < prob  # (B,)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def text_views(rows: pd.DataFrame, title_only_prob: float, generator: torch.Generator) -> tuple[list, list]:
    """(titles, descriptions) for a batch; with probability ``title_only_prob`` a row keeps only its
    title, so the text tower also learns to place short, query-like text next to the photo."""
    titles, descriptions = rows["title"].tolist(), rows["description"].tolist()
    if title_only_prob > 0:
        drop = (torch.rand(len(rows), generator=generator) < title_only_prob).tolist()
        descriptions = [None if d_ and isinstance(t, str) and t.strip() else d for t, d, d_ in zip(titles, descriptions, drop)]
    return titles, descriptions


# ---- model -------------------------------------------------------------------------------------


class Stage1Model(nn.Module):
    """Product encoder + the ITC temperature; ``forward`` returns both losses for one batch.

    Everything that needs gradients runs inside ``forward`` so DistributedDataParallel sees it.
    """

    def __init__(self, cfg: PipelineConfig) -> None:
        super().__init__()
        self.encoder = ProductEncoder(cfg.model)
        lc = cfg.loss
        if lc.queue_size and not lc.momentum_distillation:
            raise ValueError("loss.queue_size needs loss.momentum_distillation: the queue holds momentum-encoder features")
        if lc.momentum_distillation:
            # ALBEF Sec. 3.3 / BLIP Sec. 3.2: an EMA copy of the encoder gives soft ITC targets (and queued negatives).
            self.momentum_encoder = MomentumEncoder(self.encoder)
            self.queue = FeatureQueue(lc.queue_size, cfg.model.embed_dim) if lc.queue_size else None
            self.itc = MomentumDistillationITCLoss(lc.temperature, lc.learn_temperature)
        else:
            self.momentum_encoder, self.queue = None, None
            self.itc = ImageTextContrastiveLoss(lc.temperature, lc.learn_temperature)
        self.momentum = lc.momentum
        self.itm = ImageTextMatchingLoss()
        self.itm_weight = cfg.loss.itm_weight

    def contrastive(self, image_emb: Tensor, text_emb: Tensor, group_ids: Tensor, images: Tensor, input_ids: Tensor,
                    attention_mask: Tensor, from_stem: bool, alpha: float):
        """ITC over the global batch: every worker's items are negatives for every other's (losses/distributed.py);
        with momentum distillation, against the momentum encoder's targets and the queue too."""
        groups = gather_no_grad(group_ids)
        if self.momentum_encoder is None:
            return self.itc(gather_with_grad(image_emb), gather_with_grad(text_emb), groups)
        with torch.no_grad():
            if self.training:
                self.momentum_encoder.update(self.encoder, self.momentum)  # ALBEF: update first, then encode
            image_m, _ = self.momentum_encoder.module.encode_image(images, from_stem=from_stem)
            text_m, _ = self.momentum_encoder.module.encode_text(input_ids, attention_mask)
            image_m, text_m = gather_no_grad(image_m), gather_no_grad(text_m)
        itc = self.itc(gather_with_grad(image_emb), gather_with_grad(text_emb), image_m, text_m, groups, queue=self.queue, alpha=alpha)
        if self.queue is not None and self.training:
            self.queue.enqueue(image_m, text_m, groups)  # every rank enqueues the same global batch
        return itc

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor, group_ids: Tensor, generator: torch.Generator,
                from_stem: bool = False, alpha: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        """``pixels``: (B, 3, S, S) photos, or their cached stem feature maps when ``from_stem``;
        ``alpha``: weight of the momentum encoder's soft ITC targets (momentum distillation only)."""
        image_emb, image_tokens = self.encoder.encode_image(pixels, from_stem=from_stem)  # (B, D), (B, N, H)
        text_emb, text_states = self.encoder.encode_text(input_ids, attention_mask)  # (B, D), (B, T, H)
        itc = self.contrastive(image_emb, text_emb, group_ids, pixels, input_ids, attention_mask, from_stem, alpha)

        # ITM with hard negatives sampled from the ITC similarities of the *global* batch (BLIP Sec. 3.2 and its
        # concat_all_gather / all_gather_with_grad): this worker's images and texts are paired with negatives
        # any worker encoded, so 2 workers of 16 draw from the same 32 candidates as 1 worker of 32. Token
        # states travel with gradients so a negative's encoder gets its share of the ITM gradient.
        with torch.no_grad():
            sim_global = self.itc.similarities(gather_no_grad(image_emb.detach()), gather_no_grad(text_emb.detach()))
        rows = local_rows(pixels.shape[0], device=sim_global.device)  # (B,) this worker's items, global indices
        neg = sample_itm_negatives(sim_global, gather_no_grad(group_ids), generator, rows=rows)
        v = neg.valid  # (B,) rows that have a negative (some other product is in the global batch)
        all_states = gather_with_grad(pad_to_global_max(text_states, dim=1))  # (G, T_max, H)
        all_masks = gather_no_grad(pad_to_global_max(attention_mask, dim=1))  # (G, T_max)
        all_images = gather_with_grad(image_tokens)  # (G, N, H)
        # Blocks: B positives (text_i, image_i); negative texts for images; negative images for texts.
        states = torch.cat([all_states[rows], all_states[neg.text_idx[v]], all_states[rows[v]]], dim=0)
        masks = torch.cat([all_masks[rows], all_masks[neg.text_idx[v]], all_masks[rows[v]]], dim=0)
        images = torch.cat([all_images[rows], all_images[rows[v]], all_images[neg.image_idx[v]]], dim=0)
        logits = self.encoder.itm_logits(states, masks, images)  # (B + 2*n_valid, 2)
        itm = self.itm(logits, itm_labels(pixels.shape[0], 2 * int(v.sum()), device=logits.device))

        loss = itc.loss + self.itm_weight * itm.loss
        parts = {"loss": loss.detach(), "loss_itc": itc.loss.detach(), "loss_itm": itm.loss.detach(), **{k: v2 for k, v2 in itm.parts.items() if k != "loss_itm"}, "scale": itc.parts["scale"]}
        return loss, parts


def parameter_groups(model: nn.Module, cfg: PipelineConfig, lr: float) -> list[dict]:
    """Pretrained tower weights at ``lr``; new heads (projections, fusion, ITM head, temperature) faster."""
    tower, head = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (tower if ".image_tower." in f".{name}" or ".text_tower." in f".{name}" else head).append(p)
    return [
        {"params": tower, "lr": lr},
        {"params": head, "lr": lr * cfg.train.head_lr_multiplier},
    ]


def image_stem_store_in_ray(cfg: PipelineConfig, products: pd.DataFrame, ray_storage: Path):
    """:func:`image_stem_store` computed in a one-shot Ray task rather than in the calling (Airflow) process.

    Decoding every photo and running the stem grows the process that does it (torch's pools, the decoder's buffers,
    glibc arenas that are not returned); in the Airflow worker that memory would stay for the whole of training
    (the grocery run's peak). The task's worker exits when it is done (``max_calls=1``), giving it back. A store
    that already covers the products is opened here without starting a task.
    """
    import ray

    from dashclip_core.models.image_stem import StemStore
    from dashclip_core.models.towers import has_frozen_stem
    from dashclip_core.training.ray_launcher import ensure_ray

    if not (cfg.train.stage1_stem_cache and has_frozen_stem(cfg.model.image)):
        return None  # no task for a tower without a frozen stem
    with_image = products.loc[products["image_uri"].notna(), ["product_id", "image_uri"]]
    existing = StemStore.open(ray_storage / IMAGE_STEM, cfg.model)
    if existing is not None and existing.covers(with_image["product_id"]):
        return existing
    ensure_ray(cfg)
    # One CPU reserved (as a training worker does) while the task runs ray.num_cpus torch threads: a reservation of
    # ray.num_cpus could never be placed on a cluster node with fewer CPUs.
    task = ray.remote(num_cpus=1, max_calls=1)(_stem_store_task)
    built, pid = ray.get(task.remote(cfg.to_dict(), with_image.reset_index(drop=True), str(ray_storage)))
    logger.info("image stem task done in Ray worker pid %d (the worker exits)", pid)
    return StemStore(ray_storage / IMAGE_STEM) if built else None


def _stem_store_task(cfg_dict: dict, products: pd.DataFrame, ray_storage: str) -> tuple[bool, int]:
    """(whether a store was built, this worker's pid, logged by the caller)."""
    import os

    return image_stem_store(PipelineConfig.from_dict(cfg_dict), products, Path(ray_storage)) is not None, os.getpid()


def build_stage1(cfg: PipelineConfig) -> Stage1Model:
    torch.manual_seed(cfg.train.seed)  # every rank builds the same initial weights
    return Stage1Model(cfg)


# ---- per-worker loop ---------------------------------------------------------------------------


def stage1_worker(config: dict) -> None:
    """Ray Train loop: one call per worker. ``config`` = {"pipeline": cfg dict, "n_pairs": rows of the ``pairs`` dataset,
    "mlflow": {...}, "stem_cache": ...}; the pairs arrive as the Ray Data dataset ``pairs`` (see :func:`epoch_shard`)."""
    import ray.train
    import ray.train.torch

    from dashclip_core.models.image_stem import StemRows
    from dashclip_core.storage.images import ImagePolicy
    from dashclip_core.training.checkpoints import epoch_seed
    from dashclip_core.training.ray_launcher import EpochMeter, start_worker
    from dashclip_core.training.schedule import apply_lr, stage_lr_factor

    cfg = PipelineConfig.from_dict(config["pipeline"])
    torch.set_num_threads(cfg.train.torch_threads_per_worker)

    n_pairs = int(config["n_pairs"])
    stem_cache = StemRows(config["stem_cache"]) if config.get("stem_cache") else None  # (N, C, h, w) float16, row = pairs.stem_row
    builder = InputBuilder(cfg.model, images=ImagePolicy.for_pipeline(cfg))  # the catalog's roots and limits
    model = build_stage1(cfg)
    w = start_worker(cfg, config, "stage1", model, parameter_groups(model, cfg, cfg.train.stage1_lr))
    rank, world, device, opt, base_lrs, precision, mlflow_log = w.rank, w.world, w.device, w.opt, w.base_lrs, w.precision, w.mlflow_log
    start_epoch, step = w.start_epoch, w.step
    model = ray.train.torch.prepare_model(model)  # DDP (gloo on CPU, nccl on GPU)

    for epoch in range(start_epoch, cfg.train.stage1_epochs):
        # Every random stream restarts from (seed, rank, epoch), so a run resumed here draws what an
        # uninterrupted run draws: dropout (torch's global generator), ITM negatives (gen), flips and text views (aug).
        torch.manual_seed(epoch_seed(cfg.train.seed, rank, epoch, 0))
        gen = torch.Generator().manual_seed(epoch_seed(cfg.train.seed, rank, epoch, 1))
        aug = torch.Generator().manual_seed(epoch_seed(cfg.train.seed, rank, epoch, 2))
        model.train()
        meter = EpochMeter(mlflow_log, cfg.train.stage1_batch_size)
        pairs, steps = epoch_shard(stream_frames("pairs"), n_pairs, cfg.train.stage1_batch_size, world, rank, cfg.train.seed,
                                   epoch, samples=cfg.train.stage1_samples_per_epoch)
        for i, idx in enumerate(steps):
            # ALBEF ramps the distillation weight up over the first epoch, while the momentum encoder is still poor.
            alpha = cfg.loss.distill_alpha * (min(1.0, (i + 1) / len(steps)) if epoch == 0 else 1.0)
            rows = pairs.iloc[idx]
            if stem_cache is not None:
                images = torch.from_numpy(stem_cache[rows["stem_row"].to_numpy()].astype(np.float32))
            else:
                images = builder.images(rows["image_uri"].tolist())
            images = flip_horizontally(images, cfg.train.stage1_flip_prob, aug)
            text = builder.product_texts(*text_views(rows, cfg.train.stage1_title_only_prob, aug))
            group_ids = torch.as_tensor(rows["group_id"].to_numpy())
            with precision.autocast():
                loss, parts = model(images.to(device), text["input_ids"].to(device), text["attention_mask"].to(device), group_ids.to(device), gen,
                                    from_stem=stem_cache is not None, alpha=alpha)
            opt.zero_grad(set_to_none=True)
            precision.backward(loss)
            apply_lr(opt, base_lrs, stage_lr_factor(cfg.train, step, len(steps), cfg.train.stage1_epochs))
            applied = precision.step(opt, loss, epoch, step)  # a non-finite step is skipped (and too many in a row fail)
            step += 1
            meter.add({**parts, "skipped_step": torch.tensor(0.0 if applied else 1.0)}, step)
        metrics = meter.finish(epoch, step)
        if rank == 0:  # the progress line `dashclip run` shows ("<what> epoch i/n ...")
            logger.info("stage1 epoch %d/%d: loss %.4f, %.1f samples/s", epoch + 1, cfg.train.stage1_epochs,
                        metrics.get("loss", float("nan")), metrics["samples_per_s"])
        w.end_epoch(model, epoch, step, metrics)


# ---- launcher ----------------------------------------------------------------------------------


def examples_dataset(cfg: PipelineConfig, examples, add=None):
    """A stage's examples as a Ray Data dataset with a ``row`` column (position in the table), in blocks of at most
    ``catalog.chunk_rows`` rows in Ray's object store: workers on any node stream it (no shared disk).

    ``examples``: a frame or a parquet path / folder of parts, put into the object store one chunk at a time, so the
    caller holds one chunk, never the table. ``add(chunk) -> chunk`` may add columns on the way (stage 1's stem rows).
    """
    import ray
    import ray.data

    from dashclip_core.storage.partitions import frame_chunks
    from dashclip_core.training.ray_launcher import ensure_ray

    ensure_ray(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    refs, offset = [], 0
    for chunk in frame_chunks(examples, max(1, cfg.catalog.chunk_rows)):
        chunk = chunk.reset_index(drop=True).assign(row=np.arange(offset, offset + len(chunk), dtype=np.int64))
        refs.append(ray.put(add(chunk) if add is not None else chunk))
        offset += len(chunk)
    return ray.data.from_pandas_refs(refs)


def train_stage1(cfg: PipelineConfig, products, out_dir: Path, ray_storage: Path, ray_name: str, mlflow_run: dict) -> dict:
    """Train the product encoder under Ray; write ``out_dir/product_encoder`` and return small metrics.

    Args:
        cfg: resolved config.
        products: validated catalog snapshot: the clean parts' path (read ``catalog.chunk_rows`` rows at a time,
            never whole) or a frame.
        out_dir: local staging folder of the step.
        ray_storage / ray_name: identify the Ray run (a retry with the same pair resumes).
        mlflow_run: {"tracking_uri", "run_id"} for per-step curves.
    """
    from dashclip_core.storage.partitions import select_rows
    from dashclip_core.training.checkpoints import stage_fingerprint
    from dashclip_core.training.precision import autocast_dtype
    from dashclip_core.training.ray_launcher import fit, read_checkpoint

    autocast_dtype(cfg.train.amp, "cuda")  # an unknown train.amp fails here, before Ray starts
    outputs = Stage1(out_dir)
    pairs = write_stage1_pairs(cfg, products, outputs.pairs)
    if pairs.n_pairs < cfg.train.stage1_batch_size:
        raise ValueError(
            f"stage1 needs at least train.stage1_batch_size={cfg.train.stage1_batch_size} products with image and text, "
            f"the snapshot has {pairs.n_pairs}"
        )
    t0 = time.time()
    if cfg.train.stage1_epochs > 0:
        # Scratch, not a step output: it lives beside Ray's checkpoints, so a retry (and the later steps) reuse it.
        # Every photo of the catalog (held-out ones too: the backfill and evaluate reuse the store).
        photos = select_rows(products, cfg.catalog.chunk_rows, lambda chunk: chunk["image_uri"].notna(),
                             columns=["product_id", "image_uri"])
        stem = image_stem_store_in_ray(cfg, photos, ray_storage)
        del photos

        def with_stem_rows(chunk: pd.DataFrame) -> pd.DataFrame:
            return chunk.assign(stem_row=np.array([stem.row[p] for p in chunk["product_id"]], np.int64)) if stem else chunk

        worker_config = {"pipeline": cfg.to_dict(), "n_pairs": pairs.n_pairs, "mlflow": mlflow_run, "stem_cache": f"{stem.path}.npy" if stem else ""}
        # What the checkpoints are trained from: a retry resumes them only when this is unchanged. The photos
        # count by their URI (their bytes are not hashed); the stem cache is a function of them and model.image.
        fingerprint = stage_fingerprint(cfg, "stage1", {"pairs": pairs.digest})
        result = fit(stage1_worker, worker_config, cfg, ray_name, ray_storage, fingerprint, "stage1",
                     datasets={"pairs": examples_dataset(cfg, pairs.path, add=with_stem_rows)})
        state = read_checkpoint(result)
        final_metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        precision = result.metrics.get("precision", "fp32")
    else:  # zero epochs: the untrained (initial) encoder, still a real model
        state = {"model": build_stage1(cfg).state_dict()}
        final_metrics, precision = {}, None
    model = build_stage1(cfg)
    model.load_state_dict(state["model"])
    save_encoder(model.encoder, cfg.model, outputs.product_encoder)
    info = {
        "n_pairs": pairs.n_pairs,
        "n_groups": pairs.n_groups,
        "train_seconds": round(time.time() - t0, 1),
        **{f"final_{k}": v for k, v in final_metrics.items()},
        "precision": precision,
        **count_parameters(model.encoder),
    }
    outputs.metrics.write_text(json.dumps(info, indent=2))
    return info
