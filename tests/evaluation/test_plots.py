"""Evaluation plots: worst-class selection and confusion counts by hand; every plot a valid, non-empty PNG."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dashclip_core.evaluation.plots import (
    OTHER,
    class_recall,
    confusion_block,
    plot_confusion_worst,
    plot_query_results,
    plot_training_curves,
    training_curve_histories,
    worst_classes,
)

# Recall: apple 1/3, bread 2/2, cheese 3/4, dates 0/1, eggs 0/3.
TRUE = ["apple"] * 3 + ["bread"] * 2 + ["cheese"] * 4 + ["dates"] + ["eggs"] * 3
PRED = ["apple", "bread", "bread", "bread", "bread", "apple", "cheese", "cheese", "cheese", "apple", "figs", "figs", "bread"]


def assert_png(path: Path, min_side: int = 200) -> None:
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert min(im.size) >= min_side, im.size
        im.verify()


def test_worst_classes_lowest_recall_first_ties_by_more_photos() -> None:
    recall = class_recall(TRUE, PRED)
    assert recall.loc["apple", ["n", "correct"]].tolist() == [3, 1] and recall.at["cheese", "recall"] == 0.75
    # eggs (0/3) and dates (0/1) tie at 0: more photos first; then apple 1/3, cheese 3/4, bread 1.
    assert worst_classes(TRUE, PRED, n=5) == ["eggs", "dates", "apple", "cheese", "bread"]
    assert worst_classes(TRUE, PRED, n=2) == ["eggs", "dates"]
    with pytest.raises(ValueError, match="13 true labels but 12 predictions"):
        class_recall(TRUE, PRED[:-1])


def test_confusion_block_counts_and_caps_columns_into_other() -> None:
    rows = ["eggs", "dates", "apple"]
    columns, counts = confusion_block(TRUE, PRED, rows, max_cols=10)
    # Row classes first, then what they are confused with by frequency (bread 3, figs 2).
    assert columns == ["eggs", "dates", "apple", "bread", "figs"]
    assert counts.tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 0, 0], [0, 0, 1, 2, 0]]

    capped, capped_counts = confusion_block(TRUE, PRED, rows, max_cols=4)
    assert capped == ["eggs", "dates", "apple", "bread", OTHER]
    assert capped_counts[:, -1].tolist() == [2, 0, 0]  # eggs -> figs, cut
    assert capped_counts.sum(axis=1).tolist() == [3, 1, 3]  # every row still sums to its photos
    with pytest.raises(ValueError, match="max_cols=2 cannot hold the 3 row classes"):
        confusion_block(TRUE, PRED, rows, max_cols=2)


def test_confusion_plot_is_a_png(tmp_path) -> None:
    path = plot_confusion_worst(TRUE, PRED, tmp_path / "cm.png", n=3)
    assert path == tmp_path / "cm.png"
    assert_png(path)
    with pytest.raises(ValueError, match="no predictions"):
        plot_confusion_worst([], [], tmp_path / "empty.png")


def test_query_grid_shows_photos_text_tiles_and_unreadable_images(tiny_run, tmp_path) -> None:
    products = tiny_run.products
    photo = products.loc[products["image_uri"].notna(), "product_id"].tolist()[:3]
    text_only = products.loc[products["image_uri"].isna(), "product_id"].tolist()[:1]
    broken = pd.DataFrame({"product_id": ["broken"], "title": ["Broken photo"], "description": [None],
                           "image_uri": [str(tmp_path / "missing.png")]})
    catalog = pd.concat([products, broken], ignore_index=True)
    rankings = {"red apples": photo + text_only + ["broken"], "oat milk": text_only + photo[:1]}
    judgments = pd.DataFrame({"query": ["red apples", "red apples"], "product_id": [photo[0], photo[1]], "label": [2, 0]})

    path = plot_query_results(rankings, catalog, judgments, tmp_path / "grid.png")

    assert_png(path)
    with Image.open(path) as im:
        assert im.size[0] > im.size[1]  # 5 columns, 2 rows
    with pytest.raises(ValueError, match="no ranking for"):
        plot_query_results(rankings, catalog, judgments, tmp_path / "x.png", queries=["unknown"])


@pytest.fixture()
def mlflow_run(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("curves", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric("stage1/loss_itc", 2.0 - 0.1 * s, now, s) for s in range(1, 7)]
    metrics += [Metric("stage1/itm_accuracy", 0.5 + 0.05 * s, now, s) for s in range(1, 7)]
    metrics += [Metric("stage2/loss_qcc", 1.5 - 0.1 * s, now, s) for s in range(1, 5)]
    metrics += [Metric("stage1/epoch_loss_itc", 1.7, now, 0), Metric("stage1/epoch_loss_itc", 1.5, now, 1)]  # epoch means
    metrics += [Metric("stage1/n_pairs", 64, now, 0), Metric("teacher/accuracy", 0.8, now, 0)]  # summaries, other prefixes
    client.log_batch(run_id, metrics=metrics)
    return uri, run_id, client, exp


def test_training_curves_pick_per_step_stage_metrics(mlflow_run, tmp_path) -> None:
    uri, run_id, client, exp = mlflow_run

    histories = training_curve_histories(uri, run_id)

    assert list(histories) == ["stage1/itm_accuracy", "stage1/loss_itc", "stage2/loss_qcc"]
    assert [s for s, _ in histories["stage1/loss_itc"]] == list(range(1, 7))
    assert histories["stage2/loss_qcc"][0] == (1, pytest.approx(1.4))
    path = plot_training_curves(uri, run_id, tmp_path / "curves.png")
    assert_png(path)

    empty = client.create_run(exp).info.run_id
    with pytest.raises(ValueError, match=f"MLflow run {empty} .* no per-step metric"):
        plot_training_curves(uri, empty, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_png_pixels_are_not_blank(tmp_path) -> None:
    path = plot_confusion_worst(TRUE, PRED, tmp_path / "cm.png", n=4)
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 5  # something was drawn, not a white canvas
