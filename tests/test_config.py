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
