"""The served model never opens a file a caller names unless the serving operator allowed its folder."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def encoder_dirs(tiny_config, tmp_path_factory) -> dict:
    from dashclip_core.config import PipelineConfig
    from dashclip_core.layout import PRODUCT_ENCODER, QUERY_ENCODER
    from dashclip_core.models.encoders import QueryEncoder, save_encoder
    from dashclip_core.training.stage1 import build_stage1

    cfg = PipelineConfig.from_file(tiny_config)
    root = tmp_path_factory.mktemp("pyfunc-images")
    encoder = build_stage1(cfg).encoder.eval()
    return {PRODUCT_ENCODER: str(save_encoder(encoder, cfg.model, root / PRODUCT_ENCODER)),
            QUERY_ENCODER: str(save_encoder(QueryEncoder.from_product_encoder(encoder, 0), cfg.model, root / QUERY_ENCODER))}


def served(encoder_dirs, model_config=None):
    from dashclip_core.registry.pyfunc_model import DashclipEncoders

    model = DashclipEncoders()
    model.load_context(SimpleNamespace(artifacts=encoder_dirs, model_config=model_config))
    return model


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photos" / "p1.png"
    path.parent.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_local_paths_are_refused_without_serving_roots(encoder_dirs, photo, monkeypatch):
    monkeypatch.delenv("DASHCLIP_SERVING_IMAGE_ROOTS", raising=False)
    model = served(encoder_dirs)
    rows = pd.DataFrame({"product_id": ["ok", "p1", "p2"], "title": ["Oat milk", None, None],
                         "image_path": [None, str(photo), "/etc/passwd"]})
    with pytest.raises(ValueError) as info:
        model.predict(None, rows)
    message = str(info.value)
    assert "2 product row(s) refused" in message
    assert f"product 'p1' (row 1): field image_path '{photo}' refused (image_outside_roots)" in message
    assert "product 'p2' (row 2): field image_path '/etc/passwd' refused (image_outside_roots)" in message
    assert "DASHCLIP_SERVING_IMAGE_ROOTS" in message and "image_b64" in message
    with pytest.raises(ValueError, match="image_outside_roots"):
        model.predict(None, pd.DataFrame({"product_id": ["s3"], "image_path": ["s3://any-bucket/x.png"]}))


def test_inline_bytes_work_and_match_an_allowed_path(encoder_dirs, photo, monkeypatch):
    monkeypatch.setenv("DASHCLIP_SERVING_IMAGE_ROOTS", str(photo.parent))
    model = served(encoder_dirs)
    by_path = model.predict(None, pd.DataFrame({"product_id": ["p1"], "image_path": [str(photo)]}))
    monkeypatch.delenv("DASHCLIP_SERVING_IMAGE_ROOTS")
    by_bytes = served(encoder_dirs).predict(None, pd.DataFrame({"product_id": ["p1"],
                                                                 "image_b64": [base64.b64encode(photo.read_bytes()).decode()]}))
    np.testing.assert_allclose(np.asarray(by_path["embedding"][0]), np.asarray(by_bytes["embedding"][0]), atol=1e-6)


def test_model_config_roots_and_caps(encoder_dirs, photo, tmp_path, monkeypatch):
    monkeypatch.delenv("DASHCLIP_SERVING_IMAGE_ROOTS", raising=False)
    model = served(encoder_dirs, {"image_roots": [str(photo.parent)], "max_image_pixels": 100})
    with pytest.raises(ValueError, match=r"product 'p1' \(row 0\).*image_too_many_pixels.*40x40"):
        model.predict(None, pd.DataFrame({"product_id": ["p1"], "image_path": [str(photo)]}))
    small = served(encoder_dirs, {"max_image_bytes": 50})
    with pytest.raises(ValueError, match=r"product 'p1' \(row 0\): field image_b64 is not base64 text of at most 50 bytes"):
        small.predict(None, pd.DataFrame({"product_id": ["p1"], "image_b64": [base64.b64encode(photo.read_bytes()).decode()]}))
    with pytest.raises(ValueError, match="not valid base64"):
        small.predict(None, pd.DataFrame({"product_id": ["p1"], "image_b64": ["***"]}))
    with pytest.raises(ValueError, match=r"image_unreadable"):
        served(encoder_dirs).predict(None, pd.DataFrame({"product_id": ["p1"], "image_b64": [base64.b64encode(b"junk" * 9).decode()]}))


def test_dev_zero_and_fifo_under_an_allowed_root_do_not_hang(encoder_dirs, tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "pipe.png")
    monkeypatch.setenv("DASHCLIP_SERVING_IMAGE_ROOTS", f"/dev{os.pathsep}{tmp_path}")
    model = served(encoder_dirs)
    start = time.monotonic()
    for path in ("/dev/zero", str(tmp_path / "pipe.png")):
        with pytest.raises(ValueError, match=r"product 'x' \(row 0\).*image_not_a_file"):
            model.predict(None, pd.DataFrame({"product_id": ["x"], "image_path": [path]}))
    assert time.monotonic() - start < 10


def test_signature_declares_image_b64():
    from dashclip_core.registry.mlflow_registry import _signature

    assert "image_b64" in _signature().inputs.input_names()


def test_pipeline_scoring_sends_photos_inline(encoder_dirs, photo, monkeypatch):
    """The champion re-scoring reads the gate-checked photos itself and sends bytes: no serving roots needed."""
    from dashclip_core.evaluation.pyfunc_scoring import predict_products

    monkeypatch.delenv("DASHCLIP_SERVING_IMAGE_ROOTS", raising=False)
    model = served(encoder_dirs)
    pyfunc = SimpleNamespace(predict=lambda df: model.predict(None, df))
    products = pd.DataFrame({"product_id": ["p1", "t1"], "title": [None, "Kiwi"], "description": [None, None],
                             "image_uri": [str(photo), None]})
    out = predict_products(pyfunc, products)
    assert out["product_id"].tolist() == ["p1", "t1"]
    monkeypatch.setenv("DASHCLIP_SERVING_IMAGE_ROOTS", str(photo.parent))
    by_path = served(encoder_dirs).predict(None, pd.DataFrame({"product_id": ["p1"], "image_path": [str(photo)]}))
    np.testing.assert_allclose(np.asarray(out["embedding"][0]), np.asarray(by_path["embedding"][0]), atol=1e-6)


def test_logged_model_refuses_paths_until_the_loader_allows_a_root(encoder_dirs, photo, tiny_config, tmp_path, monkeypatch):
    """Through MLflow itself: the logged model_config has no roots; a load-time model_config adds one."""
    import dataclasses

    import mlflow

    from dashclip_core.config import PipelineConfig
    from dashclip_core.layout import PRODUCT_ENCODER, QUERY_ENCODER
    from dashclip_core.registry.mlflow_registry import _log_pyfunc, pipeline_run

    monkeypatch.delenv("DASHCLIP_SERVING_IMAGE_ROOTS", raising=False)
    base = PipelineConfig.from_file(tiny_config)
    cfg = dataclasses.replace(base, registry=dataclasses.replace(
        base.registry, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=(tmp_path / "artifacts").as_uri()))
    model_id = _log_pyfunc(cfg, pipeline_run(cfg, "images-test", "dag"), "images-test",
                           Path(encoder_dirs[PRODUCT_ENCODER]), Path(encoder_dirs[QUERY_ENCODER]))
    rows = pd.DataFrame({"product_id": ["p1"], "image_path": [str(photo)]})
    with pytest.raises(ValueError, match="image_outside_roots"):
        mlflow.pyfunc.load_model(f"models:/{model_id}").predict(rows)
    allowed = mlflow.pyfunc.load_model(f"models:/{model_id}", model_config={"image_roots": [str(photo.parent)]})
    assert len(allowed.predict(rows)["embedding"][0]) == cfg.model.embed_dim
