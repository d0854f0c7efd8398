"""``dashclip``: run the DAG locally and summarise its runs, plus the library's commands.

    dashclip run [--config C.yaml]               airflow dags test (full log to a file), a line per step, the summary
    dashclip summary [--run-id RUN]              summary of a DAG run (latest by default)
    dashclip embed | search | evaluate           the library's commands (dashclip_core.cli)

``run`` keeps the console to what a user needs: one line per step as it ends (state, time), the elapsed
time and latest ``... epoch i/n`` line of a long step every ~20 s, a failing step's last error lines,
then the summary. Airflow's, Ray's and the tasks' own output go to the run's log file, in the run folder
(``.dashclip/logs/`` while the run id is not known yet, or when the run folder is not local).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from dashclip_core.cli import add_library_commands, configure_logging
from dashclip_core.config import DEFAULT_CONFIG, PROJECT_ROOT, PipelineConfig, dashclip_home
from dashclip_core.layout import DAG_ID
from dashclip_core.redaction import redact_text, register_config_secrets
from dashclip_core.storage import is_s3, safe_run_id
from orchestration.console import ERROR_TAIL_LINES, LogFollower, StepReporter, error_tail
from orchestration.runs import (
    AirflowDBError,
    airflow_env,
    dags_test_run_after,
    latest_run_id,
    latest_run_pk,
    task_states,
)
from orchestration.summary import run_layout, summary_lines
from tasks.common import CONFIG_DIRS_ENV

RUN_LOG = "dags_test.log"  # in the run folder: everything `airflow dags test` printed
POLL_S = 2.0


def log_dir() -> Path:
    return dashclip_home() / "logs"


class RunLog:
    """The log file of one ``dashclip run``: opened under ``.dashclip/logs/``, moved into the run folder
    (same file, still being written) once the run id is known."""

    def __init__(self) -> None:
        log_dir().mkdir(parents=True, exist_ok=True)
        self.path = log_dir() / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}.log"
        self.file = open(self.path, "wb")  # noqa: SIM115 (handed to the subprocess, closed in close())

    def settle(self, run_uri: str, run_id: str) -> Path:
        """Move the log into the local run folder ``run_uri`` (or to ``.dashclip/logs/<run>.log`` when the
        run folder is on S3); return its path."""
        target = log_dir() / f"{safe_run_id(run_id)}.log" if is_s3(run_uri) else Path(run_uri) / RUN_LOG
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path, target)  # the writer keeps its file descriptor
            self.path = target
        except OSError:
            pass  # another filesystem: the log stays where it is
        return self.path

    def close(self) -> None:
        self.file.close()


def cmd_run(args: argparse.Namespace) -> int:
    """Run the DAG with ``airflow dags test`` (output to the log file), report its steps, print the summary."""
    cfg = PipelineConfig.from_file(args.config)  # a bad config fails here, before Airflow starts
    register_config_secrets(cfg.to_dict())  # masked in what this command prints
    config_file = _config_file(args.config)
    # the tasks read a relative config_path against the project root: pass the file this command read
    conf = {"config_path": args.config if (PROJECT_ROOT / args.config).resolve() == config_file else str(config_file)}
    for key in ("sample_size", "epochs", "num_workers"):
        if getattr(args, key) is not None:
            conf[key] = getattr(args, key)
    try:
        before = latest_run_pk()
    except AirflowDBError as err:
        print(f"dashclip run: {err}", file=sys.stderr)
        return 2
    log = RunLog()
    airflow = Path(sys.executable).with_name("airflow")
    env = {**airflow_env(), "PYTHONUNBUFFERED": "1"}  # the log (and the progress lines read from it) stay current
    env[CONFIG_DIRS_ENV] = allow_config_folder(config_file, env.get(CONFIG_DIRS_ENV, ""))
    print(f"running DAG {DAG_ID} with airflow dags test (config {args.config})", flush=True)
    t0 = time.time()
    proc = subprocess.Popen([str(airflow), "dags", "test", DAG_ID, "-c", json.dumps(conf)], cwd=PROJECT_ROOT, env=env,
                            stdout=log.file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    follower, reporter, run_id, failed, wall = LogFollower(log.path), StepReporter(), None, [], None
    try:
        while wall is None:
            if proc.poll() is not None:
                wall = time.time() - t0  # this pass still reports the steps that ended last
            if run_id is None and (run_id := dags_test_run_after(before)) is not None:
                follower.path = log.settle(run_layout(run_id, cfg).paths.run_uri, run_id)
                print(f"run {run_id}; full log: {log.path}", flush=True)
            lines = follower.new_lines()
            if run_id is None:
                time.sleep(POLL_S)
                continue
            now = datetime.now(UTC)
            reporter.saw_log_lines(lines, now)
            for report in reporter.update(task_states(run_id), now):
                print(report.line, flush=True)
                if report.failed:
                    failed.append(report.ended.task_id)
                    _print_error(log.path)
            if wall is None:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        proc.wait()
        print(f"\ninterrupted; full log: {log.path}", file=sys.stderr)
        return 130
    finally:
        log.close()
    if run_id is None:
        print(f"no DAG run was recorded (airflow dags test exited {proc.returncode}):", file=sys.stderr)
        _print_error(log.path, file=sys.stderr)
        return proc.returncode or 1
    print("\n".join(summary_lines(run_id, args.config, wall)))
    print(f"full log: {log.path}")
    if proc.returncode:
        where = f" at {', '.join(dict.fromkeys(failed))}" if failed else ""
        print(f"\nDAG run failed{where} (airflow dags test exited {proc.returncode}); full log: {log.path}", file=sys.stderr)
    return proc.returncode


def _config_file(config_path: str) -> Path:
    """The file ``PipelineConfig.from_file(config_path)`` reads (relative: the current folder, else the project root)."""
    path = Path(config_path)
    return (path if path.is_absolute() or path.exists() else PROJECT_ROOT / path).resolve()


def allow_config_folder(config_file: Path, config_dirs: str) -> str:
    """``$DASHCLIP_CONFIG_DIRS`` for the DAG run this command starts, with the folder of ``--config`` added.

    The DAG's tasks accept only configs under ``configs/`` or those folders (a DAG param comes from whoever
    can trigger a run); ``dashclip run`` is the operator on their own machine, so the config they name is allowed.
    """
    folder = str(config_file.parent)
    dirs = [d for d in config_dirs.split(os.pathsep) if d]
    return os.pathsep.join(dirs if folder in dirs else [*dirs, folder])


def _print_error(log_path: Path, file=None) -> None:
    """The last lines of the newest error in the log, indented under the step line (secrets masked)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return
    for line in error_tail(lines, ERROR_TAIL_LINES):
        print(f"        | {redact_text(line)}", file=file or sys.stdout)
    print(f"        | (full log: {log_path})", file=file or sys.stdout, flush=True)


def cmd_summary(args: argparse.Namespace) -> int:
    try:
        run_id = args.run_id or latest_run_id()
    except AirflowDBError as err:
        print(f"dashclip summary: {err}", file=sys.stderr)
        return 2
    if run_id is None:
        print("no DAG run found", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(run_id, args.config)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dashclip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help=f"run DAG {DAG_ID} locally (airflow dags test) and print the summary")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--sample-size", dest="sample_size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--num-workers", dest="num_workers", type=int)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("summary", help="print the summary of a DAG run")
    p.add_argument("--run-id")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_summary)

    add_library_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
