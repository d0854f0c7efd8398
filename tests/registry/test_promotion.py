"""Promotion by alias with the real MLflow registry: challenger always, champion only when it wins."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from dashclip_core.config import PipelineConfig
from dashclip_core.registry import mlflow_registry as reg


class Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return pd.DataFrame({"x": [1.0] * len(model_input)})


@pytest.fixture()
def cfg(tmp_path):
    return PipelineConfig().with_overrides(**{
        "registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "registry.artifact_root": (tmp_path / "artifacts").as_uri(),
        "registry.model_name": "promo-test",
    })


def _new_version(cfg) -> str:
    reg.client(cfg)
    with mlflow.start_run(experiment_id=reg.experiment_id(cfg)):
        info = mlflow.pyfunc.log_model(name="m", python_model=Constant(), registered_model_name=cfg.registry.model_name)
    return str(info.registered_model_version)


def test_champion_moves_only_on_improvement(cfg):
    scores = {}
    v1 = _new_version(cfg)
    d1 = reg.promote(cfg, v1, 0.50, lambda uri: scores[uri])
    assert d1["promoted"] and reg.aliases(cfg) == {"challenger": v1, "champion": v1}

    v2 = _new_version(cfg)
    scores[f"models:/promo-test/{v1}"] = 0.50
    d2 = reg.promote(cfg, v2, 0.40, lambda uri: scores[uri])
    assert not d2["promoted"] and reg.aliases(cfg) == {"challenger": v2, "champion": v1}
    assert reg.client(cfg).get_model_version("promo-test", v2).tags["validation_status"] == "rejected"

    v3 = _new_version(cfg)
    d3 = reg.promote(cfg, v3, 0.60, lambda uri: scores[uri])
    assert d3["promoted"] and d3["champion_score"] == 0.50
    assert reg.aliases(cfg) == {"challenger": v3, "champion": v3}
    assert reg.client(cfg).get_model_version("promo-test", v3).tags["validation_status"] == "passed"


def test_promotion_can_be_switched_off(cfg):
    off = cfg.with_overrides(**{"registry.promote": False})
    v1 = _new_version(off)
    decision = reg.promote(off, v1, 0.9, lambda uri: 0.0)
    assert not decision["promoted"] and "champion" not in reg.aliases(off)
    # it would have won: not the same verdict as a version that lost the comparison
    assert reg.client(off).get_model_version("promo-test", v1).tags["validation_status"] == "won_not_promoted"
