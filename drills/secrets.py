"""Drill: secrets in a run's config, and a config_path that points outside the allowed folders.

Cases (all in one child process with a hard timeout, as Airflow would call the task functions of
``tasks/steps.py``, with ``params={"config_path": ...}`` and a run id):

``db_down_with_password``
    The config's ``catalog.db_url`` is ``postgresql+psycopg://dashclip:${DRILL_PGPASS}@127.0.0.1:<closed port>/catalog``
    with a password that needs percent-encoding. The catalog DB is down (nothing listens on the port), so
    ``extract_catalog`` fails; the pipeline's MLflow run is opened for the same config. The error text, its
    whole traceback, every log record the task emitted, the MLflow params and the run folder must hold
    neither the raw nor the encoded password; the error must still name the DB (host, port, database); the
    failed step must publish nothing.
``config_outside_allowed``
    A config outside ``configs/`` and ``$DASHCLIP_CONFIG_DIRS`` whose ``storage.root`` points elsewhere, named
    directly, through ``..`` and through a symlink placed inside an allowed folder: every run must be refused
    before it reads the config, and nothing may be written under that root.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from urllib.parse import quote, quote_plus

from drills import Row

ROOT = Path(__file__).resolve().parent.parent
CHILD_TIMEOUT_S = 300
PASSWORD = "dr1ll@p/ss:w%rd"
FORMS = sorted({PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD), quote_plus(PASSWORD)})


def run(work: Path) -> list[Row]:
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    dirs = [d for d in os.environ.get("DASHCLIP_CONFIG_DIRS", "").split(os.pathsep) if d.strip()]
    env = {**os.environ, "DASHCLIP_CONFIG_DIRS": os.pathsep.join([*dirs, str(work)]), "DRILL_PGPASS": quote(PASSWORD, safe="")}
    try:
        proc = subprocess.run([sys.executable, "-m", "drills.secrets", str(work)], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"secrets drill: the child ran past {CHILD_TIMEOUT_S} s") from err
    lines = [line for line in proc.stdout.splitlines() if line.startswith("DRILL_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"secrets drill: child exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    leaked_output = [f for f in FORMS if f in proc.stdout or f in proc.stderr]
    results = json.loads(lines[-1][len("DRILL_RESULT "):])
    rows, problems = [], []
    for case in results:
        lost = case["data_lost"] + (len(leaked_output) if case["name"] == "db_down_with_password" else 0)
        rows.append(Row(case["fault"], case["what_happened"], lost))
        problems += case["problems"]
    if leaked_output:
        problems.append(f"the task process printed the password ({leaked_output})")
    for row in rows:
        print(f"  {row.fault} | {row.what_happened} | lost {row.data_lost}", flush=True)
    if problems:
        raise AssertionError("secrets drill: " + "; ".join(problems))
    return rows


# ---- child ------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # released on close: nothing listens there


def _leaks(text: str) -> list[str]:
    return [f for f in FORMS if f in text]


def _files_with_secret(root: Path) -> list[str]:
    if not root.exists():
        return []
    return [str(p) for p in root.rglob("*") if p.is_file() and any(f.encode() in p.read_bytes() for f in FORMS)]


def _db_down_with_password(work: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from dashclip_core.config import PipelineConfig
    from tasks import steps
    from tasks.common import mlflow_run, resolve_config, run_paths

    port = _closed_port()
    cfg_path = work / "db_down.yaml"
    cfg_path.write_text((ROOT / "configs" / "tiny.yaml").read_text().replace(
        "source: demo", f"source: sql\n  db_url: postgresql+psycopg://dashclip:${{DRILL_PGPASS}}@127.0.0.1:{port}/catalog"
                        "?connect_timeout=5"))
    params, run_id = {"config_path": str(cfg_path)}, "drill__secrets"
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    capture = Capture()
    logging.getLogger().addHandler(capture)
    logging.getLogger().setLevel(logging.INFO)
    problems = []
    try:
        try:
            steps.extract_catalog(params=params, run_id=run_id)
            problems.append("extract_catalog succeeded against a DB that is down")
            error, kind = "", "-"
        except Exception as err:  # the fault under test, whatever its type: what matters is what the text shows
            logging.getLogger("drills.secrets").exception("extract_catalog failed")  # as Airflow logs a task error
            error, kind = "".join(traceback.format_exception(err)), type(err).__name__
        cfg = resolve_config(params)
        mlflow = mlflow_run(cfg, run_id)
        mlflow_params = MlflowClient(mlflow["tracking_uri"]).get_run(mlflow["run_id"]).data.params
    finally:
        logging.getLogger().removeHandler(capture)
    if f"127.0.0.1:{port}/catalog" not in error:
        problems.append(f"the error does not name the DB: {error[-500:]!r}")
    paths = run_paths(PipelineConfig.from_file(cfg_path), run_id)
    published = sorted(p.name for p in Path(paths.run_uri).glob("*")) if Path(paths.run_uri).exists() else []
    leaks = {"error": _leaks(error), "log records": _leaks("\n".join(records)), "mlflow params": _leaks(json.dumps(mlflow_params)),
             "run folder": _files_with_secret(Path(paths.run_uri)),
             "mlflow store": _files_with_secret(Path(cfg.tracking_uri()[len("sqlite:///"):]).parent)}
    leaks = {k: v for k, v in leaks.items() if v}
    if leaks:
        problems.append(f"password found in {leaks}")
    if published:
        problems.append(f"a failed extract_catalog left {published} in the run folder")
    shown = mlflow_params.get("catalog.db_url", "")
    return {"name": "db_down_with_password", "problems": problems, "data_lost": len(leaks) + len(published),
            "fault": "catalog DB down; its password (needs %-encoding) in catalog.db_url via ${DRILL_PGPASS}",
            "what_happened": (f"extract_catalog failed ({kind}) naming 127.0.0.1:{port}/catalog, password masked in the error, "
                              f"traceback, {len(records)} log records, MLflow params ({shown.split('@')[0]}@...), store "
                              f"and run folder; nothing published")}


def _config_outside_allowed(work: Path) -> dict:
    from airflow.sdk.exceptions import AirflowFailException

    from tasks import steps

    outside = Path(tempfile.mkdtemp(prefix="dashclip-drill-outside-"))
    stolen_root = outside / "stolen-runs"
    evil = outside / "evil.yaml"
    evil.write_text((ROOT / "configs" / "tiny.yaml").read_text() + f"storage:\n  root: {stolen_root}\n")
    link = work / "innocent.yaml"
    link.unlink(missing_ok=True)
    link.symlink_to(evil)
    tries = {"direct": str(evil), "dot-dot": f"{work}/{os.path.relpath(evil, work)}", "symlink": str(link)}
    problems, refused = [], []
    for how, path in tries.items():
        try:
            steps.extract_catalog(params={"config_path": path}, run_id=f"drill__outside_{how}")
            problems.append(f"config_path via {how} was accepted")
        except AirflowFailException as err:
            if "allowed config folder" not in str(err):
                problems.append(f"{how}: unexpected refusal {err}")
            refused.append(how)
    written = [str(p) for p in stolen_root.rglob("*")] if stolen_root.exists() else []
    if written:
        problems.append(f"files written under the config's storage root: {written[:5]}")
    return {"name": "config_outside_allowed", "problems": problems, "data_lost": len(written),
            "fault": "config_path outside configs/ + DASHCLIP_CONFIG_DIRS (storage.root elsewhere)",
            "what_happened": f"refused before reading ({', '.join(refused)}): AirflowFailException naming the allowed "
                             f"folders; {len(written)} files under its storage root"}


def _child(work: Path) -> int:
    results = [_db_down_with_password(work), _config_outside_allowed(work)]
    print("DRILL_RESULT " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(Path(sys.argv[1])))
