"""PipelineConfig: one way in, unknown keys named, overrides, env expansion, round trip."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dashclip_core.config import PipelineConfig, per_worker_batch_size


def test_shipped_configs_load(tiny_config):
    for name in ("demo", "grocery", "tiny"):
        cfg = PipelineConfig.from_file(f"configs/{name}.yaml")
        assert cfg.name == name
    assert PipelineConfig.from_file(tiny_config).model.image.backbone == "vit-tiny"


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stage1_epoch: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*train\.stage1_epoch"):
        PipelineConfig.from_file(path)


def test_wrong_type_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  num_workers: two\n")
    with pytest.raises(ValueError, match="train.num_workers"):
        PipelineConfig.from_file(path)


def test_env_expansion(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("catalog:\n  grocery_root: ${MY_DATA:-/default}\n")
    assert PipelineConfig.from_file(path).catalog.grocery_root == "/default"
    monkeypatch.setenv("MY_DATA", "/elsewhere")
    assert PipelineConfig.from_file(path).catalog.grocery_root == "/elsewhere"


def test_overrides_and_fingerprint():
    cfg = PipelineConfig()
    new = cfg.with_overrides(**{"train.num_workers": 1, "catalog.sample_size": 10})
    assert (new.train.num_workers, new.catalog.sample_size) == (1, 10)
    assert cfg.train.num_workers == 2  # frozen original untouched
    assert new.fingerprint() != cfg.fingerprint()
    with pytest.raises(ValueError, match="no such config field"):
        cfg.with_overrides(**{"train.nope": 1})


@given(workers=st.integers(1, 8), epochs=st.integers(0, 50), temp=st.floats(0.01, 1.0))
def test_round_trip_through_dict(workers, epochs, temp):
    cfg = PipelineConfig().with_overrides(**{"train.num_workers": workers, "train.stage1_epochs": epochs, "loss.temperature": temp})
    assert PipelineConfig.from_dict(cfg.to_dict()) == cfg
    assert dataclasses.asdict(cfg) == cfg.to_dict()


def test_per_worker_batch():
    assert per_worker_batch_size(32, 2) == 16
    with pytest.raises(ValueError):
        per_worker_batch_size(1, 2)


@pytest.mark.parametrize(("yaml_text", "key", "why"), [
    ("storage:\n  root:\n", "storage.root", "empty"),  # was: a str field holding None, outputs under ./None
    ("labeling:\n  max_cost_usd: '50'\n", "labeling.max_cost_usd", "must be a number"),  # was: passed, failed later in the budget
    ("labeling:\n  max_tokens: yes\n", "labeling.max_tokens", "must be an integer"),  # was: True, a 1-token budget
    ("labeling:\n  max_tokens: 1.5\n", "labeling.max_tokens", "must be an integer"),
    ("evaluation:\n  ks: [10, fifty]\n", r"evaluation.ks\[1\]", "must be an integer"),  # was: tuple of mixed types
    ("evaluation:\n  ks: 10\n", "evaluation.ks", "must be a list"),
    ("registry:\n  model_name: [a, b]\n", "registry.model_name", "must be a string"),
    ("loss:\n  temperature: .nan\n", "loss.temperature", "finite"),
])
def test_optional_and_tuple_fields_are_type_checked(tmp_path, yaml_text, key, why):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=rf"bad\.yaml: '{key}'.*{why}"):
        PipelineConfig.from_file(path)


def test_optional_fields_accept_null_and_their_type(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("labeling:\n  max_tokens: 5000\n  max_cost_usd:\nevaluation:\n  ks: [5, 20]\n")
    cfg = PipelineConfig.from_file(path)
    assert (cfg.labeling.max_tokens, cfg.labeling.max_cost_usd, cfg.evaluation.ks) == (5000, None, (5, 20))


def test_overrides_are_type_checked_like_the_file():
    cfg = PipelineConfig()
    assert cfg.with_overrides(**{"labeling.max_cost_usd": 50}).labeling.max_cost_usd == 50.0
    with pytest.raises(ValueError, match="'labeling.max_cost_usd' must be a number"):
        cfg.with_overrides(**{"labeling.max_cost_usd": "50"})
    with pytest.raises(ValueError, match="'train.num_workers' must be an integer"):
        cfg.with_overrides(**{"train.num_workers": True})


def test_an_override_may_replace_a_whole_nested_section():
    from dashclip_core.config import ImageTowerConfig

    cfg = PipelineConfig().with_overrides(**{"model.image": ImageTowerConfig(image_size=32)})
    assert cfg.model.image.image_size == 32
    cfg = PipelineConfig().with_overrides(**{"model.image": {"image_size": 48}})
    assert cfg.model.image.image_size == 48
    with pytest.raises(ValueError, match="'model.image.image_size' must be an integer"):
        PipelineConfig().with_overrides(**{"model.image": {"image_size": "48"}})
