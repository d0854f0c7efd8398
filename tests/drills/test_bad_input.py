"""The bad-input drill under pytest: every case ends in a quarantine, a named error or a gate stop, within its bound."""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.drill]


def test_bad_input_sweep_quarantines_bad_rows_and_processes_the_rest(tmp_path):
    from drills import bad_input

    t0 = time.monotonic()
    rows = bad_input.run(tmp_path / "bad_input")
    assert time.monotonic() - t0 < 600  # the acceptance bound: finishes or stops at the gate within 10 minutes
    assert len(rows) == len(bad_input.CASES)
    assert all(row.data_lost == 0 for row in rows), rows
