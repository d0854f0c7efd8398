"""Drill: two DAG runs with different configs at once under the real Airflow scheduler, racing for ``champion``.

Starts ``airflow api-server``, ``scheduler`` and ``dag-processor`` (LocalExecutor on SQLite, parallelism 2,
``airflow.max_active_runs: 2`` through ``$DASHCLIP_DAG_CONFIG``) in their own process group against this
drill's own AIRFLOW_HOME / DASHCLIP_HOME / MLflow DB, triggers ``dashclip_nightly`` twice through the REST
API with two configs derived from ``configs/tiny.yaml`` (different ``name``, seeds, catalog size and
epochs, the same ``registry.model_name``), waits for both, and checks:

- both runs succeed; every file each run wrote is under its own run folder, its own catalog folder
  (``catalog/<config name>/``) or its own Ray checkpoint folder; the only other files are the shared stores,
  named in :data:`SHARED_STORES` (the MLflow DB and artifact store, the label cache; Airflow's home is outside);
- each run's snapshot holds its own config's catalog (no output written by the other run);
- each run registered exactly one model version (tag ``airflow_run_id``), two in all;
- ``champion`` was decided by compare-and-set: the second promoter's decision names the first's version
  as the champion it compared against, and ``champion`` is the winner of that comparison.

The scheduler's cron schedule is off (``[scheduler] use_job_schedule = False``), so unpausing the DAG
starts no third, scheduled run. The process group is killed at the end, always.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from drills import Row
from drills.env import ROOT

DAG = "dashclip_nightly"
MODEL_NAME = "dashclip-drill-race"
RUN_TIMEOUT_S = 20 * 60.0  # both runs, together (2 shared cores: a tiny run alone takes a few minutes)
START_TIMEOUT_S = 180.0  # API server up and the DAG parsed
RUNS = {  # config name -> overrides of configs/tiny.yaml; same registry.model_name, so they race for champion
    "race-a": {"catalog": {"seed": 1, "demo_num_products": 96}, "train": {"seed": 1, "stage1_epochs": 1, "stage2_epochs": 1}},
    "race-b": {"catalog": {"seed": 2, "demo_num_products": 80}, "train": {"seed": 2, "stage1_epochs": 2, "stage2_epochs": 1}},
}
SHARED_STORES = {  # top-level folders of DASHCLIP_HOME that both runs use by design, and why that is safe
    "mlflow": "MLflow SQLite DB and artifact store: rows and artifacts keyed by MLflow run / logged model id",
    "cache/labels": "label cache (SQLite WAL, INSERT OR IGNORE by content key) and label store (append-only parts, os.link)",
    "cache/embeddings": "embedding store per model digest (append-only parts keyed by content, each renamed into place)",
}


def run(work: Path) -> Row:
    import yaml

    work = Path(work).resolve()
    home, airflow_home, configs = work / "home", work / "airflow", work / "configs"
    for d in (home / "mlflow", airflow_home, configs):
        d.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config_paths = {}
    for name, overrides in RUNS.items():
        cfg = _merge(base, {**overrides, "name": name, "registry": {"model_name": MODEL_NAME}})
        config_paths[name] = configs / f"{name}.yaml"
        config_paths[name].write_text(yaml.safe_dump(cfg))
    dag_config = configs / "dag.yaml"  # parse-time settings of the DAG file: two runs at once
    dag_config.write_text(yaml.safe_dump(_merge(base, {"airflow": {"max_active_runs": 2}})))

    port = _free_port()
    env = _env(home, airflow_home, configs, dag_config, port)
    _check(subprocess.run([_airflow(), "db", "migrate"], env=env, capture_output=True, text=True, timeout=600, check=False),
           "airflow db migrate")
    log = (work / "airflow_components.log").open("w")
    # One process group for the three components: killing the group never orphans a scheduler or its workers.
    group = subprocess.Popen(["bash", "-c", (f"'{_airflow()}' api-server --port {port} & '{_airflow()}' scheduler & "
                                              f"'{_airflow()}' dag-processor & wait")], env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    t0 = time.monotonic()
    try:
        api = _Api(f"http://127.0.0.1:{port}", airflow_home)
        api.wait_for_dag(DAG, START_TIMEOUT_S, group)
        # Both triggered while paused (queued), then unpaused: they start together.
        run_ids = {name: api.trigger(DAG, {"config_path": str(path)}) for name, path in config_paths.items()}
        api.unpause(DAG)
        states = api.wait_for_runs(DAG, list(run_ids.values()), RUN_TIMEOUT_S, group)
        seconds = time.monotonic() - t0
        failed = {rid: s for rid, s in states.items() if s != "success"}
        if failed:
            raise AssertionError(f"DAG runs did not succeed: {failed} (task logs under {airflow_home / 'logs'}; "
                                 f"components' log {work / 'airflow_components.log'})")
    finally:
        _kill_group(group)
        log.close()
    files = _check_files(home, run_ids)
    versions, decisions, champion = _check_registry(home, run_ids)
    first, second = decisions
    return Row(
        fault="2 DAG runs (different configs, same model name) at once under the real scheduler, racing for champion",
        what_happened=(f"both succeeded in {seconds:.0f} s; {files} files, each under its own run/catalog/Ray folder "
                       f"(shared: {', '.join(SHARED_STORES)}); 1 version each ({versions}); {second['holder']} waited "
                       f"{second['waited_s']:.1f} s for the lock and compared v{second['version']} against v{first['version']} "
                       f"({second['reason']}); champion v{champion}"),
        data_lost=0,
    )


# ---- checks ------------------------------------------------------------------------------------


def _check_files(home: Path, run_ids: dict[str, str]) -> int:
    """Every file under DASHCLIP_HOME belongs to one run, or to a named shared store."""
    from dashclip_core.layout import Step
    from dashclip_core.storage import RunPaths

    owners: dict[str, list[Path]] = {}
    for name, run_id in run_ids.items():
        paths = RunPaths(str(home / "runs"), DAG, run_id)
        run_root = Path(paths.run_uri)
        ray_root = home / "cache" / "ray" / DAG / run_root.name
        owners[name] = [run_root, home / "catalog" / name, ray_root]
        products = Path(paths.local(Step.EXTRACT_CATALOG)) / "products.parquet"
        import pandas as pd

        n = len(pd.read_parquet(products))
        if n != RUNS[name]["catalog"]["demo_num_products"]:
            raise AssertionError(f"{products}: {n} products, but config {name} generates {RUNS[name]['catalog']['demo_num_products']}: "
                                 "the run read another run's catalog")
    shared = [home / s for s in SHARED_STORES]
    stray, both, count = [], [], 0
    for f in sorted(p for p in home.rglob("*") if p.is_file()):
        count += 1
        mine = [name for name, roots in owners.items() if any(f.is_relative_to(r) for r in roots)]
        if len(mine) > 1:
            both.append(f)
        elif not mine and not any(f.is_relative_to(s) for s in shared):
            stray.append(f)
    if both or stray:
        raise AssertionError(f"files in both runs' folders: {both[:10]}; files outside run folders and shared stores: {stray[:10]}")
    for name, roots in owners.items():
        if not any(p.is_file() for p in roots[0].rglob("*")):
            raise AssertionError(f"run {name} wrote nothing under {roots[0]}")
    return count


def _check_registry(home: Path, run_ids: dict[str, str]):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    per_run = {name: [v for v in versions if (v.tags or {}).get("airflow_run_id") == rid] for name, rid in run_ids.items()}
    if len(versions) != 2 or any(len(v) != 1 for v in per_run.values()):
        raise AssertionError(f"expected one version per run, got {[(v.version, (v.tags or {}).get('airflow_run_id')) for v in versions]}")
    decisions = []
    for name, (version,) in per_run.items():
        d = json.loads(version.tags["promotion_decision"])
        decisions.append({**d, "holder": name, "waited_s": d["lock"]["waited_s"]})
    decisions.sort(key=lambda d: d["expected_champion"] is not None)  # the first promoter found no champion
    first, second = decisions
    if first["expected_champion"] is not None or second["expected_champion"] != first["version"]:
        raise AssertionError(f"not compare-and-set: first compared against {first['expected_champion']}, second against "
                             f"{second['expected_champion']} (first's version v{first['version']})")
    winner = second["version"] if second["new_score"] > second["champion_score"] else first["version"]
    champion = str(client.get_registered_model(MODEL_NAME).aliases.get("champion"))
    if champion != str(winner) or str(second["champion_after"]) != str(winner):
        raise AssertionError(f"champion is v{champion}, but the comparison ({second['reason']}) makes v{winner} the champion")
    locks = [m.name for m in client.search_registered_models() if m.name.startswith(f"{MODEL_NAME}.promotion-lock")]
    if locks:
        raise AssertionError(f"promotion lock left behind: {locks}")
    return {name: str(v[0].version) for name, v in per_run.items()}, decisions, champion


# ---- Airflow -----------------------------------------------------------------------------------


class _Api:
    """The Airflow 3 REST API (v2) with a token of the generated admin password."""

    def __init__(self, base: str, airflow_home: Path) -> None:
        self.base, self.airflow_home, self.token = base, airflow_home, None

    def _call(self, method: str, path: str, body: dict | None = None, auth: bool = True) -> dict:
        req = urllib.request.Request(self.base + path, method=method, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self._token()}"} if auth else {})})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"{}")

    def _token(self) -> str:
        if self.token is None:
            passwords = json.loads((self.airflow_home / "simple_auth_manager_passwords.json.generated").read_text())
            self.token = self._call("POST", "/auth/token", {"username": "admin", "password": passwords["admin"]}, auth=False)["access_token"]
        return self.token

    def wait_for_dag(self, dag_id: str, timeout_s: float, group: subprocess.Popen) -> None:
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if group.poll() is not None:
                raise RuntimeError(f"the Airflow components exited (rc {group.returncode}) before {dag_id} was parsed")
            try:
                self._call("GET", f"/api/v2/dags/{dag_id}")
                return
            except (urllib.error.URLError, OSError, FileNotFoundError, KeyError) as err:  # not up / not parsed yet
                last = err
            time.sleep(2)
        raise TimeoutError(f"{dag_id} not served by the API server within {timeout_s:.0f} s (last: {last})")

    def trigger(self, dag_id: str, conf: dict) -> str:
        return self._call("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def unpause(self, dag_id: str) -> None:
        self._call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def wait_for_runs(self, dag_id: str, run_ids: list[str], timeout_s: float, group: subprocess.Popen) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            states = {rid: self._call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.request.quote(rid, safe='')}")["state"]
                      for rid in run_ids}
            if all(s in ("success", "failed") for s in states.values()):
                return states
            if group.poll() is not None:
                raise RuntimeError(f"the Airflow components exited (rc {group.returncode}) with runs {states}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"DAG runs not finished within {timeout_s:.0f} s: {states}")
            time.sleep(5)


def _env(home: Path, airflow_home: Path, configs: Path, dag_config: Path, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "DASHCLIP_HOME": str(home),
        "DASHCLIP_CONFIG_DIRS": str(configs),
        "DASHCLIP_DAG_CONFIG": str(dag_config),
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW_CONFIG": str(ROOT / "airflow.cfg"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",  # manual runs only: unpausing starts no scheduled run
        # One JWT secret for the components (else each generates its own and task tokens fail to verify), and a
        # worker log server port of our own (8793 may be taken by another Airflow on this machine).
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }


def _airflow() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def _kill_group(group: subprocess.Popen) -> None:
    """TERM the components' process group, then KILL what is left after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(group.pid, sig)
        except ProcessLookupError:
            return
        try:
            group.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + wait_s  # the bash parent exited; wait for the rest of the group
        while time.monotonic() < deadline:
            try:
                os.killpg(group.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def _check(done: subprocess.CompletedProcess, what: str) -> None:
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (rc {done.returncode}): {(done.stdout + done.stderr)[-3000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out
