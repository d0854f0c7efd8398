"""A DAG run whose config holds a secret leaks it nowhere (issue 11 row 2).

A real PostgreSQL 15 catalog with password (scram-sha-256) auth; the password needs percent-encoding
(``p@ss/w:rd%1``), so it exists in two forms. The config names it as ``${PGPASS}`` inside
``catalog.db_url``. Two ``dag.test()`` runs, each in its own process (its output is captured like a
worker's log): one that succeeds end to end, one whose catalog DB does not exist, so extract_catalog fails
with the URL in its error. Then every byte of the run folders, the MLflow store (SQLite file and
artifacts), the Airflow task logs and metadata DB (XComs, rendered fields, run conf) and the captured
output is searched for the raw and the encoded password.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "p@ss/w:rd%1"
FORMS = sorted({PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD), quote_plus(PASSWORD)})
DAG_RUN_TIMEOUT_S = 1200


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: run them as the ``postgres`` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 with user ``dashclip`` / :data:`PASSWORD` and an empty ``catalog`` DB."""
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin); .ci/run installs them")
    pytest.importorskip("psycopg")
    import psycopg

    work = Path(tempfile.mkdtemp(prefix="dashclip-pg-"))  # not under pytest's root-only temp folder
    data, pwfile = work / "data", work / "pwfile"
    pwfile.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(work, "postgres")
        shutil.chown(pwfile, "postgres")
    port = _free_port()
    out = subprocess.run(_as_postgres([str(pg_bin / "initdb"), "-D", str(data), "-A", "scram-sha-256", "-U", "dashclip",
                                       f"--pwfile={pwfile}"]), capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    pg_ctl = [str(pg_bin / "pg_ctl"), "-D", str(data), "-w", "-t", "60"]
    out = subprocess.run(_as_postgres([*pg_ctl, "-l", str(work / "server.log"), "-o",
                                       f"-p {port} -k {work} -c listen_addresses=127.0.0.1", "start"]),
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="dashclip", password=PASSWORD, dbname="postgres",
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute("CREATE DATABASE catalog")
        yield port
    finally:
        subprocess.run(_as_postgres([*pg_ctl, "-m", "fast", "stop"]), capture_output=True, timeout=120, check=False)
        shutil.rmtree(work, ignore_errors=True)


def _load_demo_catalog(port: int, folder: Path) -> None:
    """The tiny demo catalog, generated into SQLite, copied table by table into Postgres (images stay on disk)."""
    import pandas as pd
    import sqlalchemy as sa

    from dashclip_core.catalog.demo import generate_demo_catalog

    db = generate_demo_catalog(folder, num_products=96, seed=0)
    src = sa.create_engine(f"sqlite:///{db}")
    dst = sa.create_engine(f"postgresql+psycopg://dashclip:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/catalog")
    try:
        for table in ("products", "search_log", "human_labels"):
            df = pd.read_sql_table(table, src)
            if table == "products":  # relative to the SQLite file's folder there; absolute here
                df["image_uri"] = df["image_uri"].map(lambda u: str((db.parent / u).resolve()) if isinstance(u, str) and u else u)
            df.to_sql(table, dst, index=False, if_exists="replace")
    finally:
        src.dispose()
        dst.dispose()


def _write_config(folder: Path, port: int, database: str, name: str) -> Path:
    """tiny.yaml reading the catalog from Postgres; the password only as ${PGPASS} (in a DASHCLIP_CONFIG_DIRS folder)."""
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["name"] = name
    raw["catalog"] = {**raw["catalog"], "source": "sql",
                      "db_url": f"postgresql+psycopg://dashclip:${{PGPASS}}@127.0.0.1:{port}/{database}",
                      "image_roots": [str(folder / "catalog")]}  # a SQL catalog has no folder of its own
    raw["registry"] = {**raw["registry"], "model_name": f"dashclip-{name}"}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


_RUN_DAG = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert bag.import_errors == {}, bag.import_errors
dag = bag.dags["dashclip_nightly"]
for task in dag.tasks:
    task.retries = 0  # a failing step fails now, not after the 2-minute retry delay
dr = dag.test(run_conf={"config_path": sys.argv[2]})
states = {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}
print("DAG_RESULT " + json.dumps({"run_id": dr.run_id, "state": str(dr.state), "states": states}))
"""


def _run_dag(config: Path, log: Path) -> dict:
    """``dag.test`` in a child process, as a worker would run it; its whole output goes to ``log``."""
    env = {**os.environ, "PGPASS": quote(PASSWORD, safe="")}  # what a URL needs: the encoded form
    with open(log, "wb") as out:
        proc = subprocess.run([sys.executable, "-c", _RUN_DAG, str(ROOT / "dags"), str(config)], env=env, cwd=ROOT,
                              stdout=out, stderr=subprocess.STDOUT, timeout=DAG_RUN_TIMEOUT_S, check=False)
    text = log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("DAG_RESULT ")]
    assert proc.returncode == 0 and lines, text[-4000:]
    return json.loads(lines[-1][len("DAG_RESULT "):])


def _leaks_in(paths: list[Path]) -> dict[str, list[str]]:
    """file -> password forms found in its bytes (also UTF-16 would be overkill: every store here writes UTF-8)."""
    found: dict[str, list[str]] = {}
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            data = f.read_bytes()
            hits = [form for form in FORMS if form.encode() in data]
            if hits:
                found[str(f)] = hits
    return found


@pytest.fixture(scope="module")
def secret_runs(postgres, airflow_db, tmp_path_factory):
    work = tmp_path_factory.mktemp("secrets")  # under pytest's temp root: in DASHCLIP_CONFIG_DIRS (tests/conftest.py)
    _load_demo_catalog(postgres, work / "catalog")
    good = _run_dag(_write_config(work, postgres, "catalog", "secrets"), work / "good.log")
    bad = _run_dag(_write_config(work, postgres, "no_such_db", "secrets_bad"), work / "bad.log")
    return work, good, bad


def test_the_runs_did_what_the_scan_relies_on(secret_runs):
    work, good, bad = secret_runs
    assert good["state"] == "success", good
    assert bad["states"]["extract_catalog"] == "failed", bad
    # the exception path ran and named the DB (with the password masked)
    assert "/no_such_db is unreachable" in (work / "bad.log").read_text(errors="replace")


def test_mlflow_params_show_the_url_without_its_password(secret_runs):
    from mlflow.tracking import MlflowClient

    from dashclip_core.config import PipelineConfig

    _, good, _ = secret_runs
    client = MlflowClient(PipelineConfig().tracking_uri())
    runs = client.search_runs([client.get_experiment_by_name("dashclip").experiment_id],
                              filter_string=f"tags.airflow_run_id = '{good['run_id']}'")
    assert runs and runs[0].data.params["catalog.db_url"].startswith("postgresql+psycopg://dashclip:***@127.0.0.1:")


def test_secret_is_nowhere(secret_runs, dashclip_home):
    work, good, bad = secret_runs
    from dashclip_core.storage import safe_run_id

    airflow_home = Path(os.environ["AIRFLOW_HOME"])
    run_folders = [dashclip_home / "runs" / "dashclip_nightly" / safe_run_id(r["run_id"]) for r in (good, bad)]
    assert run_folders[0].is_dir()
    xcoms = sqlite3.connect(airflow_home / "airflow.db").execute(
        "SELECT COUNT(*) FROM xcom WHERE run_id = ?", (good["run_id"],)).fetchone()[0]
    assert xcoms >= 11  # every step returned its summary: the Airflow DB scan covers them
    places = [*run_folders, dashclip_home / "mlflow", airflow_home, work / "good.log", work / "bad.log"]
    assert _leaks_in(places) == {}
