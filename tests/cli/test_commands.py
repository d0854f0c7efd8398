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
        Step.BUILD_INDEX: {"factory": "Flat", "ntotal": 10, "dim": 8, "recall@10_vs_exact": 1.0},
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
    assert "index: Flat with 10 products (dim 8), recall@10 vs exact 1.000" in "\n".join(lines)
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
