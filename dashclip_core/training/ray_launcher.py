"""The few Ray touch points: start/connect Ray, run a ``TorchTrainer``, save/restore checkpoints.

Ray Train V2 (Ray 2.60): a run resumes when it is re-created with the same ``storage_path`` and
``name``; each worker then reads ``ray.train.get_checkpoint()``. Every worker calls
``ray.train.report`` the same number of times; only rank 0 attaches a checkpoint and logs.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dashclip_core.config import PipelineConfig

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"

# Defaults for a local, single-machine Ray (see ../shared/STACK.md); an explicit environment wins.
_LOCAL_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",  # otherwise token auth writes a token file under $HOME
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # each report() otherwise waits for a 2 s poll
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def ensure_ray(cfg: PipelineConfig) -> None:
    """Connect to ``cfg.ray.address`` or start a local Ray with ``cfg.ray.num_cpus`` CPUs (once per process)."""
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=True)
        return
    for key, value in _LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {k: os.environ[k] for k in _LOCAL_RAY_ENV}})


def fit(train_fn: Callable[[dict], None], loop_config: dict, cfg: PipelineConfig, name: str, storage_path: Path):
    """Run ``train_fn`` on ``cfg.train.num_workers`` Ray workers and return the ``ray.train.Result``.

    Args:
        train_fn: per-worker loop (module-level function, importable on the workers).
        loop_config: JSON-able dict given to every worker.
        cfg: resolved pipeline config (scaling comes from ``cfg.train``).
        name: run name; with ``storage_path`` it identifies the run, so a retry resumes it.
        storage_path: where Ray keeps checkpoints (a local folder, or a URI Ray supports).
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(cfg)
    scaling = ScalingConfig(
        num_workers=cfg.train.num_workers,
        use_gpu=cfg.train.use_gpu,
        resources_per_worker={"CPU": 1},
    )
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=RunConfig(name=name, storage_path=str(storage_path), checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def save_checkpoint(state: dict, metrics: dict) -> None:
    """Report ``metrics``; rank 0 also attaches ``state`` as a checkpoint. Call on every worker."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def load_latest_checkpoint() -> dict | None:
    """The state saved by :func:`save_checkpoint` in an earlier attempt of this run, if any."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def resume(model: torch.nn.Module, opt: torch.optim.Optimizer, stage: str, precision=None) -> tuple[int, int]:
    """Load the latest checkpoint of this run into ``model``/``opt`` (and the fp16 loss scale into
    ``precision``, a :class:`~dashclip_core.training.precision.MixedPrecision`); return (start_epoch, step)."""
    state = load_latest_checkpoint()
    if state is None:
        return 0, 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if precision is not None:
        precision.load_state_dict(state.get("precision"))
    logger.info("%s resumes at epoch %d (step %d)", stage, state["epoch"] + 1, state["step"])
    return state["epoch"] + 1, state["step"]


@dataclass
class WorkerStart:
    """What every Ray Train worker sets up before its epochs, the same way in both stages.

    Attributes:
        cfg: the pipeline config the launcher passed (``loop_config["pipeline"]``).
        rank / world: this worker's rank and the number of workers.
        device: the worker's torch device (CPU, or its GPU).
        opt: AdamW over ``parameter_groups`` (stage learning rate, weight decay).
        base_lrs: each group's learning rate before a resume (the checkpoint's optimizer holds a decayed one).
        precision: :class:`~dashclip_core.training.precision.MixedPrecision` of ``train.amp``.
        start_epoch / step: where a retried run continues (0, 0 for a fresh run).
        mlflow_log: per-step metrics from rank 0.
    """

    cfg: PipelineConfig
    rank: int
    world: int
    device: torch.device
    opt: torch.optim.Optimizer
    base_lrs: list[float]
    precision: object
    start_epoch: int
    step: int
    mlflow_log: MetricsLogger


def start_worker(cfg: PipelineConfig, loop_config: dict, stage: str, model: torch.nn.Module, param_groups: list[dict]) -> WorkerStart:
    """Optimizer (AdamW over ``param_groups``), precision, resume from the latest checkpoint and the MLflow logger
    of a worker whose thread count is already set. Call before ``prepare_model``: the checkpoint holds the
    unwrapped model.
    """
    import ray.train
    import ray.train.torch

    from dashclip_core.training.precision import MixedPrecision

    ctx = ray.train.get_context()
    opt = torch.optim.AdamW(param_groups, weight_decay=cfg.train.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]  # before resume: the checkpoint's optimizer holds a decayed rate
    device = ray.train.torch.get_device()
    precision = MixedPrecision(cfg.train.amp, device, cfg.train.max_nonfinite_steps, stage)
    start_epoch, step = resume(model, opt, stage, precision)  # a retried run continues after its last finished epoch
    mlflow = loop_config["mlflow"]
    rank = ctx.get_world_rank()
    return WorkerStart(cfg, rank, ctx.get_world_size(), device, opt, base_lrs, precision, start_epoch, step,
                       MetricsLogger(mlflow["tracking_uri"], mlflow["run_id"], stage, enabled=rank == 0))


def end_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int, step: int, metrics: dict, precision=None) -> None:
    """Checkpoint the unwrapped model, the optimizer (and the loss scale of ``precision``) after an epoch and
    report (on every worker)."""
    inner = model.module if hasattr(model, "module") else model
    state = {"model": inner.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "step": step}
    if precision is not None:
        state["precision"] = precision.state_dict()
        metrics = {**metrics, "precision": precision.name, "skipped_steps_total": precision.skipped_total}
    save_checkpoint(state, metrics)


class EpochMeter:
    """Per-step values to MLflow and their epoch means (+ samples/s) for ``ray.train.report``."""

    def __init__(self, mlflow_log: MetricsLogger, batch_size: int) -> None:
        self.mlflow_log, self.batch_size = mlflow_log, batch_size
        self.sums: dict[str, float] = {}
        self.n_steps, self.t0, self.t_first = 0, time.time(), None

    def add(self, parts: dict[str, torch.Tensor], step: int) -> None:
        values = {k: float(v) for k, v in parts.items() if torch.isfinite(v)}  # e.g. no negative in a batch -> NaN part
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n_steps += 1
        if self.n_steps == 1:
            self.t_first = time.time()
        self.mlflow_log.log(values, step)

    def finish(self, epoch: int, step: int) -> dict:
        metrics = {k: v / max(self.n_steps, 1) for k, v in self.sums.items()}
        now = time.time()
        metrics.update(epoch=epoch, step=step, samples_per_s=self.n_steps * self.batch_size / max(now - self.t0, 1e-9))
        if self.n_steps > 1:
            # after the first step, which pays one-off costs (DDP's bucket rebuild, allocator warm-up, first gloo
            # connections): what the rest of a long epoch runs at
            metrics["steady_samples_per_s"] = (self.n_steps - 1) * self.batch_size / max(now - self.t_first, 1e-9)
        self.mlflow_log.log({f"epoch_{k}": v for k, v in metrics.items() if k not in ("epoch", "step")}, epoch)
        return metrics


def read_checkpoint(result) -> dict:
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


class MetricsLogger:
    """Per-step metrics to MLflow from rank 0 (``train/<name>``); a no-op without a run id."""

    def __init__(self, tracking_uri: str, run_id: str, prefix: str, enabled: bool) -> None:
        self.enabled = enabled and bool(run_id)
        self.prefix, self.run_id = prefix, run_id
        if self.enabled:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"{self.prefix}/{k}", float(v), now, step) for k, v in metrics.items()])
