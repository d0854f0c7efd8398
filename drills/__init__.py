"""Fault drills: each one injects a real fault into a real run and reports what happened.

``make drills`` (``python -m drills``) runs them all and prints one row per fault: the fault, what
happened, and the data lost (must be 0). A drill module defines ``run(work: Path) -> Row | list[Row]``
and raises when the system misbehaves (a hang, a wrong result, a partial file); ``data_lost`` counts
rows/files/versions that should exist after recovery and do not, or that exist and should not.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    fault: str  # what was injected, in a few words
    what_happened: str  # what the system did about it (figures welcome)
    data_lost: int  # must be 0


DRILLS = ["ray_worker_kill", "task_kill_mid_publish", "concurrent_runs", "s3_faults", "bad_input", "hostile_images", "secrets"]
