"""Held-out photo metrics: zero-shot by hand on toy embeddings, and one computation for the report and the pyfunc."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from dashclip_core.evaluation.photos import PHOTO_METRIC_PREFIXES, PREDICTION_COLUMNS, class_prompt, photo_metrics


def test_photo_metrics_assigns_the_nearest_class_name() -> None:
    # Given three photos and a text encoder that puts each class prompt on its own axis
    catalog = pd.DataFrame({
        "product_id": ["a", "b", "c", "d"],
        "category": ["Granny-Smith", "gala", "oat_milk", "gala"],
        "aisle": ["fruit", "fruit", "dairy", "fruit"],
    })
    photos = catalog.iloc[:3]
    axis = {"gala": 0, "granny smith": 1, "oat milk": 2, "dairy": 2, "fruit": 1}

    def embed_text(texts: list[str]) -> np.ndarray:
        assert texts in (["granny smith", "gala", "oat milk"], ["dairy", "fruit"])  # class names in sorted order, as typed
        return np.eye(3)[[axis[t] for t in texts]]

    image_emb = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.1, 0.9]])  # a -> granny smith, b -> oat milk (wrong), c -> oat milk

    # When the photos are scored
    predictions, metrics = photo_metrics(image_emb, embed_text, photos, catalog, ks=(10,))

    # Then each photo gets the class whose name is nearest, at both levels
    assert list(predictions.columns) == PREDICTION_COLUMNS
    assert predictions["fine_pred"].tolist() == ["Granny-Smith", "oat_milk", "oat_milk"]
    assert predictions["coarse_pred"].tolist() == ["fruit", "dairy", "dairy"]
    assert metrics["zero_shot_fine_top1"] == pytest.approx(2 / 3) and metrics["zero_shot_coarse_top1"] == pytest.approx(2 / 3)
    assert (metrics["zero_shot_n_photos"], metrics["zero_shot_fine_classes"], metrics["zero_shot_coarse_classes"]) == (3, 3, 2)
    assert metrics["t2i_n_queries"] == 3  # every fine class has a photo of its own
    assert class_prompt(" Golden-Delicious_x ") == "golden delicious x"
    assert photo_metrics(image_emb[:0], embed_text, photos.iloc[:0], catalog, ks=(10,))[1] == {}


def test_pyfunc_photo_metrics_equal_the_reports(tiny_run) -> None:
    # Given the report of the tiny run and the same encoders behind the registered model's pyfunc class
    from dashclip_core.evaluation.pyfunc_scoring import photo_metrics_via_pyfunc
    from dashclip_core.evaluation.report import run_evaluation
    from dashclip_core.models.encoders import load_product_encoder
    from dashclip_core.models.inputs import InputBuilder, embed_products
    from dashclip_core.registry.pyfunc_model import DashclipEncoders

    products = tiny_run.products
    emb = embed_products(load_product_encoder(tiny_run.product_dir), InputBuilder(tiny_run.cfg.model), products)
    report = run_evaluation(tiny_run.cfg, products, tiny_run.labels, products["product_id"].tolist(), emb,
                            tiny_run.query_dir, tiny_run.product_dir, rerank_k=1).report
    encoders = DashclipEncoders()
    encoders.load_context(SimpleNamespace(artifacts={"product_encoder": str(tiny_run.product_dir), "query_encoder": str(tiny_run.query_dir)}))
    pyfunc = SimpleNamespace(predict=lambda df: encoders.predict(None, df))

    # When the pyfunc is scored on the held-out photos
    via_pyfunc = photo_metrics_via_pyfunc(pyfunc, tiny_run.cfg, products)

    # Then it finds the report's zero-shot and text -> image figures, key for key
    in_report = {k: v for k, v in report["systems"]["dashclip"].items() if k.startswith(PHOTO_METRIC_PREFIXES)}
    assert "zero_shot_fine_top1" in in_report and "t2i_ndcg@10" in in_report
    assert via_pyfunc == pytest.approx(in_report, abs=1e-6)


def test_held_out_photos_read_in_chunks_score_as_the_whole_catalog(tmp_path) -> None:
    """register_model scores the champion's photo metrics from the clean parts read in chunks: the photos and the
    class table it keeps give the same metrics as the whole catalog frame."""
    from dashclip_core.config import PipelineConfig
    from dashclip_core.evaluation.photos import held_out_photos, zero_shot_products
    from dashclip_core.storage.partitions import PartWriter

    rng = np.random.default_rng(0)
    fine = {"gala": "apple", "fuji": "apple", "oat-milk": "milk", "soy-milk": "milk", "kiwi": "kiwi"}
    rows = [(f"g-{'val' if i % 3 == 0 else 'train'}-{i}", c, fine[c], f"/p/{i}.jpg" if i % 7 else None)
            for i, c in enumerate(rng.choice(sorted(fine), 60))]
    catalog = pd.DataFrame(rows, columns=["product_id", "category", "aisle", "image_uri"])
    with PartWriter(tmp_path / "clean.parquet") as writer:
        for start in range(0, len(catalog), 8):
            writer.write(catalog.iloc[start:start + 8])
    cfg = PipelineConfig().with_overrides(**{"catalog.chunk_rows": 5, "train.holdout_product_regex": "^g-val-"})

    photos, classes = held_out_photos(tmp_path / "clean.parquet", cfg)

    expected = zero_shot_products(catalog, cfg).reset_index(drop=True)
    assert photos["product_id"].tolist() == expected["product_id"].tolist() and len(photos) > 5
    assert len(classes) == len(fine)
    emb = rng.standard_normal((len(photos), 4))
    vocab = {}

    def embed_text(texts):
        return np.stack([np.random.default_rng(vocab.setdefault(t, len(vocab))).standard_normal(4) for t in texts])

    assert photo_metrics(emb, embed_text, photos, classes, (10,))[1] == photo_metrics(emb, embed_text, expected, catalog, (10,))[1]
