"""Drill as a test: SIGKILL one Ray Train worker mid-epoch; stage 1 resumes from its last checkpoint (drills/ray_worker_kill.py)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.drill]  # two 4-epoch stage-1 trainings on a local Ray with 2 workers (~3 min on 2 cores)


def test_killed_ray_worker_resumes_from_last_checkpoint_without_loss(tmp_path):
    from drills import ray_worker_kill

    row = ray_worker_kill.run(tmp_path)  # raises when the run does not finish, restarts from scratch or drifts
    assert row.data_lost == 0
    assert "epochs re-done 1" in row.what_happened and "finished epochs trained twice 0" in row.what_happened
