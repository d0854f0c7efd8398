"""The few Ray touch points: start/connect Ray, run a ``TorchTrainer``, save/restore checkpoints.

Ray Train V2 (Ray 2.60): a run resumes when it is re-created with the same ``storage_path`` and
``name``; each worker then reads ``ray.train.get_checkpoint()``. Every worker calls
``ray.train.report`` the same number of times; only rank 0 attaches a checkpoint and logs.

Within one ``fit``, a worker that dies or raises makes Ray restart the whole worker group from the last
reported checkpoint, up to ``train.max_failures`` times (``FailureConfig``). Across ``fit`` calls (a
retried task), :func:`~dashclip_core.training.checkpoints.choose_run_name` resumes a run only when its
checkpoints were trained from the same config and data (see ``checkpoints.py`` for the file format).
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
from dashclip_core.training.checkpoints import Fingerprint, choose_run_name, write_checkpoint
from dashclip_core.training.checkpoints import read_checkpoint as read_checkpoint_folder

logger = logging.getLogger(__name__)

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


def fit(train_fn: Callable[[dict], None], loop_config: dict, cfg: PipelineConfig, name: str, storage_path: Path,
        fingerprint: Fingerprint, stage: str, datasets: dict | None = None):
    """Run ``train_fn`` on ``cfg.train.num_workers`` Ray workers and return the ``ray.train.Result``.

    Args:
        train_fn: per-worker loop (module-level function, importable on the workers).
        loop_config: JSON-able dict given to every worker (``fingerprint`` is added).
        cfg: resolved pipeline config (scaling and ``max_failures`` come from ``cfg.train``).
        name: run name; with ``storage_path`` it identifies the run, so a retry with the same inputs resumes it
            (other inputs train under another name, see :func:`choose_run_name`).
        storage_path: where Ray keeps checkpoints (a local folder).
        fingerprint: what this run is trained from; every checkpoint records it.
        stage: "stage1" / "stage2", for messages.
        datasets: name -> Ray Data dataset of the stage's examples. Every worker gets the whole stream
            (``ray.train.get_dataset_shard(name)``, not split by Ray): each keeps the rows of its own slice of
            every global batch (:func:`~dashclip_core.training.stage1.epoch_shard`), so the data order does not
            depend on the worker count and no worker reads the driver's disk.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ensure_ray(cfg)
    name = choose_run_name(Path(storage_path), name, fingerprint, stage)
    loop_config = {**loop_config, "fingerprint": fingerprint.to_json()}
    scaling = ScalingConfig(
        num_workers=cfg.train.num_workers,
        use_gpu=cfg.train.use_gpu,
        resources_per_worker={"CPU": 1},
    )
    from ray.train import DataConfig

    trainer = TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=scaling,
        datasets=datasets or None,
        dataset_config=DataConfig(datasets_to_split=[]),
        run_config=RunConfig(name=name, storage_path=str(storage_path), checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def save_checkpoint(state: dict, meta: dict, metrics: dict) -> None:
    """Report ``metrics``; rank 0 also attaches a checkpoint of ``state`` (tensors) and ``meta`` (JSON). Call on every worker."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(Path(tmp), state, meta)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def load_latest_checkpoint(fingerprint: dict) -> tuple[dict, dict] | None:
    """(state, meta) saved by :func:`save_checkpoint` in an earlier attempt of this run, if any.

    Raises when that checkpoint was trained from other inputs than ``fingerprint`` (JSON form). The
    launcher already picked a run whose checkpoints match, so this only fires if a folder was swapped."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        state, meta = read_checkpoint_folder(Path(d))
    recorded = (meta.get("fingerprint") or {}).get("digest")
    if recorded != fingerprint["digest"]:
        raise RuntimeError(f"checkpoint {ckpt.path} was trained from other inputs (fingerprint {str(recorded)[:12]}, "
                           f"this run {fingerprint['digest'][:12]}); refusing to resume from it")
    return state, meta


def resume(model: torch.nn.Module, opt: torch.optim.Optimizer, stage: str, fingerprint: dict, precision=None) -> tuple[int, int]:
    """Load the latest checkpoint of this run into ``model``/``opt`` (and the fp16 loss scale into
    ``precision``, a :class:`~dashclip_core.training.precision.MixedPrecision`); return (start_epoch, step)."""
    loaded = load_latest_checkpoint(fingerprint)
    if loaded is None:
        return 0, 0
    state, meta = loaded
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if precision is not None:
        precision.load_state_dict(state.get("precision"))
    logger.info("%s resumes from the checkpoint after epoch %d (step %d)", stage, meta["epoch"] + 1, meta["step"])
    return meta["epoch"] + 1, meta["step"]


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
        fingerprint: what the run is trained from (JSON form), recorded in every checkpoint.
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
    fingerprint: dict

    def end_epoch(self, model: torch.nn.Module, epoch: int, step: int, metrics: dict) -> None:
        """Checkpoint after ``epoch`` and report ``metrics`` (on every worker)."""
        end_epoch(model, self.opt, epoch, step, metrics, self.precision,
                  meta={"epoch": epoch, "step": step, "resumed_from_epoch": self.start_epoch - 1 if self.start_epoch else None,
                        "fingerprint": self.fingerprint})


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
    fingerprint = loop_config["fingerprint"]
    start_epoch, step = resume(model, opt, stage, fingerprint, precision)  # a retried run continues after its last finished epoch
    mlflow = loop_config["mlflow"]
    rank = ctx.get_world_rank()
    return WorkerStart(cfg, rank, ctx.get_world_size(), device, opt, base_lrs, precision, start_epoch, step,
                       MetricsLogger(mlflow["tracking_uri"], mlflow["run_id"], stage, enabled=rank == 0), fingerprint)


def end_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, epoch: int, step: int, metrics: dict, precision=None,
              meta: dict | None = None) -> None:
    """Checkpoint the unwrapped model, the optimizer (and the loss scale of ``precision``) after an epoch and
    report (on every worker). ``meta`` (JSON) goes to ``checkpoint.json``; epoch and step are always in it."""
    inner = model.module if hasattr(model, "module") else model
    state = {"model": inner.state_dict(), "optimizer": opt.state_dict()}
    if precision is not None:
        state["precision"] = precision.state_dict()
        metrics = {**metrics, "precision": precision.name, "skipped_steps_total": precision.skipped_total}
    save_checkpoint(state, {**(meta or {}), "epoch": epoch, "step": step}, metrics)


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
    """The tensors of the final checkpoint of a ``ray.train.Result`` (loaded with ``weights_only=True``)."""
    with result.checkpoint.as_directory() as d:
        return read_checkpoint_folder(Path(d))[0]


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
