"""Drill: SIGKILL one Ray Train worker mid-epoch; stage 1 must resume from its last checkpoint.

Two real stage-1 trainings (``dashclip_core/training/stage1.py::train_stage1`` through the real launcher, on
a real local Ray with 2 workers) of the same tiny config, each in its own child process (so each has its own
Ray, and a hang is bounded by a timeout):

1. uninterrupted;
2. killed: as soon as Ray has registered the epoch-0 checkpoint (it is in the run's checkpoint snapshot),
   one ``ray::RayTrainWorker`` process of that child's Ray (rank 0, the checkpoint writer, when Ray's log
   names it) is sent SIGKILL while it trains epoch 1. ``train.max_failures`` makes Ray
   Train restart the worker group from the last reported checkpoint.

The drill raises unless: the killed run finishes; a new worker group started; the first checkpoint after the
kill was resumed from the last one before it and no finished epoch was trained twice (<= 1 epoch of work
lost: the interrupted one); the final loss and the training-set retrieval recall@1 match the uninterrupted
run within :data:`LOSS_RTOL` / :data:`RECALL_ATOL` (recall@10); the final checkpoint loads (tensors only) and the product
encoder exists and loads. ``data_lost`` counts missing or half-written outputs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from drills import Row

EPOCHS = 4
NUM_PRODUCTS = 200  # ~150 image+text pairs: ~19 steps of 8 per epoch (seconds), so the kill lands mid-epoch
RUN_TIMEOUT_S = 480  # one child training (Ray start, 4 epochs, a restart) on a busy 2-core box
POLL_S = 0.05
LOSS_RTOL = 1e-3  # resumed vs uninterrupted final loss (same data order, same random streams per epoch)
RECALL_K = 10
RECALL_ATOL = 0.02  # resumed vs uninterrupted image->text recall@RECALL_K on the training pairs
WORKER_TITLE = "ray::RayTrainWorker"
RAY_NAME = "stage1"


@dataclass
class Watch:
    """What the parent saw of a child's training while it ran."""

    checkpoints: dict[str, dict] = field(default_factory=dict)  # checkpoint folder name -> its checkpoint.json
    workers_seen: set[int] = field(default_factory=set)
    killed_pid: int | None = None
    killed_rank: str = "rank unknown"
    killed_after_epoch: int | None = None  # newest checkpoint epoch when the kill was sent
    kill_delay_s: float | None = None  # seconds between that checkpoint appearing and the kill
    workers_at_kill: set[int] = field(default_factory=set)


def run(work: Path) -> Row:
    work = Path(work)
    config, products = _prepare(work)
    t0 = time.time()
    base_out, base_watch = _train(work / "uninterrupted", config, products, kill=False)
    base_s = time.time() - t0
    t0 = time.time()
    killed_out, watch = _train(work / "killed", config, products, kill=True)
    killed_s = time.time() - t0

    if watch.killed_pid is None:
        raise RuntimeError(f"the kill was never sent (no {WORKER_TITLE} process of the child's Ray was found); see {work / 'killed'}")
    restarted = watch.workers_seen - watch.workers_at_kill
    if not restarted:
        raise RuntimeError(f"no new {WORKER_TITLE} process started after pid {watch.killed_pid} was killed: the worker group was not restarted")
    timeline = sorted(watch.checkpoints.values(), key=lambda m: (m["step"], m["epoch"]))
    epochs = [m["epoch"] for m in timeline]
    if sorted(set(epochs)) != list(range(EPOCHS)):
        raise RuntimeError(f"killed run reported checkpoints of epochs {epochs}, expected each of 0..{EPOCHS - 1}")
    redone_full = len(epochs) - len(set(epochs))  # finished epochs trained a second time
    after = [m for m in timeline if m["epoch"] > watch.killed_after_epoch]
    first_after = after[0] if after else None
    if redone_full or first_after is None or first_after.get("resumed_from_epoch") != watch.killed_after_epoch:
        raise RuntimeError(f"killed after the epoch-{watch.killed_after_epoch} checkpoint, but the checkpoints were "
                           f"{[(m['epoch'], m.get('resumed_from_epoch')) for m in timeline]} ((epoch, resumed from)): "
                           "the run did not continue from its last checkpoint")
    epochs_redone = 1 + redone_full  # the interrupted epoch, begun again from the checkpoint before it

    base, killed = _outputs(base_out), _outputs(killed_out)
    data_lost = base.missing + killed.missing
    loss_diff = abs(killed.loss - base.loss) / max(abs(base.loss), 1e-12)
    recall_diff = abs(killed.recall - base.recall)
    if loss_diff > LOSS_RTOL or recall_diff > RECALL_ATOL:
        raise RuntimeError(f"resumed run differs from the uninterrupted one: final loss {killed.loss:.6f} vs {base.loss:.6f} "
                           f"(rel {loss_diff:.2e} > {LOSS_RTOL}?), train recall@{RECALL_K} {killed.recall:.3f} vs {base.recall:.3f} "
                           f"(diff {recall_diff:.3f} > {RECALL_ATOL}?)")
    base_times = sorted(m["seen_at"] for m in base_watch.checkpoints.values())
    epoch_s = (base_times[-1] - base_times[0]) / max(len(base_times) - 1, 1)
    return Row(
        fault=f"SIGKILL Ray Train worker pid {watch.killed_pid} ({watch.killed_rank}, of 2) {watch.kill_delay_s:.2f}s into "
              f"stage-1 epoch {watch.killed_after_epoch + 2}/{EPOCHS} (epochs take ~{epoch_s:.1f}s)",
        what_happened=(
            f"Ray restarted the worker group ({len(restarted)} new workers) from the checkpoint after epoch "
            f"{watch.killed_after_epoch + 1}/{EPOCHS}; epochs re-done {epochs_redone} (the interrupted one), finished epochs "
            f"trained twice {redone_full}; final loss {killed.loss:.5f} vs uninterrupted {base.loss:.5f} (rel diff "
            f"{loss_diff:.1e}, tol {LOSS_RTOL:g}); train image->text recall@{RECALL_K} {killed.recall:.3f} vs {base.recall:.3f} "
            f"(tol {RECALL_ATOL:g}); final checkpoint (epoch {killed.final_epoch + 1}/{EPOCHS}) loads weights_only, product "
            f"encoder loads; {killed_s:.0f}s vs {base_s:.0f}s uninterrupted"
        ),
        data_lost=data_lost,
    )


# ---- setup -------------------------------------------------------------------------------------


def _prepare(work: Path) -> tuple[Path, Path]:
    """A tiny config with EPOCHS epochs on 2 workers, and a demo catalog snapshot's products (parquet)."""
    import yaml

    from dashclip_core.catalog.demo import generate_demo_catalog
    from dashclip_core.catalog.snapshot import extract_snapshot
    from dashclip_core.config import PipelineConfig
    from drills.env import ROOT

    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["name"] = "ray-worker-kill"
    raw["train"].update({"stage1_epochs": EPOCHS, "stage1_batch_size": 8, "num_workers": 2, "max_failures": 2})
    raw.setdefault("ray", {})["num_cpus"] = 2
    raw["catalog"]["image_roots"] = [str(work / "catalog")]  # the generated catalog's photos (not the config's own folder)
    config = work / "ray_worker_kill.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    products = work / "snapshot" / "products.parquet"
    if not products.exists():
        db = generate_demo_catalog(work / "catalog", num_products=NUM_PRODUCTS, seed=3)
        products.parent.mkdir(parents=True, exist_ok=True)
        extract_snapshot(PipelineConfig.from_file(config), f"sqlite:///{db}", products.parent)
    return config, products


# ---- one training in a child process -----------------------------------------------------------


def _train(folder: Path, config: Path, products: Path, kill: bool) -> tuple[Path, Watch]:
    """Run stage 1 in a child (own session, so a timeout can end its whole Ray); kill a worker when asked."""
    out, storage = folder / "out", folder / "ray"
    out.mkdir(parents=True, exist_ok=True)
    storage.mkdir(parents=True, exist_ok=True)
    log = folder / "train.log"
    watch = Watch()
    with open(log, "w") as log_file:
        child = subprocess.Popen([sys.executable, "-m", "drills.ray_worker_kill", "train", str(config), str(products), str(out), str(storage)],
                                 cwd=Path(__file__).resolve().parent.parent, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + RUN_TIMEOUT_S
        try:
            while child.poll() is None:
                if time.time() > deadline:
                    raise TimeoutError(f"stage-1 training did not finish in {RUN_TIMEOUT_S}s; log {log}")
                _observe(watch, storage / RAY_NAME, child.pid, kill)
                time.sleep(POLL_S)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait(timeout=30)
    _observe(watch, storage / RAY_NAME, child.pid, kill=False)
    if child.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"stage-1 training exited with {child.returncode} (kill={kill}); log {log}:\n{tail}")
    return out, watch


def _observe(watch: Watch, run_dir: Path, child_pid: int, kill: bool) -> None:
    """Record new checkpoints and worker processes; send the kill as soon as Ray has registered the first one.

    Registered = named in the run's checkpoint snapshot (what Ray resumes from). A checkpoint folder that is
    written but not yet registered dies with its worker: killing then would lose that epoch too, which is
    Ray's documented behaviour (it resumes from the last *reported* checkpoint), not a mid-epoch kill."""
    from dashclip_core.training.checkpoints import checkpoint_folders, read_meta, registered_checkpoint

    for folder in checkpoint_folders(run_dir):
        if folder.name not in watch.checkpoints:
            meta = read_meta(folder)  # None while Ray is still copying it in: read again next poll
            if meta is not None and "epoch" in meta:
                watch.checkpoints[folder.name] = {**meta, "seen_at": time.time()}
    workers = _train_workers(child_pid)
    watch.workers_seen |= set(workers)
    if not kill or watch.killed_pid is not None or not workers:
        return
    registered = registered_checkpoint(run_dir)
    meta = watch.checkpoints.get(registered.name) if registered is not None else None
    if meta is None:
        return
    pid, rank = _pick_rank0(workers, run_dir.parent.parent / "train.log")
    os.kill(pid, signal.SIGKILL)
    watch.killed_pid, watch.killed_rank, watch.killed_after_epoch = pid, rank, meta["epoch"]
    watch.kill_delay_s = time.time() - meta["seen_at"]
    watch.workers_at_kill = set(workers)


def _train_workers(child_pid: int) -> list[int]:
    """PIDs of the Ray Train worker processes started by this child's Ray (its descendants), not anyone else's."""
    import psutil

    try:
        descendants = psutil.Process(child_pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for proc in descendants:
        try:
            if " ".join(proc.cmdline()).startswith(WORKER_TITLE):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return sorted(found)


def _pick_rank0(workers: list[int], log: Path) -> tuple[int, str]:
    """(pid, which rank) of the rank-0 worker (it writes the checkpoints) when Ray's start-up line names it, else the first."""
    import re

    text = log.read_text(errors="replace") if log.exists() else ""
    for pid in workers:
        if re.search(rf"pid={pid}\) world_rank=0\b", text):
            return pid, "rank 0"
    return workers[0], "rank unknown"


# ---- outputs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    loss: float
    recall: float  # image->text recall@RECALL_K
    final_epoch: int
    missing: int  # expected outputs absent or unreadable


def _outputs(out: Path) -> Outputs:
    """Final loss, image->text recall@1 of the saved product encoder on the training pairs, and what is missing."""
    import pandas as pd

    from dashclip_core.layout import PRODUCT_ENCODER
    from dashclip_core.models.encoders import load_product_encoder
    from dashclip_core.training.checkpoints import read_checkpoint, resumable_checkpoint

    metrics = json.loads((out / "metrics.json").read_text())
    missing = 0
    final = resumable_checkpoint(out.parent / "ray" / RAY_NAME)
    try:
        _, meta = read_checkpoint(final)
        final_epoch = meta["epoch"]
        if final_epoch != EPOCHS - 1:
            missing += 1
    except (TypeError, ValueError, OSError):
        missing, final_epoch = missing + 1, -1
    try:
        encoder = load_product_encoder(out / PRODUCT_ENCODER)
    except (OSError, ValueError, RuntimeError):
        return Outputs(metrics["final_loss"], float("nan"), final_epoch, missing + 1)
    pairs = pd.read_parquet(out / "stage1_pairs.parquet")
    return Outputs(metrics["final_loss"], _recall_at_k(encoder, pairs, RECALL_K), final_epoch, missing)


def _recall_at_k(encoder, pairs, k: int) -> float:
    """Share of training photos with a text of their own group among their ``k`` nearest product texts (cosine)."""
    import torch

    from dashclip_core.models.inputs import InputBuilder

    builder = InputBuilder(encoder.cfg)
    with torch.no_grad():
        image = encoder.encode_image(builder.images(pairs["image_uri"].tolist()))[0]
        tok = builder.product_texts(pairs["title"].tolist(), pairs["description"].tolist())
        text = encoder.encode_text(tok["input_ids"], tok["attention_mask"])[0]
    top = (image @ text.T).topk(min(k, len(pairs)), dim=1).indices.numpy()  # (N, k)
    groups = pairs["group_id"].to_numpy()
    return float((groups[top] == groups[:, None]).any(axis=1).mean())


# ---- child entry point -------------------------------------------------------------------------


def _child(config: str, products: str, out: str, storage: str) -> None:
    import logging

    import pandas as pd

    from dashclip_core.config import PipelineConfig
    from dashclip_core.training.stage1 import train_stage1

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = PipelineConfig.from_file(Path(config))
    info = train_stage1(cfg, pd.read_parquet(products), Path(out), Path(storage), RAY_NAME, {"tracking_uri": "", "run_id": ""})
    print(json.dumps({"final_epoch": info.get("final_epoch"), "final_loss": info.get("final_loss")}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "train":
        _child(*sys.argv[2:])
    else:
        sys.exit("usage: python -m drills.ray_worker_kill train CONFIG PRODUCTS OUT STORAGE (the drill runs it; use python -m drills ray_worker_kill)")
