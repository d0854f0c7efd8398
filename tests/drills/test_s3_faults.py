"""The S3 fault drill (drills/s3_faults.py): throttling, dropped connections and an outage mid-publish end in
retries and a complete publish identical to a fault-free run."""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.drill
def test_s3_faults_drill_loses_nothing(tmp_path, monkeypatch):
    from drills import s3_faults

    monkeypatch.setenv("DASHCLIP_CONFIG_DIRS", str(tmp_path))  # the drill writes its configs into its work folder
    row = s3_faults.run(tmp_path)
    assert row.data_lost == 0
    assert "slowdown" in row.fault and "no _SUCCESS" in row.what_happened
