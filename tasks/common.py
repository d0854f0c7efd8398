"""Shared plumbing of the task functions: config from DAG params, run paths, idempotent steps, step inputs,
gate failures.

Standard library + ``dashclip_core.config`` / ``layout`` / ``storage`` only (DAG files import this).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dashclip_core.config import DEFAULT_CONFIG, PipelineConfig
from dashclip_core.layout import DAG_ID, SUMMARY, Step, StepFolder
from dashclip_core.storage import SUCCESS, RunPaths, exists, localize, read_json, write_json

logger = logging.getLogger(__name__)

__all__ = ["DAG_ID", "DEFAULT_CONFIG", "PARAM_OVERRIDES", "fail", "mlflow_run", "ray_storage", "resolve_config", "run_paths",
           "run_step", "step_input"]

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


def resolve_config(params: dict | None) -> PipelineConfig:
    """The run's config: ``params['config_path']`` plus the param overrides of a manual trigger."""
    params = params or {}
    cfg = PipelineConfig.from_file(params.get("config_path") or DEFAULT_CONFIG)
    overrides = {}
    for name, fields in PARAM_OVERRIDES.items():
        value = params.get(name)
        if value is not None and value != "":
            overrides.update({f: value for f in fields})
    return cfg.with_overrides(**overrides) if overrides else cfg


def run_paths(cfg: PipelineConfig, run_id: str | None) -> RunPaths:
    if not run_id:
        raise ValueError("run_id is required (Airflow passes it; call tasks with run_id=... outside Airflow)")
    return RunPaths(cfg.storage_root(), DAG_ID, run_id, s3_endpoint_url=cfg.storage.s3_endpoint_url, cache_dir=cfg.cache_dir())


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
        with paths.step_output(step) as out:
            summary = body(out)
            summary["seconds"] = round(time.time() - t0, 2)
            write_json(out / SUMMARY, summary)
    return {"uri": paths.uri(step), **read_json(paths.local(step) / SUMMARY)}


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
    if not exists(f"{uri}/{SUCCESS}", cfg.storage.s3_endpoint_url):
        raise FileNotFoundError(f"{uri} has no {SUCCESS} marker: the upstream step did not publish it")
    return view(localize(uri, cfg.storage.s3_endpoint_url, cfg.cache_dir()))


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
