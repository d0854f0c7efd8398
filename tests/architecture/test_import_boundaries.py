"""Airflow stays at the edge: every module of the library imports without loading Airflow.

import-linter (``lint-imports`` in ``make test``) checks the same statically from the source; this test
checks what really happens at import time, where a dependency of a dependency could still pull Airflow in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

IMPORT_ALL = """
import importlib, json, pkgutil, sys
import dashclip_core
names = sorted(m.name for m in pkgutil.walk_packages(dashclip_core.__path__, "dashclip_core."))
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "airflow": sorted(m for m in sys.modules if m == "airflow" or m.startswith("airflow."))}))
"""


def test_importing_every_library_module_loads_no_airflow():
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, cwd=ROOT,
                         env=os.environ.copy(), check=False, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # Given every module of the library (the walk found the packages, not an empty tree)
    assert {"dashclip_core.labeling.openai_backend", "dashclip_core.cli", "dashclip_core.evaluation.report"} <= set(result["modules"])
    # Then none of them brought Airflow along
    assert result["airflow"] == []
