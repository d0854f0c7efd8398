"""Airflow's record of the DAG's runs, read through Airflow itself (its ORM), so a Postgres metadata DB
works as well as the local SQLite one.

Airflow is imported inside the functions, after :func:`apply_airflow_env`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from dashclip_core.config import PROJECT_ROOT, dashclip_home
from dashclip_core.layout import DAG_ID, Step

_ORDER = {step.value: i for i, step in enumerate(Step)}
_NOT_RUN = ("none", "scheduled", "queued", "upstream_failed", "skipped", "removed")  # Airflow may stamp a start on these


class AirflowDBError(RuntimeError):
    """The Airflow metadata DB cannot be read (not initialised, wrong URL)."""


@dataclass(frozen=True)
class TaskState:
    """One task instance of a DAG run, as Airflow records it."""

    task_id: str
    state: str  # TaskInstanceState value; "none" while it is not scheduled yet
    start: datetime | None
    end: datetime | None
    duration: float | None  # seconds, once it ended
    try_number: int


def airflow_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default ``os.environ``) completed with the Airflow settings ``make run`` exports.

    So ``.venv/bin/dashclip run|summary`` called without make finds the same metadata DB, config and DAGs.
    Variables already set win.
    """
    environ = dict(os.environ if environ is None else environ)
    home = environ.get("DASHCLIP_HOME", str(dashclip_home()))
    airflow_home = environ.get("AIRFLOW_HOME", f"{home}/airflow")
    defaults = {
        "DASHCLIP_HOME": home,
        "AIRFLOW_HOME": airflow_home,
        "AIRFLOW_CONFIG": str(PROJECT_ROOT / "airflow.cfg"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home}/airflow.db",
    }
    return {**defaults, **environ}


def apply_airflow_env() -> None:
    """Set the :func:`airflow_env` defaults in this process (before the first ``import airflow``)."""
    for key, value in airflow_env().items():
        os.environ.setdefault(key, value)


def latest_run_id() -> str | None:
    """Run id of the DAG's newest run (highest primary key), or None when it never ran."""
    return _newest_run(after_pk=None)[1]


def latest_run_pk() -> int:
    """Primary key of the DAG's newest run (0 when none): a later ``airflow dags test`` run has a higher one."""
    return _newest_run(after_pk=None)[0]


def dags_test_run_after(pk: int) -> str | None:
    """Run id of the newest ``airflow dags test`` run of the DAG created after the run with primary key ``pk``."""
    return _newest_run(after_pk=pk)[1]


def _newest_run(after_pk: int | None) -> tuple[int, str | None]:
    apply_airflow_env()
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunTriggeredByType
    from sqlalchemy import select
    from sqlalchemy.exc import DBAPIError

    query = select(DagRun.id, DagRun.run_id).where(DagRun.dag_id == DAG_ID)
    if after_pk is not None:
        query = query.where(DagRun.id > after_pk, DagRun.triggered_by == DagRunTriggeredByType.TEST)
    try:
        with create_session() as session:
            row = session.execute(query.order_by(DagRun.id.desc()).limit(1)).first()
    except DBAPIError as exc:
        raise AirflowDBError(f"cannot read the Airflow metadata DB {os.environ['AIRFLOW__DATABASE__SQL_ALCHEMY_CONN']} "
                             f"({exc.orig}); run `airflow db migrate` (make run does) or set AIRFLOW__DATABASE__SQL_ALCHEMY_CONN") from exc
    return (row[0], row[1]) if row else (0, None)


def task_states(run_id: str) -> list[TaskState]:
    """The run's task instances, :func:`in_run_order`."""
    apply_airflow_env()
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = DagRun.fetch_task_instances(dag_id=DAG_ID, run_id=run_id, session=session)
        states = [TaskState(ti.task_id, str(ti.state) if ti.state else "none", ti.start_date, ti.end_date, ti.duration,
                            ti.try_number or 0) for ti in tis]
    return in_run_order(states)


def in_run_order(states: list[TaskState]) -> list[TaskState]:
    """Tasks that ran in the order they started, then the others (not run yet, upstream failed) in DAG order."""

    def key(t: TaskState) -> tuple:
        ran = t.start is not None and t.state not in _NOT_RUN
        return (not ran, t.start.timestamp() if ran else 0.0, _ORDER.get(t.task_id, len(_ORDER)))

    return sorted(states, key=key)
