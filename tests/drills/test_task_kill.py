"""The kill-mid-publish drill (drills/task_kill_mid_publish.py): a task SIGKILLed while it publishes, then retried
with the same run id, ends with the uninterrupted run's outputs, no debris and one model version."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.drill]


def test_task_kill_mid_publish_drill_loses_nothing(tmp_path, monkeypatch):
    from drills import task_kill_mid_publish

    monkeypatch.setenv("DASHCLIP_CONFIG_DIRS", str(tmp_path))  # the drill writes its configs into its work folder
    rows = task_kill_mid_publish.run(tmp_path)
    assert [row.data_lost for row in rows] == [0, 0, 0], rows
    assert "register_model" in rows[-1].fault and "exactly 1 version" in rows[-1].what_happened
