"""Concurrent first use of a fresh SQLite MLflow DB (found by drills/concurrent_runs.py): every process gets a working store."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import sys, time
from pathlib import Path
tmp, barrier = Path(sys.argv[1]), Path(sys.argv[2])
from dashclip_core.config import PipelineConfig
from dashclip_core.registry import mlflow_registry as reg
import mlflow.store.tracking.sqlalchemy_store  # imports done before the start line
cfg = PipelineConfig().with_overrides(**{"registry.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                                         "registry.artifact_root": (tmp / "artifacts").as_uri()})
while not barrier.exists():
    time.sleep(0.005)
print(reg.pipeline_run(cfg, sys.argv[3], "dashclip_nightly"))
"""


def test_tasks_starting_together_on_a_fresh_mlflow_db_all_succeed(tmp_path):
    barrier = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(barrier), f"run-{i}"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    time.sleep(4.0)  # all three at the start line
    barrier.touch()
    results = [p.communicate(timeout=180) for p in procs]

    failed = [err[-1500:] for p, (_, err) in zip(procs, results) if p.returncode != 0]
    assert not failed, failed
    assert len({out.strip() for out, _ in results}) == 3  # three MLflow runs, one per pipeline run
