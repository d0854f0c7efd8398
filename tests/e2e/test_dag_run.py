"""End to end with the real Airflow, Ray, MLflow, FAISS and Great Expectations on the tiny config.

One full ``dag.test()`` of dashclip_nightly; then re-running tasks with the same run id must do no
duplicate work and register no second model version; a second DAG run promotes by comparison.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ALL_TASKS = {
    "extract_catalog", "validate_catalog", "label_pairs", "validate_labels", "train_stage1", "train_stage2",
    "backfill_embeddings", "validate_embeddings", "build_index", "evaluate", "register_model",
}


def _dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["dashclip_nightly"]


def _states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


@pytest.fixture(scope="module")
def first_run(airflow_db, tiny_config):
    dr = _dag().test(run_conf={"config_path": str(tiny_config)})
    return dr


def test_every_task_succeeds(first_run):
    states = _states(first_run)
    assert set(states) == ALL_TASKS
    assert all(s == "success" for s in states.values()), states


def test_outputs_model_index_and_report(first_run, tiny_config):
    import numpy as np
    from mlflow.tracking import MlflowClient

    from dashclip_core.config import PipelineConfig
    from dashclip_core.index.faiss_index import ProductIndex
    from dashclip_core.storage import read_json
    from tasks.common import run_paths

    cfg = PipelineConfig.from_file(tiny_config)
    paths = run_paths(cfg, first_run.run_id)
    for step in ALL_TASKS:
        assert paths.is_done(step), step

    report = read_json(paths.local("evaluate") / "report.json")
    assert set(report["systems"]) == {"dashclip", "untrained_encoders", "bm25_titles"}
    assert 0.0 <= report["systems"]["dashclip"]["ndcg@10"] <= 1.0
    assert report["n_eval_queries"] > 0

    client = MlflowClient(cfg.tracking_uri())
    model = client.get_registered_model(cfg.registry.model_name)
    reg = read_json(paths.local("register_model") / "summary.json")
    assert model.aliases.get("challenger") == reg["version"]
    assert model.aliases.get("champion") == reg["version"]  # first model: no champion to beat
    version = client.get_model_version(cfg.registry.model_name, reg["version"])
    assert version.tags["airflow_run_id"] == first_run.run_id
    assert version.tags["catalog_snapshot"] == paths.uri("extract_catalog")

    # The index answers a query embedded by the registered model.
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(cfg.tracking_uri())
    pyfunc = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    q = pyfunc.predict(pd.DataFrame({"query_id": ["a"], "query": ["oat milk"]}))
    index = ProductIndex.load(paths.local("build_index"))
    scores, ids = index.search(np.asarray(q["embedding"].tolist(), np.float32), 5)
    assert len(ids[0]) == 5 and np.all(np.diff(scores[0]) <= 1e-6)
    products = set(pd.read_parquet(paths.local("validate_catalog") / "clean.parquet")["product_id"])
    assert set(ids[0]) <= products


def test_rerun_same_run_id_is_idempotent(first_run, tiny_config):
    from mlflow.tracking import MlflowClient

    from dashclip_core.config import PipelineConfig
    from tasks import steps
    from tasks.common import run_paths

    cfg = PipelineConfig.from_file(tiny_config)
    params = {"config_path": str(tiny_config)}
    paths = run_paths(cfg, first_run.run_id)
    stage1_dir = paths.local("train_stage1")
    mtimes = {p: p.stat().st_mtime_ns for p in stage1_dir.rglob("*")}
    n_versions = len(MlflowClient(cfg.tracking_uri()).search_model_versions(f"name = '{cfg.registry.model_name}'"))

    again = steps.train_stage1({}, params=params, run_id=first_run.run_id)
    assert again["uri"] == paths.uri("train_stage1")
    assert {p: p.stat().st_mtime_ns for p in stage1_dir.rglob("*")} == mtimes

    reg = steps.register_model({}, params=params, run_id=first_run.run_id)
    assert reg["uri"] == paths.uri("register_model")
    # Even with the step's marker gone (a crash after registering), no second version is created.
    import shutil

    shutil.rmtree(paths.local("register_model"))
    reg2 = steps.register_model({}, params=params, run_id=first_run.run_id)
    assert reg2["version"] == reg["version"] and reg2["created"] is False
    assert len(MlflowClient(cfg.tracking_uri()).search_model_versions(f"name = '{cfg.registry.model_name}'")) == n_versions
