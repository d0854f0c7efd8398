"""The ``dashclip`` console script: every command offered, Airflow only at the edge, the summary read through the layout."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from dashclip_core.layout import DAG_ID, SUMMARY, Step
from dashclip_core.storage import RunPaths
from orchestration.cli import build_parser, main
from orchestration.runs import TaskState, airflow_env
from orchestration.summary import summary_lines

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["run", "summary", "embed", "search", "evaluate"]


def test_console_script_is_the_orchestration_cli() -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "dashclip"]
    assert script.value == "orchestration.cli:main"


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in COMMANDS)
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    assert list(sub.choices) == COMMANDS


@pytest.mark.parametrize("module", ["dashclip_core.cli", "orchestration.cli"])
def test_the_clis_import_no_airflow(module: str) -> None:
    """The library never needs Airflow; the orchestration CLI imports it only when ``run``/``summary`` read a run."""
    code = (f"import sys, {module}; heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('airflow', 'torch', 'ray', 'mlflow', 'faiss')); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_library_main_offers_only_library_commands(capsys) -> None:
    from dashclip_core.cli import main as library_main

    with pytest.raises(SystemExit):
        library_main(["run"])
    assert "invalid choice: 'run'" in capsys.readouterr().err


def test_airflow_env_fills_in_what_make_exports_and_keeps_what_is_set(tmp_path) -> None:
    env = airflow_env({"DASHCLIP_HOME": str(tmp_path)})
    assert env["AIRFLOW_HOME"] == f"{tmp_path}/airflow"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{tmp_path}/airflow/airflow.db"
    assert env["AIRFLOW_CONFIG"] == str(ROOT / "airflow.cfg") and env["AIRFLOW__CORE__DAGS_FOLDER"] == str(ROOT / "dags")
    pg = "postgresql://u@db/airflow"
    assert airflow_env({"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg})["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == pg


def test_summary_reads_the_published_steps(tmp_path) -> None:
    """Summary lines from step folders published through RunPaths (no Airflow: the task states are given)."""
    config = tmp_path / "c.yaml"
    config.write_text(f"name: t\nstorage:\n  root: {tmp_path / 'runs'}\n")
    run_id = "manual__2026-01-01T00:00:00+00:00"
    paths = RunPaths(str(tmp_path / "runs"), DAG_ID, run_id)
    systems = {"dashclip": {"ndcg@10": 0.5, "n_queries": 3}, "bm25_titles": {"ndcg@10": 0.25, "n_queries": 3}}
    hits = [{"product_id": "p1", "title": None, "category": "dairy"}]
    outputs = {
        Step.EVALUATE: {"n_eval_queries": 3, "systems": systems},
        Step.BUILD_INDEX: {"factory": "Flat", "ntotal": 10, "dim": 8, "recall@10_vs_exact": 1.0, "min_recall_at_10": 0.95,
                           "passed": True},
        Step.BACKFILL_EMBEDDINGS: {"n_products": 10, "dim": 8, "n_embedded": 2, "n_reused": 8},
        Step.REGISTER_MODEL: {"model_name": "m", "version": 2, "aliases": {"challenger": 2, "champion": 1},
                              "decision": {"reason": "champion kept"}},
    }
    for step, summary in outputs.items():
        with paths.step_output(step) as out:
            (out / SUMMARY).write_text(json.dumps(summary))
            if step is Step.EVALUATE:
                from dashclip_core.layout import Evaluation

                Evaluation(out).report.write_text(json.dumps({"sample_queries": {"oat milk": hits}}))
    tasks = [TaskState("extract_catalog", "success", None, None, 8.25, 1), TaskState("register_model", "upstream_failed", None, None, None, 0)]

    lines = summary_lines(run_id, str(config), wall=123.4, tasks=tasks)

    assert "wall time: 123 s" in lines
    assert lines[lines.index("wall time: 123 s") + 3].split() == ["extract_catalog", "success", "8.2"]
    assert any(ln.split()[:2] == ["register_model", "upstream_failed"] for ln in lines)
    header = next(ln for ln in lines if ln.startswith("metric"))
    assert header.split() == ["metric", "dashclip", "bm25_titles"]
    assert "index: Flat with 10 products (dim 8), recall@10 vs exact 1.000 (gate >= 0.95: passed)" in lines
    assert "backfill: 2 products embedded, 8 reused (unchanged content and model)" in lines
    assert "  -> m@challenger" in lines and "      p1  (image-only product)  [dairy]" in lines
    assert lines[-1] == f"run folder: {paths.run_uri}"


def test_summary_without_an_airflow_db_says_what_to_do(tmp_path) -> None:
    import os

    env = {**os.environ, "DASHCLIP_HOME": str(tmp_path), "AIRFLOW_HOME": str(tmp_path / "airflow"),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'empty.db'}"}
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "summary"], capture_output=True, text=True, cwd=ROOT, env=env,
                         check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot read the Airflow metadata DB" in out.stderr and "airflow db migrate" in out.stderr


def _constant_query_model(vector: list[float]):
    """A pyfunc whose every query embeds to ``vector`` (the product it finds tells which version answered).
    Defined inside a function so that cloudpickle ships the class by value."""
    import mlflow

    class ConstantQueryEmbedding(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            import pandas as pd

            return pd.DataFrame({"query_id": model_input["query_id"], "embedding": [vector] * len(model_input)})

    return ConstantQueryEmbedding()


def test_search_resolves_the_alias_once_so_model_and_index_come_from_one_version(tmp_path, monkeypatch, capsys) -> None:
    """A promotion that moves `champion` between the CLI's registry reads must not mix two versions."""
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from dashclip_core.cli import main as library_main
    from dashclip_core.config import IndexConfig
    from dashclip_core.index.faiss_index import build_index

    uri, name = f"sqlite:///{tmp_path / 'mlflow.db'}", "alias-once"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    build_index(np.eye(2, dtype=np.float32), ["p-v1", "p-v2"], IndexConfig(recall_queries=0)).save(tmp_path / "index")
    (tmp_path / "snapshot").mkdir()
    pd.DataFrame({"product_id": ["p-v1", "p-v2"], "title": ["found by v1", "found by v2"], "category": ["a", "b"]}).to_parquet(
        tmp_path / "snapshot" / "products.parquet")
    client = MlflowClient(uri)
    exp = client.create_experiment("alias", artifact_location=(tmp_path / "artifacts").as_uri())
    for vector in ([1.0, 0.0], [0.0, 1.0]):  # v1 finds p-v1, v2 finds p-v2
        with mlflow.start_run(experiment_id=exp):
            info = mlflow.pyfunc.log_model(name="m", python_model=_constant_query_model(vector), registered_model_name=name)
        client.set_model_version_tag(name, info.registered_model_version, "index_uri", str(tmp_path / "index"))
        client.set_model_version_tag(name, info.registered_model_version, "catalog_snapshot", str(tmp_path / "snapshot"))
    client.set_registered_model_alias(name, "champion", "1")

    real_lookup = MlflowClient.get_model_version_by_alias

    def lookup_then_promote(self, model_name, alias):  # a concurrent promotion lands right after the CLI's first read
        found = real_lookup(self, model_name, alias)
        MlflowClient(uri).set_registered_model_alias(name, "champion", "2")
        return found

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", lookup_then_promote)
    assert library_main(["search", "oat milk", "-k", "1", "--model-name", name]) == 0

    out = capsys.readouterr().out
    assert f"{name}@champion (v1)" in out
    assert "p-v1  found by v1" in out, out


def test_evaluate_resolves_the_alias_once_so_encoders_and_run_come_from_one_version(tmp_path, monkeypatch) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from dashclip_core.cli import resolve_model

    uri, name = f"sqlite:///{tmp_path / 'mlflow.db'}", "alias-once-eval"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("alias-eval", artifact_location=(tmp_path / "artifacts").as_uri())
    for v in ("1", "2"):
        for enc in ("product_encoder", "query_encoder"):
            (tmp_path / f"v{v}" / enc).mkdir(parents=True)
            (tmp_path / f"v{v}" / enc / "version.txt").write_text(v)
        with mlflow.start_run(experiment_id=exp):
            mlflow.pyfunc.log_model(name="m", python_model=_constant_query_model([1.0, 0.0]), registered_model_name=name,
                                    artifacts={enc: str(tmp_path / f"v{v}" / enc) for enc in ("product_encoder", "query_encoder")})
        client.set_model_version_tag(name, v, "catalog_snapshot", f"/runs/run-{v}/extract_catalog")
    client.set_registered_model_alias(name, "champion", "1")
    real_download = mlflow.artifacts.download_artifacts

    def download_then_promote(*args, **kwargs):  # a concurrent promotion lands while the encoders download
        local = real_download(*args, **kwargs)
        MlflowClient(uri).set_registered_model_alias(name, "champion", "2")
        return local

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download_then_promote)
    src = resolve_model(f"models:/{name}@champion")

    assert (src.product_dir / "version.txt").read_text() == "1" and (src.query_dir / "version.txt").read_text() == "1"
    assert src.run_dir == "/runs/run-1"
