"""Run a command and print its wall time and the peak total RSS of its whole process tree.

Ray starts its raylet, GCS and workers as children of the driver, so the tree covers them too.

    .venv/bin/python benchmarks/peak_memory.py -- make run
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def main(argv: list[str]) -> int:
    cmd = argv[argv.index("--") + 1 :] if "--" in argv else argv
    if not cmd:
        print(__doc__)
        return 2
    t0 = time.time()
    child = subprocess.Popen(cmd)
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.5)
    print(f"peak_memory: command={' '.join(cmd)!r} exit={child.returncode} wall_s={time.time() - t0:.0f} "
          f"peak_tree_rss_gib={peak / 2**30:.2f}", file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
