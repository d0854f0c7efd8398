"""``dashclip run`` on a DAG that fails at its catalog gate: the failing step and its error on the console,
the full log in the run folder, a non-zero exit code (a real ``airflow dags test``; ~30 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_a_failing_step_shows_its_error_and_the_log(airflow_db, tmp_path, capsys) -> None:
    from orchestration.cli import RUN_LOG, main

    config = tmp_path / "too-small.yaml"  # the gate wants more products than the tiny catalog has
    config.write_text((ROOT / "configs" / "tiny.yaml").read_text() + "validation:\n  min_products: 100000\n")

    rc = main(["run", "--config", str(config)])

    assert rc != 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert any(ln.split()[:3] == ["ok", "extract_catalog", "success"] for ln in out)
    fail = next(i for i, ln in enumerate(out) if ln.split()[:3] == ["FAIL", "validate_catalog", "failed"])
    shown = "\n".join(out[fail + 1 : fail + 15])
    assert "catalog gate failed" in shown, shown
    log = Path(next(ln for ln in out if ln.startswith("full log: ")).removeprefix("full log: "))
    assert log.name == RUN_LOG and log.exists() and "catalog gate failed" in log.read_text()
    assert any(ln.split()[:2] == ["label_pairs", "upstream_failed"] for ln in out)  # the summary's task table
    assert "wall time:" in captured.out and "validate_catalog" in captured.err
    assert "Could not import graphviz" not in captured.out + captured.err
