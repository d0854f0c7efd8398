"""What ``dashclip run`` shows while the DAG runs: one line per step as it ends, the elapsed time (and the
latest epoch line) of a long step, the last lines of a failing step's error. Everything else goes to the log.

Pure functions and small stateful helpers over :class:`~orchestration.runs.TaskState` lists and log lines,
so they are tested without Airflow.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from orchestration.runs import TaskState

PROGRESS_EVERY_S = 20.0  # a running step reports its elapsed time this often
ERROR_TAIL_LINES = 12

# States worth a line when a task reaches them (running/queued/scheduled are shown as progress only).
REPORTED = ("success", "failed", "up_for_retry", "upstream_failed", "skipped", "removed")
NOT_RUN = ("upstream_failed", "skipped", "removed")  # ended without running: no time to show
FAILED = ("failed", "up_for_retry")  # a step's error is shown under its line
MARKS = {"success": "ok", "failed": "FAIL", "up_for_retry": "retry", "upstream_failed": "--", "skipped": "--", "removed": "--"}

# A task's progress line, by the convention "<what> epoch i/n ...", wherever a log handler put it:
# Airflow's "<time> [info     ] stage1 epoch 2/4: ... [logger] loc=..." or Ray's "(RayTrainWorker pid=1) ... stage1 epoch 2/4: ...".
_PROGRESS = re.compile(r"([A-Za-z][\w.-]*(?: [\w.-]+)?:? epoch \d+/\d+[^\[\r\n]*)")
# Lines that never help a reader of an error (Ray Train's controller polling, progress bars).
_NOISE = re.compile(r"PlacementGroupCleaner|Failed to query Ray Train Controller|it/s\]|\d+%\|")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its "(RayTrainWorker pid=…)" prefixes
_TRACEBACK = re.compile(r"^\s*Traceback \(most recent call last\)")
_ERROR_RECORD = re.compile(r"\[error\s*\]|\bERROR\b")
_RECORD_START = re.compile(r"\d{4}-\d\d-\d\d[T ]\d|\(\w+ pid=\d+\)|\[\d{4}-")  # a new log record (Airflow, Ray), not a message line


def format_seconds(seconds: float | None) -> str:
    """``8.2 s`` below a minute, ``3m 05s`` above; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m {rest:02d}s"


def step_line(task_id: str, state: str, seconds: float | None, try_number: int = 1) -> str:
    """The line printed when a step ends, e.g. ``  ok    <task id>             success       1m 05s``."""
    retry = f"  (try {try_number})" if try_number > 1 else ""
    return f"  {MARKS.get(state, '..'):5s} {task_id:22s} {state:16s} {format_seconds(seconds):>8s}{retry}"


def progress_line(task_id: str, elapsed: float, latest: str | None) -> str:
    """The line of a step still running: its elapsed time and, when it logged one, its latest progress line."""
    text = f"  ..    {task_id:22s} {'running':16s} {format_seconds(elapsed):>8s}"
    return f"{text}   {latest}" if latest else text


def progress_message(line: str) -> str | None:
    """The ``<what> epoch i/n ...`` message in a log line, or None."""
    line = _ANSI.sub("", line)
    if _NOISE.search(line):
        return None
    m = _PROGRESS.search(line)
    return " ".join(m.group(1).split()) if m else None


def error_tail(lines: list[str], n: int = ERROR_TAIL_LINES) -> list[str]:
    """The last ``n`` lines of the newest traceback in ``lines``, ending with its exception message; without a
    traceback, the newest error record and what follows it (or just the last lines)."""
    useful = [_ANSI.sub("", ln).rstrip() for ln in lines if ln.strip() and not _NOISE.search(ln)]
    tracebacks = [i for i, ln in enumerate(useful) if _TRACEBACK.search(ln)]
    if tracebacks:
        start = end = tracebacks[-1]
        while end + 1 < len(useful) and useful[end + 1][:1].isspace():  # the frames
            end += 1
        end += 1  # the exception line; a message spanning lines runs until the next log record
        while end + 1 < len(useful) and not _RECORD_START.match(useful[end + 1]):
            end += 1
        return useful[start : end + 1][-n:]
    errors = [i for i, ln in enumerate(useful) if _ERROR_RECORD.search(ln)]
    return useful[errors[-1] if errors else 0 :][-n:]


class LogFollower:
    """Reads the lines appended to a log file since the last call (the file may not exist yet)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, ""

    def new_lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        text = self.partial + data.decode("utf-8", errors="replace")
        *lines, self.partial = re.split(r"\r\n|\r|\n", text)  # tqdm redraws with \r
        return lines


@dataclass(frozen=True)
class Report:
    """A console line; ``ended`` is the task whose end it reports (None for a progress line)."""

    line: str
    ended: TaskState | None = None

    @property
    def failed(self) -> bool:
        return self.ended is not None and self.ended.state in FAILED


@dataclass
class StepReporter:
    """Turns successive snapshots of a run's task states into console lines (each step's end once, progress
    of running steps every ``every`` seconds)."""

    every: float = PROGRESS_EVERY_S
    reported: dict[str, tuple[str, int]] = field(default_factory=dict)  # task -> (state, try) already printed
    last_progress: dict[tuple[str, int], float] = field(default_factory=dict)  # (task, try) -> elapsed at its last progress line
    latest: str | None = None  # newest progress message seen in the log
    latest_at: datetime | None = None  # when it was seen

    def saw_log_lines(self, lines: Iterable[str], now: datetime) -> None:
        for line in lines:
            if (msg := progress_message(line)) is not None:
                self.latest, self.latest_at = msg, now

    def update(self, states: list[TaskState], now: datetime) -> list[Report]:
        """What to print for this snapshot of the run (``now``: timezone-aware, like Airflow's dates)."""
        out = []
        ended = [t for t in states if t.state in REPORTED and self.reported.get(t.task_id) != (t.state, t.try_number)]
        for t in sorted(ended, key=lambda t: t.end or now):  # stable: ties keep the run's (DAG) order
            self.reported[t.task_id] = (t.state, t.try_number)
            seconds = None if t.state in NOT_RUN else t.duration if t.duration is not None else _seconds(t.start, t.end)
            out.append(Report(step_line(t.task_id, t.state, seconds, t.try_number), t))
        for t in states:
            if t.state != "running" or t.start is None:
                continue
            elapsed = (now - t.start).total_seconds()
            key = (t.task_id, t.try_number)
            if elapsed - self.last_progress.get(key, 0.0) >= self.every:
                self.last_progress[key] = elapsed
                fresh = self.latest if self.latest_at is not None and self.latest_at >= t.start else None
                out.append(Report(progress_line(t.task_id, elapsed, fresh)))
        return out


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None
