"""`make airflow` serves the UI on 127.0.0.1 only, with a login (issue 11 row 3).

The API server (the component of ``airflow standalone`` that serves the UI and REST API) is started with
airflow.cfg and the variables of the Makefile's ``airflow`` recipe, on a free port; it must listen on the
loopback address alone, refuse an unauthenticated ``/api/v2`` call, and accept the generated admin password
(printed once, kept in a file only its owner reads). ``standalone`` itself would also start a scheduler, a
DAG processor and a triggerer, which play no part in binding or auth.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180


def makefile_airflow_env() -> dict[str, str]:
    """The ``AIRFLOW__*=value`` assignments of the Makefile's ``airflow`` recipe (shell substitutions skipped)."""
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^airflow:.*\n((?:\t.*\n)+)", text, re.MULTILINE)
    assert recipe, "Makefile has no airflow target"
    joined = recipe.group(1).replace("\\\n", " ")
    return {k: v for k, v in re.findall(r"\b(AIRFLOW__\w+)=(\S+)", joined) if "$" not in v}


def test_makefile_recipe_is_local_and_logged_in():
    env = makefile_airflow_env()
    assert env.get("AIRFLOW__API__HOST") == "127.0.0.1"
    assert env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False").lower() == "false"
    cfg = (ROOT / "airflow.cfg").read_text()
    assert re.search(r"^host = 127\.0\.0\.1$", cfg, re.MULTILINE) and "simple_auth_manager_all_admins = False" in cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outside_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def _request(url: str, data: dict | None = None, token: str | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    req = urllib.request.Request(url, data=json.dumps(data).encode() if data is not None else None, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_api_server_binds_loopback_and_requires_login(airflow_db, tmp_path):
    import psutil

    port = _free_port()
    env = {**os.environ, **makefile_airflow_env(), "AIRFLOW__API__PORT": str(port),
           "AIRFLOW__API_AUTH__JWT_SECRET": "test-jwt-secret-0123456789abcdef", "AIRFLOW__API__WORKERS": "1"}
    home = Path(env["AIRFLOW_HOME"])
    password_file = home / "simple_auth_manager_passwords.json.generated"
    password_file.unlink(missing_ok=True)
    airflow = Path(sys.executable).with_name("airflow")
    log = tmp_path / "api-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(airflow), "api-server", "--port", str(port), "--workers", "1"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=lambda: os.umask(0o077))  # noqa: PLW1509 (the Makefile's umask)
    try:
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if _request(f"http://127.0.0.1:{port}/api/v2/monitor/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"api-server not healthy in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")

        listening = {c.laddr.ip for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening == {"127.0.0.1"}, listening
        if (outside := _outside_address()) is not None:
            with pytest.raises(OSError), socket.create_connection((outside, port), timeout=5):
                pass

        status, _ = _request(f"http://127.0.0.1:{port}/api/v2/dags")
        assert status in (401, 403), status
        status, _ = _request(f"http://127.0.0.1:{port}/auth/token", {"username": "admin", "password": "wrong-password"})
        assert status in (401, 403), status  # all-admins mode would accept any credentials

        password = json.loads(password_file.read_text())["admin"]
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert log.read_text().count(password) == 1  # printed once, at generation
        status, body = _request(f"http://127.0.0.1:{port}/auth/token", {"username": "admin", "password": password})
        assert status in (200, 201), body
        status, _ = _request(f"http://127.0.0.1:{port}/api/v2/dags", token=json.loads(body)["access_token"])
        assert status == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
