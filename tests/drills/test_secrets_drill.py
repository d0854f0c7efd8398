"""The secrets drill under pytest: a password in a down catalog's URL shows nowhere; a config outside the allowed
folders is refused before anything is written."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.drill]


def test_secrets_drill_masks_everywhere_and_refuses_outside_configs(tmp_path):
    from drills import secrets

    rows = secrets.run(tmp_path / "secrets")
    assert len(rows) == 2
    assert all(row.data_lost == 0 for row in rows), rows
