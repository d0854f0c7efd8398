"""Manual-trigger params override the run's config (labelling params included); every param maps to a config field."""

from __future__ import annotations

from tasks.common import PARAM_OVERRIDES, resolve_config


def test_labelling_params_override_the_config(tiny_config):
    cfg = resolve_config({"config_path": str(tiny_config), "labeler": "openai", "llm_model": "ft:gpt-x:org:dashclip:1",
                          "max_cost_usd": 12.5, "labeling_dry_run": True, "epochs": None})
    assert cfg.labeling.labeler == "openai" and cfg.labeling.llm_model == "ft:gpt-x:org:dashclip:1"
    assert cfg.labeling.max_cost_usd == 12.5 and cfg.labeling.dry_run is True
    base = resolve_config({"config_path": str(tiny_config)})
    assert cfg.train == base.train  # an empty param keeps the config's value
    assert base.labeling.max_cost_usd is None and base.labeling.dry_run is False


def test_every_param_names_real_config_fields(tiny_config):
    base = resolve_config({"config_path": str(tiny_config)})
    for name, fields in PARAM_OVERRIDES.items():
        for field in fields:
            section, _, attr = field.partition(".")
            assert hasattr(getattr(base, section), attr), (name, field)
