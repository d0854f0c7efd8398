"""Shared plumbing of the task functions: config from DAG params, run paths, idempotent steps, step inputs,
gate failures.

Standard library + ``dashclip_core.config`` / ``layout`` / ``storage`` / ``redaction`` and ``tasks.masking`` only
(DAG files import this).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dashclip_core.config import DEFAULT_CONFIG, PROJECT_ROOT, PipelineConfig
from dashclip_core.layout import DAG_ID, SUMMARY, Step, StepFolder
from dashclip_core.redaction import redact_value
from dashclip_core.storage import SUCCESS, RunPaths, exists, localize, read_json, write_json
from tasks.masking import protect_config

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_DIRS_ENV", "DAG_ID", "DEFAULT_CONFIG", "PARAM_OVERRIDES", "allowed_config_dirs", "allowed_config_path",
           "fail", "mlflow_run", "ray_storage", "resolve_config", "run_paths", "run_step", "step_input"]

View = TypeVar("View", bound=StepFolder)

# DAG param -> config fields it overrides (None / missing = keep the config's value).
PARAM_OVERRIDES: dict[str, tuple[str, ...]] = {
    "sample_size": ("catalog.sample_size",),
    "epochs": ("train.stage1_epochs", "train.stage2_epochs"),
    "num_workers": ("train.num_workers",),
    "use_gpu": ("train.use_gpu",),
    "promote": ("registry.promote",),
    "labeler": ("labeling.labeler",),
    "llm_model": ("labeling.llm_model",),
    "max_cost_usd": ("labeling.max_cost_usd",),
    "labeling_dry_run": ("labeling.dry_run",),
}


CONFIG_DIRS_ENV = "DASHCLIP_CONFIG_DIRS"  # os.pathsep-separated folders whose YAML files a run's config_path may name


def allowed_config_dirs() -> list[Path]:
    """The folders a run's ``config_path`` may point into: the project's ``configs/`` and ``$DASHCLIP_CONFIG_DIRS``."""
    extra = [Path(p) for p in os.environ.get(CONFIG_DIRS_ENV, "").split(os.pathsep) if p.strip()]
    return [d.resolve() for d in (PROJECT_ROOT / "configs", *extra)]


def allowed_config_path(config_path: str) -> Path:
    """``config_path`` (relative to the project root, or absolute) as a resolved path, if it names a YAML file
    inside an allowed folder (after resolving symlinks and ``..``).

    A run's params come from whoever can trigger the DAG; the config decides where the run reads and
    writes (storage root, catalog and MLflow URLs), so it must be one the operator put in place.

    Raises:
        ValueError: the path is not a ``.yaml``/``.yml`` file inside an allowed folder; the message names the
            path, what it resolves to and the allowed folders.
    """
    path = Path(config_path)
    resolved = (path if path.is_absolute() else PROJECT_ROOT / path).resolve()
    allowed = allowed_config_dirs()
    if resolved.suffix.lower() not in (".yaml", ".yml") or not any(resolved.is_relative_to(d) for d in allowed):
        raise ValueError(f"config_path {str(config_path)!r} (resolves to {resolved}) is not a YAML file under an allowed "
                         f"config folder ({', '.join(map(str, allowed))}); put it under configs/ or add its folder "
                         f"to ${CONFIG_DIRS_ENV}")
    return resolved


def resolve_config(params: dict | None) -> PipelineConfig:
    """The run's config: ``params['config_path']`` (only inside :func:`allowed_config_dirs`) plus the param
    overrides of a manual trigger. Its secrets are registered for masking (:func:`tasks.masking.protect_config`).

    Raises:
        AirflowFailException: ``config_path`` is outside the allowed folders (a retry would not help).
    """
    params = params or {}
    try:
        path = allowed_config_path(params.get("config_path") or DEFAULT_CONFIG)
    except ValueError as err:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(str(err)) from err
    cfg = PipelineConfig.from_file(path)
    overrides = {}
    for name, fields in PARAM_OVERRIDES.items():
        value = params.get(name)
        if value is not None and value != "":
            overrides.update({f: value for f in fields})
    cfg = cfg.with_overrides(**overrides) if overrides else cfg
    protect_config(cfg)
    return cfg


def run_paths(cfg: PipelineConfig, run_id: str | None) -> RunPaths:
    if not run_id:
        raise ValueError("run_id is required (Airflow passes it; call tasks with run_id=... outside Airflow)")
    return RunPaths(cfg.storage_root(), DAG_ID, run_id, s3_endpoint_url=cfg.storage.s3_endpoint_url, cache_dir=cfg.cache_dir(),
                    s3_max_attempts=cfg.storage.s3_max_attempts)


def release_freed_memory() -> None:
    """Hand the memory a finished step freed back to the OS.

    glibc keeps freed heap in its arenas, so a process that ran one step (a labeler fit, a frame of the catalog)
    would carry that peak into the next: ``airflow dags test`` (``make run``) runs every step in one process, and a
    worker process may run several tasks. ``malloc_trim(0)`` returns what is free; elsewhere than glibc, a no-op.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_step(paths: RunPaths, step: Step, body: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body(staging_dir)`` once per run: publish its folder atomically with ``summary.json``.

    A step already published for this run is not run again: its summary is returned, so Airflow
    retries and re-runs neither redo work nor produce a second copy.
    """
    step = Step(step)
    if paths.is_done(step):
        logger.info("%s already done for run %s; reusing %s", step, paths.run_id, paths.uri(step))
    else:
        t0 = time.time()
        try:
            with paths.step_output(step) as out:
                summary = redact_value(body(out))  # summary.json and the XCom never carry a secret
                summary["seconds"] = round(time.time() - t0, 2)
                write_json(out / SUMMARY, summary)
        finally:
            release_freed_memory()
    return redact_value({"uri": paths.uri(step), **read_json(paths.local(step) / SUMMARY)})


def step_input(cfg: PipelineConfig, upstream: dict[str, Any], view: type[View]) -> View:
    """The published output an upstream step's summary (its XCom value) points to, as the typed view of its folder.

    The summary's ``uri`` is the handle: a task never guesses a sibling folder by name, so a step can be
    re-pointed (another run's snapshot, an S3 copy) by what its upstream returned.

    Raises:
        ValueError: ``upstream`` is not a step summary (no ``uri``).
        FileNotFoundError: the output at ``uri`` was never published (no ``_SUCCESS`` marker).
    """
    uri = (upstream or {}).get("uri") if isinstance(upstream, dict) else None
    if not uri:
        raise ValueError(f"expected an upstream step summary with a 'uri' (the XCom of a dashclip step), got {upstream!r}")
    if not exists(f"{uri}/{SUCCESS}", cfg.storage.s3_endpoint_url, cfg.storage.s3_max_attempts):
        raise FileNotFoundError(f"{uri} has no {SUCCESS} marker: the upstream step did not publish it")
    return view(localize(uri, cfg.storage.s3_endpoint_url, cfg.cache_dir(), max_attempts=cfg.storage.s3_max_attempts))


def fail(message: str) -> None:
    """Stop the DAG without retries: bad data does not get better on a retry."""
    from airflow.sdk.exceptions import AirflowFailException

    raise AirflowFailException(message)


def mlflow_run(cfg: PipelineConfig, run_id: str) -> dict[str, str]:
    from dashclip_core.registry.mlflow_registry import pipeline_run

    return {"tracking_uri": cfg.tracking_uri(), "run_id": pipeline_run(cfg, run_id, DAG_ID)}


def ray_storage(cfg: PipelineConfig, paths: RunPaths) -> Path:
    """Where Ray keeps this run's training checkpoints: stable per run, so a retried task resumes."""
    path = cfg.cache_dir() / "ray" / paths.dag_id / paths.run_key
    path.mkdir(parents=True, exist_ok=True)
    return path
