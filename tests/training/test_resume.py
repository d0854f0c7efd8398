"""Checkpoints are tensors-only (loaded with ``weights_only=True``) and a run resumes only from its own inputs.

Fast tests: the loader refuses a pickle that would run code; ``choose_run_name`` picks the run to resume.
Slow test: real stage-2 fits under Ray (same inputs resume, a changed config or changed data start fresh).
The mid-epoch resume after a killed worker is ``drills/ray_worker_kill.py`` (tests/drills).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dashclip_core.config import PipelineConfig
from dashclip_core.training.checkpoints import (
    META_FILE,
    STATE_FILE,
    checkpoint_folders,
    choose_run_name,
    read_checkpoint,
    stage_fingerprint,
    write_checkpoint,
)


class _RunsCodeWhenUnpickled:
    """An object whose pickle calls ``os.system``: loading it with ``weights_only=False`` runs the command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _fingerprint(tiny_config, data="d1", **overrides):
    cfg = PipelineConfig.from_file(tiny_config).with_overrides(**overrides)
    return stage_fingerprint(cfg, "stage1", {"pairs": data})


def _fake_run(storage: Path, name: str, fingerprint_json: dict | None) -> Path:
    """A run folder with one checkpoint whose sidecar records ``fingerprint_json`` (None: HEAD's format, no sidecar)."""
    folder = storage / name / "checkpoint_2026-01-01_00-00-00.000000"
    folder.mkdir(parents=True)
    if fingerprint_json is None:
        torch.save({"model": {}, "optimizer": {}, "epoch": 0, "step": 4}, folder / STATE_FILE)
    else:
        write_checkpoint(folder, {"model": {}}, {"epoch": 0, "step": 4, "fingerprint": fingerprint_json})
    return folder


def test_a_checkpoint_whose_pickle_runs_code_is_refused(tmp_path):
    from ray.train import Checkpoint

    from dashclip_core.training.ray_launcher import read_checkpoint as read_result_checkpoint

    marker = tmp_path / "code-ran"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"model": {"w": torch.zeros(2)}, "optimizer": _RunsCodeWhenUnpickled(marker)}, folder / STATE_FILE)
    (folder / META_FILE).write_text(json.dumps({"format": 2, "epoch": 0, "step": 1}))

    with pytest.raises(ValueError, match=rf"{STATE_FILE}: not a tensors-only checkpoint, refused"):
        read_result_checkpoint(SimpleNamespace(checkpoint=Checkpoint.from_directory(str(folder))))
    with pytest.raises(ValueError, match="refused"):
        read_checkpoint(folder)
    assert not marker.exists(), "loading the checkpoint ran the code in its pickle"


def test_a_real_training_state_round_trips_with_weights_only(tmp_path):
    """Model, AdamW and GradScaler states are tensors and plain containers: weights_only loads them."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    write_checkpoint(tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "precision": {"scaler": scaler.state_dict(), "skipped_total": 1}},
                     {"epoch": 3, "step": 40, "fingerprint": {"digest": "x"}})
    state, meta = read_checkpoint(tmp_path)
    assert meta["epoch"] == 3 and meta["step"] == 40
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    restored.load_state_dict(state["optimizer"])
    assert torch.equal(state["model"]["weight"], model.weight.detach())


def test_a_checkpoint_without_metadata_is_not_loaded(tmp_path):
    torch.save({"model": {}}, tmp_path / STATE_FILE)
    with pytest.raises(ValueError, match=rf"{META_FILE}: missing or not JSON"):
        read_checkpoint(tmp_path)


def test_same_inputs_resume_the_same_run(tmp_path, tiny_config):
    fp = _fingerprint(tiny_config)
    _fake_run(tmp_path, "stage1", fp.to_json())
    assert choose_run_name(tmp_path, "stage1", fp, "stage1") == "stage1"
    assert choose_run_name(tmp_path, "fresh", fp, "stage1") == "fresh"  # nothing to resume: the name as given


def test_fields_that_do_not_change_the_result_still_resume(tmp_path, tiny_config):
    _fake_run(tmp_path, "stage1", _fingerprint(tiny_config).to_json())
    same = _fingerprint(tiny_config, **{"train.num_workers": 2, "train.max_failures": 0, "train.torch_threads_per_worker": 2,
                                        "train.stage2_lr": 1.0, "ray.num_cpus": 8})
    assert choose_run_name(tmp_path, "stage1", same, "stage1") == "stage1"


@pytest.mark.parametrize(("changed", "named"), [
    ({"overrides": {"train.stage1_lr": 2e-4}}, "config train.stage1_lr: 0.0001 -> 0.0002"),
    ({"overrides": {"train.stage1_epochs": 4}}, "config train.stage1_epochs: 1 -> 4"),
    ({"overrides": {"model.embed_dim": 16}}, "config model.embed_dim: 32 -> 16"),
    ({"data": "d2"}, "data pairs: sha256 d1 -> d2"),
])
def test_changed_config_or_data_starts_fresh_under_a_new_name(tmp_path, tiny_config, caplog, changed, named):
    old = _fake_run(tmp_path, "stage1", _fingerprint(tiny_config).to_json())
    new = _fingerprint(tiny_config, changed.get("data", "d1"), **changed.get("overrides", {}))
    with caplog.at_level(logging.WARNING, logger="dashclip_core.training.checkpoints"):
        name = choose_run_name(tmp_path, "stage1", new, "stage1")
    assert name == f"stage1-{new.digest[:12]}"
    assert named in caplog.text and "training from scratch" in caplog.text
    assert (old / STATE_FILE).exists()  # the old checkpoints are kept
    # A retry of the changed run resumes its own checkpoints under the new name.
    _fake_run(tmp_path, name, new.to_json())
    assert choose_run_name(tmp_path, "stage1", new, "stage1") == name


def test_a_checkpoint_without_a_fingerprint_is_not_resumed(tmp_path, tiny_config, caplog):
    _fake_run(tmp_path, "stage1", None)  # HEAD's format: one pickled checkpoint.pt, no sidecar
    fp = _fingerprint(tiny_config)
    with caplog.at_level(logging.WARNING):
        assert choose_run_name(tmp_path, "stage1", fp, "stage1") == f"stage1-{fp.digest[:12]}"
    assert "no fingerprint recorded" in caplog.text


def test_a_new_name_whose_checkpoints_also_differ_fails_clearly(tmp_path, tiny_config):
    fp = _fingerprint(tiny_config)
    _fake_run(tmp_path, "stage1", None)
    _fake_run(tmp_path, f"stage1-{fp.digest[:12]}", _fingerprint(tiny_config, "other").to_json())
    with pytest.raises(RuntimeError, match="do not match this run's inputs either"):
        choose_run_name(tmp_path, "stage1", fp, "stage1")


def _metas(run_dir: Path) -> list[dict]:
    return [json.loads((f / META_FILE).read_text()) for f in checkpoint_folders(run_dir)]


@pytest.mark.slow
def test_stage2_resumes_only_from_checkpoints_of_the_same_inputs(tmp_path, tiny_config, stage2_data, photo_roots, caplog):
    from dashclip_core.models.encoders import save_encoder
    from dashclip_core.training.stage1 import build_stage1
    from dashclip_core.training.stage2 import train_stage2

    # Plain (non-GradCache) stage 2, one worker: the other tests run the cached path.
    products, labels = stage2_data
    cfg = PipelineConfig.from_file(tiny_config).with_overrides(**{"train.stage2_grad_cache_chunk": 0, "train.stage2_epochs": 2,
                                                                   **photo_roots(products)})
    stage1 = save_encoder(build_stage1(cfg).encoder, cfg.model, tmp_path / "stage1")
    mlflow_run = {"tracking_uri": cfg.tracking_uri(), "run_id": ""}
    storage = tmp_path / "ray"

    def fit(config, graded, out):
        (tmp_path / out).mkdir()
        return train_stage2(config, products, graded, stage1, tmp_path / out, storage, "stage2", mlflow_run)

    first = fit(cfg, labels, "out1")
    assert first["final_epoch"] == 1
    kept = _metas(storage / "stage2")
    assert [m["epoch"] for m in kept] == [0, 1] and kept[0]["resumed_from_epoch"] is None

    # The same inputs again (a retry after the fit finished): it continues from the epoch-1 checkpoint, so no
    # epoch is trained again and the final metrics are those of that checkpoint.
    again = fit(cfg, labels, "out2")
    assert (again["final_epoch"], again["final_step"], again["final_loss_qcc"]) == (first["final_epoch"], first["final_step"], first["final_loss_qcc"])
    assert _metas(storage / "stage2") == kept
    assert sorted(p.name for p in storage.iterdir() if p.is_dir()) == ["stage2"]

    # A changed config does not resume those checkpoints: it trains from epoch 0 under its own run name.
    changed = cfg.with_overrides(**{"train.stage2_lr": 1e-4})
    with caplog.at_level(logging.WARNING, logger="dashclip_core.training.checkpoints"):
        fresh = fit(changed, labels, "out3")
    assert "config train.stage2_lr: 5e-05 -> 0.0001" in caplog.text
    runs = {p.name for p in storage.iterdir() if p.is_dir()} - {"stage2"}
    assert len(runs) == 1
    metas = _metas(storage / runs.pop())
    assert [m["epoch"] for m in metas] == [0, 1] and metas[0]["resumed_from_epoch"] is None
    assert fresh["final_step"] == first["final_step"]
    assert _metas(storage / "stage2") == kept  # the old checkpoints are untouched

    # Changed data (one relevant label fewer) does not resume them either.
    caplog.clear()
    relevant = labels.index[(labels["label"] >= 1) & (labels["split"] == "train")]
    with caplog.at_level(logging.WARNING, logger="dashclip_core.training.checkpoints"):
        fit(cfg, labels.drop(index=relevant[:1]), "out4")
    assert "data examples: sha256" in caplog.text
    assert len({p.name for p in storage.iterdir() if p.is_dir()}) == 3


def test_only_the_checkpoint_ray_registered_decides(tmp_path, tiny_config):
    """A folder a killed worker wrote but Ray never registered (not in the run snapshot) is not what Ray resumes."""
    from dashclip_core.training.checkpoints import RAY_SNAPSHOT, resumable_checkpoint

    fp = _fingerprint(tiny_config)
    registered = _fake_run(tmp_path, "stage1", fp.to_json())
    orphan = tmp_path / "stage1" / "checkpoint_2026-01-01_00-00-09.000000"
    orphan.mkdir()
    (orphan / STATE_FILE).write_bytes(b"half-written")
    (tmp_path / "stage1" / RAY_SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": registered.name}}))
    assert resumable_checkpoint(tmp_path / "stage1") == registered
    assert choose_run_name(tmp_path, "stage1", fp, "stage1") == "stage1"
