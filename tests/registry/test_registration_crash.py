"""Registration survives a real crash at any point with exactly one model version per run (issue 11 row 4).

A child process registers a run's model (``register_child.py``) and is SIGKILLed the moment a given row
appears in the MLflow SQLite DB: the logged model while its artifacts upload (PENDING), the logged model
once READY, or the model version. The retry in this process must leave exactly one version, tagged with
the run id, and must not upload a second READY model when the first one was complete.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dashclip_core.config import PipelineConfig
from dashclip_core.registry import mlflow_registry as reg

CHILD = Path(__file__).with_name("register_child.py")
RUN_ID = "manual__2026-01-01T00:00:00+00:00"
KILL_WHEN = {  # moment -> query that turns non-zero at that moment
    "logged_model_pending": "SELECT count(*) FROM logged_models WHERE status = 1",
    "logged_model_ready": "SELECT count(*) FROM logged_models WHERE status = 2",
    "model_version_created": "SELECT count(*) FROM model_versions",
}


def _cfg(tmp: Path) -> PipelineConfig:
    return PipelineConfig().with_overrides(**{
        "registry.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "registry.artifact_root": (tmp / "artifacts").as_uri(),
        "registry.model_name": "crash-test",
    })


def _encoders(tmp: Path) -> None:
    for name in ("product_encoder", "query_encoder"):
        (tmp / name).mkdir()
        (tmp / name / "weights.pt").write_bytes(os.urandom(8 << 20))  # big enough that the upload takes a moment


def _count(db: Path, sql: str) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05) as con:
            return con.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:  # no DB / table yet, or the writer holds the lock
        return 0


def _kill_at(tmp: Path, sql: str, timeout_s: float = 180.0) -> str:
    """Run the child, SIGKILL it as soon as ``sql`` counts a row; return what it printed."""
    child = subprocess.Popen([sys.executable, str(CHILD), str(tmp), RUN_ID], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout_s
    try:
        while _count(tmp / "mlflow.db", sql) == 0:
            if child.poll() is not None:
                pytest.fail(f"child ended (rc {child.returncode}) before the kill point: {child.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"kill point not reached in {timeout_s} s")
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        out = child.communicate(timeout=30)[0]
    return out


@pytest.mark.parametrize("moment", list(KILL_WHEN))
def test_retry_after_a_kill_registers_exactly_one_version(tmp_path, moment):
    _encoders(tmp_path)
    _kill_at(tmp_path, KILL_WHEN[moment])
    cfg = _cfg(tmp_path)
    mlflow_run_id = reg.pipeline_run(cfg, RUN_ID, "dashclip_nightly")

    version, _ = reg.register_model(cfg, mlflow_run_id, RUN_ID, tmp_path / "product_encoder", tmp_path / "query_encoder",
                                    {"dag_id": "dashclip_nightly"})
    again, created = reg.register_model(cfg, mlflow_run_id, RUN_ID, tmp_path / "product_encoder", tmp_path / "query_encoder",
                                        {"dag_id": "dashclip_nightly"})

    versions = reg.client(cfg).search_model_versions("name = 'crash-test'")
    assert [str(v.version) for v in versions] == [version] and (again, created) == (version, False)
    assert versions[0].tags[reg.RUN_TAG] == RUN_ID and versions[0].tags["mlflow_run_id"] == mlflow_run_id
    assert versions[0].tags["dag_id"] == "dashclip_nightly"
    assert _count(tmp_path / "mlflow.db", KILL_WHEN["logged_model_ready"]) == 1, "a complete model was uploaded twice"


def test_a_logged_but_unregistered_model_is_registered_without_a_second_upload(tmp_path):
    """The state a crash between the upload and the version leaves, made by the library's own first step."""
    _encoders(tmp_path)
    cfg = _cfg(tmp_path)
    mlflow_run_id = reg.pipeline_run(cfg, RUN_ID, "dashclip_nightly")
    import mlflow

    reg.client(cfg)
    with mlflow.start_run(run_id=mlflow_run_id):  # what the first try uploaded before it died
        mlflow.pyfunc.log_model(name="dashclip_encoders",
                                python_model=str(Path(reg.__file__).with_name("pyfunc_model.py")),
                                artifacts={"product_encoder": str(tmp_path / "product_encoder"),
                                           "query_encoder": str(tmp_path / "query_encoder")})

    version, created = reg.register_model(cfg, mlflow_run_id, RUN_ID, tmp_path / "product_encoder", tmp_path / "query_encoder", {})

    assert created and [str(v.version) for v in reg.client(cfg).search_model_versions("name = 'crash-test'")] == [version]
    assert _count(tmp_path / "mlflow.db", KILL_WHEN["logged_model_ready"]) == 1, "the retry uploaded the model again"
