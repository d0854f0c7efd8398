"""train.amp and the non-finite guard inside the real Ray Train loop (stage 2, one CPU worker)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stage2_inputs(tmp_path_factory, tiny_config, stage2_data, photo_roots):
    from dashclip_core.config import PipelineConfig
    from dashclip_core.training.stage1 import build_stage1

    products, labels = stage2_data
    cfg = PipelineConfig.from_file(tiny_config).with_overrides(**{"train.stage2_grad_cache_chunk": 0, "train.num_workers": 1,
                                                                   **photo_roots(products)})
    return cfg, products, labels, build_stage1(cfg).encoder, tmp_path_factory.mktemp("amp")


def _train(cfg, products, labels, encoder, tmp, name):
    from dashclip_core.models.encoders import save_encoder
    from dashclip_core.training.stage2 import train_stage2

    stage1 = save_encoder(encoder, cfg.model, tmp / f"{name}-stage1")
    out = tmp / f"{name}-out"
    out.mkdir()
    return train_stage2(cfg, products, labels, stage1, out, tmp / "ray", name, {"tracking_uri": cfg.tracking_uri(), "run_id": ""}), out


def test_bf16_autocast_trains_stage2_on_cpu(stage2_inputs):
    from dashclip_core.models.encoders import load_query_encoder

    cfg, products, labels, encoder, tmp = stage2_inputs
    info, out = _train(cfg.with_overrides(**{"train.amp": "bf16"}), products, labels, encoder, tmp, "bf16")
    assert info["precision"] == "bf16"
    assert info["final_skipped_steps_total"] == 0 and info["final_skipped_step"] == 0.0
    assert torch.isfinite(torch.tensor(info["final_loss_qcc"])) and info["final_step"] > 0
    # the saved encoder is full precision and finite (autocast changes compute, not the weights)
    weights = list(load_query_encoder(out / "query_encoder").parameters())
    assert all(p.dtype is torch.float32 and torch.isfinite(p).all() for p in weights)


def test_a_run_whose_every_step_is_non_finite_fails_with_a_clear_message(stage2_inputs):
    import copy

    cfg, products, labels, encoder, tmp = stage2_inputs
    # Given a corrupt stage-1 encoder: every product photo embeds to NaN, so every stage-2 batch's loss is NaN
    encoder = copy.deepcopy(encoder)
    with torch.no_grad():
        encoder.image_proj.weight.fill_(float("nan"))
    # Then stage 2 skips those steps and, after max_nonfinite_steps of them in a row, stops the run
    with pytest.raises(Exception, match=r"stage2: 3 training steps in a row had a non-finite loss or gradient"):
        _train(cfg.with_overrides(**{"train.max_nonfinite_steps": 2}), products, labels, encoder, tmp, "nan")


def test_fp16_with_gradcache_is_refused_before_training(stage2_inputs):
    cfg, products, labels, encoder, tmp = stage2_inputs
    cfg = cfg.with_overrides(**{"train.amp": "fp16", "train.stage2_grad_cache_chunk": 16})
    with pytest.raises(ValueError, match="fp16 needs loss scaling, which the GradCache path"):
        _train(cfg, products, labels, encoder, tmp, "fp16-gc")
