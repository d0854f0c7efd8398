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
