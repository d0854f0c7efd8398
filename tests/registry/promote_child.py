"""Child process of test_promotion_lock.py: a promoter (or a lock holder) in its own process.

    python promote_child.py promote TMP VERSION SCORE SCORING_SLEEP_S BARRIER   -> prints the decision (JSON)
    python promote_child.py hold TMP LEASE_S HOLDER                            -> takes the lock, prints "held", sleeps

Champion scores come from TMP/scores.json ({version: score}); scoring sleeps SCORING_SLEEP_S, as re-scoring a
real champion takes a while, which is the window in which two unlocked promoters both read the same champion.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dashclip_core.config import PipelineConfig
from dashclip_core.registry import mlflow_registry as reg

mode, tmp = sys.argv[1], Path(sys.argv[2])
cfg = PipelineConfig().with_overrides(**{
    "registry.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
    "registry.artifact_root": (tmp / "artifacts").as_uri(),
    "registry.model_name": "promo-race",
})

if mode == "promote":
    version, score, sleep_s, barrier = sys.argv[3], float(sys.argv[4]), float(sys.argv[5]), Path(sys.argv[6])
    reg.client(cfg)  # imports done before the start line, so both promoters start together

    def score_champion(uri: str) -> float:
        time.sleep(sleep_s)
        return json.loads((tmp / "scores.json").read_text())[uri.rsplit("/", 1)[1]]

    print("ready", flush=True)
    while not barrier.exists():
        time.sleep(0.01)
    print(json.dumps(reg.promote(cfg, version, score, score_champion)), flush=True)
elif mode == "hold":
    from dashclip_core.registry.promotion_lock import promotion_lock

    lease_s, holder = float(sys.argv[3]), sys.argv[4]
    with promotion_lock(reg.client(cfg), cfg.registry.model_name, timeout_s=60, lease_s=lease_s, holder=holder):
        print("held", flush=True)
        time.sleep(600)  # the test kills us here
else:
    raise SystemExit(f"unknown mode {mode!r}")
