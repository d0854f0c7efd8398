"""Run a command and print its wall time and the peak memory of its whole process tree.

Ray starts its raylet, GCS and workers as children of the driver, so the tree covers them too.

Two figures: RSS sampled every 0.5 s, PSS every 10 s and at every new RSS peak (reading PSS is costly; the
meter's own CPU seconds are printed too):

- ``peak_tree_rss_gib``: the peak of the sum of every process's RSS (the figure the issues' targets use). It counts
  a shared page once per process that maps it: every Ray worker maps the same torch libraries, and every worker of
  a memory-mapped stem cache maps the same file pages.
- ``peak_tree_pss_gib``: the peak of the sum of PSS (proportional set size: a page shared by n processes counts
  1/n in each), i.e. what the tree really holds in RAM.

At the RSS peak the largest processes are printed (RSS, PSS, command line), so a regression names its process.

    .venv/bin/python benchmarks/peak_memory.py -- make run
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def tree_memory(proc: psutil.Process, with_pss: bool) -> tuple[int, int, list[tuple[int, int, str]]]:
    """(sum RSS, sum PSS, [(rss, pss, command line)]) over ``proc`` and its descendants (PSS 0 unless ``with_pss``)."""
    rss_total = pss_total = 0
    rows = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            if with_pss:
                info = p.memory_full_info()  # reads /proc/<pid>/smaps_rollup
                rss, pss = info.rss, info.pss
            else:
                rss, pss = p.memory_info().rss, 0
            cmd = " ".join(p.cmdline())[:110] or p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss_total, pss_total = rss_total + rss, pss_total + pss
        rows.append((rss, pss, cmd))
    return rss_total, pss_total, rows


SAMPLE_S = 0.5  # RSS of the tree
PSS_EVERY_S = 10.0  # PSS of the tree (and on every new RSS peak)


def tree_rss(proc: psutil.Process) -> int:
    return tree_memory(proc, with_pss=False)[0]


def main(argv: list[str]) -> int:
    cmd = argv[argv.index("--") + 1 :] if "--" in argv else argv
    if not cmd:
        print(__doc__)
        return 2
    t0 = time.time()
    child = subprocess.Popen(cmd)
    proc = psutil.Process(child.pid)
    peak_rss = peak_pss = 0
    last_pss = 0.0
    at_peak: list[tuple[int, int, str]] = []
    while child.poll() is None:
        rss = tree_rss(proc)
        # PSS reads every process's smaps_rollup: on a 2-core box, every 0.5 s that cost a large share of a core,
        # at normal priority, against Ray's workers at nice 15 (a slower run than without the meter). So PSS is
        # read on a new RSS peak (+1%) and every PSS_EVERY_S, RSS every SAMPLE_S.
        if rss > peak_rss * 1.01 or time.time() - last_pss >= PSS_EVERY_S:
            rss, pss, rows = tree_memory(proc, with_pss=True)
            last_pss = time.time()
            peak_pss = max(peak_pss, pss)
            if rss > peak_rss:
                peak_rss, at_peak = rss, rows
        peak_rss = max(peak_rss, rss)
        time.sleep(SAMPLE_S)
    gib = 2**30
    print("peak_memory: largest processes at the RSS peak (rss GiB, pss GiB, command):", file=sys.stderr)
    for rss, pss, name in sorted(at_peak, reverse=True)[:8]:
        print(f"  {rss / gib:6.2f} {pss / gib:6.2f}  {name}", file=sys.stderr)
    print(f"peak_memory: command={' '.join(cmd)!r} exit={child.returncode} wall_s={time.time() - t0:.0f} "
          f"peak_tree_rss_gib={peak_rss / gib:.2f} peak_tree_pss_gib={peak_pss / gib:.2f} "
          f"meter_cpu_s={sum(psutil.Process().cpu_times()[:2]):.0f}", file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
