"""The concurrent-runs drill in CI: two DAG runs at once under the real scheduler, champion by compare-and-set."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.drill]  # ~10 min; the drill bounds every wait itself


def test_two_concurrent_dag_runs_lose_nothing_and_promote_by_compare_and_set(tmp_path):
    from drills import concurrent_runs

    row = concurrent_runs.run(tmp_path)  # raises on a failed run, a shared file, a second version or a lost race

    assert row.data_lost == 0
    assert "1 version each" in row.what_happened
