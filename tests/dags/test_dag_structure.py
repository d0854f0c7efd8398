"""The DAG parses with the real Airflow, has the expected graph and params, and imports nothing heavy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Every step reads the outputs it needs through its upstreams' summaries, so the graph has an edge for each
# data dependency (not only the chain of gates).
EXPECTED_DOWNSTREAM = {
    "extract_catalog": {"validate_catalog", "label_pairs", "register_model"},
    "validate_catalog": {"label_pairs", "train_stage1", "train_stage2", "backfill_embeddings", "validate_embeddings",
                         "evaluate", "register_model"},
    "label_pairs": {"validate_labels", "train_stage2", "build_index", "evaluate", "register_model"},
    "validate_labels": {"train_stage1"},
    "train_stage1": {"train_stage2", "backfill_embeddings", "evaluate", "register_model"},
    "train_stage2": {"build_index", "evaluate", "register_model"},
    "backfill_embeddings": {"validate_embeddings", "build_index", "evaluate"},
    "validate_embeddings": {"build_index"},
    "build_index": {"evaluate", "register_model"},
    "evaluate": {"register_model"},
    "register_model": set(),
}


def test_dagbag_has_no_import_errors_and_expected_graph(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    dag = bag.get_dag("dashclip_nightly")
    assert dag is not None
    assert {t.task_id: set(t.downstream_task_ids) for t in dag.tasks} == EXPECTED_DOWNSTREAM
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.timetable.expression == "0 0 * * *"  # @daily
    assert set(dag.params.keys()) == {"config_path", "sample_size", "epochs", "num_workers", "use_gpu", "promote",
                                      "labeler", "llm_model", "max_cost_usd", "labeling_dry_run"}


def test_dag_file_imports_no_heavy_module():
    code = (
        "import sys, json, runpy; runpy.run_path(sys.argv[1]);"
        "print(json.dumps([m for m in ('torch', 'ray', 'mlflow', 'faiss', 'great_expectations', 'transformers', 'pandas') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags" / "dashclip_nightly.py")],
                         capture_output=True, text=True, cwd=ROOT, env=os.environ.copy(), check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _parse_dag_with(config_text: str | None, tmp_path: Path) -> dict:
    """Parse the DAG file in a fresh interpreter (the runner config is read at parse time) and return its settings."""
    env = os.environ.copy()
    if config_text is not None:
        path = tmp_path / "runner.yaml"
        path.write_text(config_text)
        env["DASHCLIP_DAG_CONFIG"] = str(path)
    code = (
        "import sys, json; from airflow.dag_processing.dagbag import DagBag;"
        "bag = DagBag(dag_folder=sys.argv[1]); assert not bag.import_errors, bag.import_errors;"
        "dag = bag.get_dag('dashclip_nightly');"
        "print(json.dumps({'max_active_runs': dag.max_active_runs,"
        " 'timeouts': {t.task_id: t.execution_timeout.total_seconds() / 60 for t in dag.tasks}}))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags" / "dashclip_nightly.py")],
                         capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_task_has_an_execution_timeout_from_config(tmp_path):
    default = _parse_dag_with(None, tmp_path)
    assert set(default["timeouts"]) == set(EXPECTED_DOWNSTREAM)
    assert default["timeouts"]["validate_catalog"] == 60 and default["timeouts"]["train_stage1"] == 360
    assert default["timeouts"]["label_pairs"] == 26 * 60 and default["max_active_runs"] == 1
    custom = _parse_dag_with("airflow:\n  task_timeout_minutes: 5\n  training_timeout_minutes: 30\n  max_active_runs: 2\n", tmp_path)
    long_steps = {"train_stage1", "train_stage2", "backfill_embeddings"}
    assert {t for t, m in custom["timeouts"].items() if m == 30} == long_steps
    assert all(m == 5 for t, m in custom["timeouts"].items() if t not in long_steps | {"label_pairs"})
    assert custom["max_active_runs"] == 2
