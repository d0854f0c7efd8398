"""A training run re-created with the same Ray storage path and name resumes from its last checkpoint."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_stage2_resumes_from_latest_checkpoint(tmp_path, tiny_config, stage2_data):
    from dashclip_core.config import PipelineConfig
    from dashclip_core.models.encoders import save_encoder
    from dashclip_core.training.stage1 import build_stage1
    from dashclip_core.training.stage2 import train_stage2

    # Plain (non-GradCache) stage 2, one worker: the other tests run the cached path.
    cfg = PipelineConfig.from_file(tiny_config).with_overrides(**{"train.stage2_grad_cache_chunk": 0, "train.stage2_epochs": 1})
    products, labels = stage2_data
    stage1 = save_encoder(build_stage1(cfg).encoder, cfg.model, tmp_path / "stage1")
    mlflow_run = {"tracking_uri": cfg.tracking_uri(), "run_id": ""}
    storage = tmp_path / "ray"

    (tmp_path / "out1").mkdir()
    first = train_stage2(cfg, products, labels, stage1, tmp_path / "out1", storage, "stage2", mlflow_run)
    steps_per_epoch = first["final_step"]
    assert first["final_epoch"] == 0 and steps_per_epoch > 0

    # A retry of the same run asking for two epochs continues after epoch 0 instead of starting over.
    (tmp_path / "out2").mkdir()
    second = train_stage2(cfg.with_overrides(**{"train.stage2_epochs": 2}), products, labels, stage1, tmp_path / "out2",
                          storage, "stage2", mlflow_run)
    assert second["final_epoch"] == 1
    assert second["final_step"] == 2 * steps_per_epoch
