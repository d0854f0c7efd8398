"""``python -m drills [name ...]``: run the fault drills, print one row each, exit 1 unless all held with 0 data lost."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from drills import DRILLS, Row
from drills.env import isolate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drills", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"drills to run (default: all of {', '.join(DRILLS)})")
    args = parser.parse_args(argv)
    names = args.names or DRILLS
    unknown = sorted(set(names) - set(DRILLS))
    if unknown:
        parser.error(f"unknown drill(s) {unknown}; known: {DRILLS}")
    home = isolate()
    rows: list[tuple[str, Row | None, float, str]] = []
    for name in names:
        work = home / name
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        print(f"--- drill {name} (work folder {work})", flush=True)
        try:
            out = importlib.import_module(f"drills.{name}").run(work)
            for row in out if isinstance(out, list) else [out]:
                rows.append((name, row, time.time() - t0, ""))
        except Exception as exc:  # noqa: BLE001 (a drill that raises is a failed drill: report it, go on with the others)
            traceback.print_exc()
            rows.append((name, None, time.time() - t0, f"{type(exc).__name__}: {exc}"))
    print()
    print("| drill | fault | what happened | data lost | s |")
    print("|---|---|---|---|---|")
    ok = True
    for name, row, seconds, error in rows:
        if row is None:
            ok = False
            print(f"| {name} | - | FAILED: {error.splitlines()[0][:300] if error else ''} | ? | {seconds:.0f} |")
        else:
            ok &= row.data_lost == 0
            print(f"| {name} | {row.fault} | {row.what_happened} | {row.data_lost} | {seconds:.0f} |")
    print(f"\nwork folders under {Path(home)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
