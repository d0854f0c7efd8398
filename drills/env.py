"""An isolated environment for a drill: every store (catalog, runs, MLflow, Airflow, Ray) in a fresh temp folder.

Set before Airflow, Ray or MLflow are imported (``python -m drills`` calls :func:`isolate` first), the
same variables for the test session (``tests/conftest.py`` calls it too).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def isolate(home: Path | None = None) -> Path:
    """Point every store at ``home`` (a new temp folder by default) and return it."""
    home = Path(home or tempfile.mkdtemp(prefix="dashclip-drills-"))
    os.environ.update({
        "DASHCLIP_HOME": str(home),
        "DASHCLIP_CONFIG_DIRS": str(home),  # drills write their own configs under the home folder
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW_CONFIG": str(ROOT / "airflow.cfg"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow' / 'airflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "TOKENIZERS_PARALLELISM": "false",
    })
    (home / "airflow").mkdir(parents=True, exist_ok=True)
    (home / "mlflow").mkdir(parents=True, exist_ok=True)
    return home
