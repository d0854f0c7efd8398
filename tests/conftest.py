"""Session-wide environment: every store (catalog, runs, MLflow, Airflow, Ray) in a temp folder, offline.

Set before Airflow, Ray or MLflow are imported by any test module.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from drills.env import isolate

ROOT = Path(__file__).resolve().parent.parent
_HOME = Path(tempfile.mkdtemp(prefix="dashclip-test-"))

# Every store in the session's temp home, with the same variables as the drills (tasks/common.py allows run
# configs only under configs/ and DASHCLIP_CONFIG_DIRS, which this sets to the home).
isolate(_HOME)


def _register_openai_test_server() -> None:
    """Make tests/labeling/openai_server.py importable as ``dashclip_tests_openai_server``.

    Test modules are imported in importlib mode (no packages), so they cannot import a sibling helper by a
    relative name; this conftest is imported before any of them.
    """
    import importlib.util

    name = "dashclip_tests_openai_server"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "labeling" / "openai_server.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_register_openai_test_server()


@pytest.fixture(scope="session", autouse=True)
def _config_dirs_allow_tmp_path(tmp_path_factory):
    """Tests write run configs into their ``tmp_path``: allow pytest's temp root beside the session home."""
    os.environ["DASHCLIP_CONFIG_DIRS"] = os.pathsep.join([str(_HOME), str(tmp_path_factory.getbasetemp())])


@pytest.fixture(scope="session")
def dashclip_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata DB (SQLite) for DagBag / dag.test()."""
    db = _HOME / "airflow" / "airflow.db"
    if not db.exists():
        airflow = Path(sys.executable).with_name("airflow")
        out = subprocess.run([str(airflow), "db", "migrate"], capture_output=True, text=True, env=os.environ.copy(), check=False)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return db


@pytest.fixture(scope="session")
def tiny_config() -> Path:
    return ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (a real S3 protocol peer for boto3), with dummy credentials."""
    from moto.server import ThreadedMotoServer

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
