"""Promotion is compare-and-set across processes (issue 11 row 13): two real promoters at once, a crashed lock holder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from dashclip_core.config import PipelineConfig
from dashclip_core.registry import mlflow_registry as reg

CHILD = Path(__file__).with_name("promote_child.py")
NAME = "promo-race"


class Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return pd.DataFrame({"x": [1.0] * len(model_input)})


@pytest.fixture()
def cfg(tmp_path):
    return PipelineConfig().with_overrides(**{
        "registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "registry.artifact_root": (tmp_path / "artifacts").as_uri(),
        "registry.model_name": NAME,
    })


def _new_version(cfg) -> str:
    reg.client(cfg)
    with mlflow.start_run(experiment_id=reg.experiment_id(cfg)):
        info = mlflow.pyfunc.log_model(name="m", python_model=Constant(), registered_model_name=NAME)
    return str(info.registered_model_version)


def _child(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _decision(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_two_promoters_at_once_end_with_the_better_model(cfg, tmp_path):
    v0, v1, v2 = _new_version(cfg), _new_version(cfg), _new_version(cfg)
    reg.promote(cfg, v0, 0.40, lambda uri: 0.0)
    (tmp_path / "scores.json").write_text(json.dumps({v0: 0.40, v1: 0.50, v2: 0.60}))
    barrier = tmp_path / "go"
    # v1 (worse) scores the champion slowly, v2 (better) quickly: without a lock both compare against v0,
    # v2 sets champion first and v1 overwrites it last.
    slow_worse = _child("promote", str(tmp_path), v1, "0.50", "3.0", str(barrier))
    fast_better = _child("promote", str(tmp_path), v2, "0.60", "0.5", str(barrier))
    for child in (slow_worse, fast_better):  # both at the start line, imports done
        assert child.stdout.readline().strip() == "ready", child.stderr.read()[-3000:]
    barrier.touch()
    decisions = [_decision(slow_worse), _decision(fast_better)]

    assert reg.aliases(cfg)["champion"] == v2
    first, second = sorted(decisions, key=lambda d: d["lock"]["acquired_at"])
    assert first["expected_champion"] == v0, "the first promoter compared against the champion before both"
    assert second["expected_champion"] == first["champion_after"], "the second promoter compared against the first's result"
    assert second["lock"]["waited_s"] > 0.2, "the second promoter did not wait for the first"
    assert {d["champion_after"] for d in decisions} <= {v1, v2} and decisions[1]["champion_after"] == v2
    tags = {d["version"]: reg.client(cfg).get_model_version(NAME, d["version"]).tags for d in decisions}
    assert tags[v2]["validation_status"] == "passed"
    assert json.loads(tags[v2]["promotion_decision"])["expected_champion"] in (v0, v1)
    assert _lock_models(cfg) == [], "the lock was not released"


def _lock_models(cfg) -> list[str]:
    return sorted(m.name for m in reg.client(cfg).search_registered_models() if m.name.startswith(f"{NAME}.promotion-lock"))


def _hold(tmp_path, lease_s: float, holder: str) -> subprocess.Popen:
    proc = _child("hold", str(tmp_path), str(lease_s), holder)
    line = proc.stdout.readline()
    assert line.strip() == "held", proc.stderr.read()[-3000:]
    return proc


def test_a_crashed_holders_lock_is_broken_after_its_lease_and_recorded(cfg, tmp_path):
    v1 = _new_version(cfg)
    holder = _hold(tmp_path, lease_s=3.0, holder="crashed-run")
    os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock: no finally runs
    holder.wait(timeout=30)
    t0 = time.monotonic()

    decision = reg.promote(cfg.with_overrides(**{"registry.promotion_lock_timeout_s": 60.0}), v1, 0.5, lambda uri: 0.0)

    assert decision["promoted"] and reg.aliases(cfg)["champion"] == v1
    (broken,) = decision["lock"]["broken_stale_locks"]
    assert broken["stale_holder"] == "crashed-run" and float(broken["broken_at"]) >= float(broken["expired_at"])
    assert time.monotonic() - t0 < 30
    marker = reg.client(cfg).get_registered_model(broken["marker"])
    assert marker.tags["stale_holder"] == "crashed-run"
    assert _lock_models(cfg) == [broken["marker"]], "the lock itself was not released"


def test_a_live_holder_makes_the_next_promoter_wait_then_fail_naming_it(cfg, tmp_path):
    from dashclip_core.registry.promotion_lock import PromotionLockTimeout

    v1 = _new_version(cfg)
    holder = _hold(tmp_path, lease_s=600.0, holder="slow-run")
    try:
        t0 = time.monotonic()
        with pytest.raises(PromotionLockTimeout, match="held by slow-run.*promotion_lock_timeout_s = 2"):
            reg.promote(cfg.with_overrides(**{"registry.promotion_lock_timeout_s": 2.0}), v1, 0.5, lambda uri: 0.0)
        assert 2.0 <= time.monotonic() - t0 < 10
        assert "challenger" not in reg.aliases(cfg), "nothing is set without the lock"
    finally:
        holder.kill()
        holder.communicate(timeout=30)


def test_a_retry_of_the_same_run_takes_over_the_lock_its_killed_attempt_left(cfg, tmp_path):
    """register_model killed while holding the lock: its Airflow retry (same holder = same run id) must not
    wait out the 30-minute lease; another run's live lock is still waited for (test above)."""
    v1 = _new_version(cfg)
    holder = _hold(tmp_path, lease_s=600.0, holder="dashclip_nightly/run-1")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    t0 = time.monotonic()

    decision = reg.promote(cfg.with_overrides(**{"registry.promotion_lock_timeout_s": 60.0}), v1, 0.5, lambda uri: 0.0,
                           holder="dashclip_nightly/run-1")

    assert decision["promoted"] and reg.aliases(cfg)["champion"] == v1
    assert time.monotonic() - t0 < 30, "the retry waited for its own dead attempt's lease"
    (broken,) = decision["lock"]["broken_stale_locks"]
    assert broken["stale_holder"] == "dashclip_nightly/run-1"
    assert _lock_models(cfg) == [broken["marker"]]
