"""The hostile-images drill (drills/hostile_images.py) holds: every hostile image quarantined, nothing good lost."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.drill]


def test_hostile_images_drill_loses_nothing(tmp_path, monkeypatch):
    from drills.hostile_images import run

    monkeypatch.setenv("DASHCLIP_CONFIG_DIRS", str(tmp_path))  # the drill writes its configs into its work folder
    row = run(tmp_path)
    assert row.data_lost == 0, row
