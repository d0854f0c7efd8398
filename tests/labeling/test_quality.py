"""Teacher quality metrics (hand-computed cases, cross-checked with scikit-learn), the gate, the report files, and
evaluate_teacher through the Labeler interface."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dashclip_core.config import LabelingConfig
from dashclip_core.labeling.base import Labeler, LabelRequest, LabelResult
from dashclip_core.labeling.errors import LabelingError, QualityGateError
from dashclip_core.labeling.quality import (
    check_quality,
    evaluate_teacher,
    gate_thresholds,
    pairs_with_product_text,
    teacher_quality,
    write_quality_report,
)
from dashclip_core.layout import Labels


def _from_confusion(cm: list[list[int]]) -> tuple[list[int], list[int]]:
    """Aligned (y_true, y_pred) arrays realising a confusion matrix (rows = true)."""
    y_true, y_pred = [], []
    for t, row in enumerate(cm):
        for p, count in enumerate(row):
            y_true += [t] * count
            y_pred += [p] * count
    return y_true, y_pred


def test_hand_computed_3x3_case():
    # Given rows (true) [[4,1,0],[2,2,1],[0,1,3]]: n=14, supports (5,5,4), predicted counts (6,4,4)
    cm = [[4, 1, 0], [2, 2, 1], [0, 1, 3]]
    report = teacher_quality(*_from_confusion(cm))
    assert report["confusion"] == cm and report["n"] == 14 and report["n_invalid"] == 0
    assert report["accuracy"] == pytest.approx(9 / 14)
    # precision (4/6, 2/4, 3/4), recall (4/5, 2/5, 3/4) -> F1 = 2PR/(P+R) = (8/11, 4/9, 3/4)
    f1 = [report["per_class"][k]["f1"] for k in ("0", "1", "2")]
    assert f1 == pytest.approx([8 / 11, 4 / 9, 3 / 4])
    assert report["per_class"]["0"]["precision"] == pytest.approx(2 / 3)
    assert report["per_class"]["1"]["recall"] == pytest.approx(2 / 5)
    assert [report["per_class"][k]["support"] for k in ("0", "1", "2")] == [5, 5, 4]
    assert report["macro_f1"] == pytest.approx((8 / 11 + 4 / 9 + 3 / 4) / 3)
    # p_o = 9/14 = 63/98, p_e = (5*6 + 5*4 + 4*4) / 14^2 = 33/98 -> kappa = 30/65 = 6/13
    assert report["kappa"] == pytest.approx(6 / 13)


def test_kappa_is_one_when_perfect_and_zero_at_chance():
    perfect = teacher_quality([0, 1, 2, 2, 1, 0, 2], [0, 1, 2, 2, 1, 0, 2])
    assert perfect["kappa"] == pytest.approx(1.0) and perfect["accuracy"] == 1.0 and perfect["macro_f1"] == 1.0
    # Every true class is predicted 0/1/2 equally often: the teacher carries no information -> p_o = p_e = 1/3
    chance = teacher_quality(*_from_confusion([[3, 3, 3], [3, 3, 3], [3, 3, 3]]))
    assert chance["kappa"] == pytest.approx(0.0, abs=1e-12) and chance["accuracy"] == pytest.approx(1 / 3)
    # Always answering the majority class: accuracy = the majority rate, kappa = 0
    always0 = teacher_quality([0, 0, 0, 1, 2], [0, 0, 0, 0, 0])
    assert always0["accuracy"] == pytest.approx(0.6) and always0["kappa"] == pytest.approx(0.0)


def test_failed_predictions_count_as_wrong():
    # y_pred None = failed: table columns (0, 1, 2, failed) have counts (1, 1, 1, 1); supports (1, 1, 2)
    # p_o = 3/4, p_e = (1*1 + 1*1 + 2*1) / 16 = 1/4 -> kappa = (3/4 - 1/4) / (3/4) = 2/3
    report = teacher_quality([0, 1, 2, 2], [0, 1, None, 2])
    assert report["n_invalid"] == 1 and report["accuracy"] == pytest.approx(0.75)
    assert report["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert report["per_class"]["2"]["recall"] == pytest.approx(0.5) and report["per_class"]["2"]["precision"] == 1.0
    assert report["kappa"] == pytest.approx(2 / 3)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="y_true has 2 labels but y_pred has 1"):
        teacher_quality([0, 1], [0])
    with pytest.raises(ValueError, match=r"outside \[0, 1, 2\], e.g. index 1: 3"):
        teacher_quality([0, 3], [0, 1])


def test_hand_computed_two_class_kappa_and_confusion():
    # p_o = 3/4; marginals true (2, 2), pred (1, 3): p_e = (2*1 + 2*3) / 16 = 1/2; kappa = (3/4 - 1/2) / (1/2) = 1/2
    assert teacher_quality([0, 0, 1, 1], [0, 1, 1, 1], labels=(0, 1))["kappa"] == pytest.approx(0.5)
    assert teacher_quality([0, 1, 2], [0, 1, 2])["kappa"] == pytest.approx(1.0)
    assert teacher_quality([2, 2, 0], [2, 1, 0])["confusion"] == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=1, max_size=60))
def test_matches_scikit_learn(pairs):
    from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score

    y_true, y_pred = (np.array(v) for v in zip(*pairs))
    report = teacher_quality(y_true, y_pred)
    assert report["confusion"] == confusion_matrix(y_true, y_pred, labels=[0, 1, 2]).tolist()
    assert report["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert report["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=0))
    expected = cohen_kappa_score(y_true, y_pred, labels=[0, 1, 2])
    if np.isfinite(expected):  # scikit-learn returns nan where both raters use a single class; we return 1.0
        assert report["kappa"] == pytest.approx(expected)


def test_check_quality_names_each_failed_threshold():
    report = teacher_quality(*_from_confusion([[4, 1, 0], [2, 2, 1], [0, 1, 3]]))  # acc 0.643, kappa 0.462
    assert check_quality(report, min_accuracy=0.6, min_kappa=0.4, min_macro_f1=0.6) is report
    with pytest.raises(QualityGateError) as err:
        check_quality(report, min_accuracy=0.6, min_kappa=0.5, min_macro_f1=0.6)
    assert err.value.failures == ["kappa 0.462 < min_kappa 0.5"]
    assert "on 14 held-out pairs" in str(err.value) and "accuracy" not in str(err.value)
    with pytest.raises(QualityGateError) as err:
        check_quality(report, min_accuracy=0.7, min_kappa=0.4, min_macro_f1=0.65)
    assert err.value.failures == ["accuracy 0.643 < min_accuracy 0.7", "macro_f1 0.641 < min_macro_f1 0.65"]
    with pytest.raises(QualityGateError, match="kappa nan < min_kappa 0.1"):
        check_quality(teacher_quality([], []), min_kappa=0.1)


def test_gate_thresholds_come_from_the_config_and_a_zero_macro_f1_is_not_checked():
    cfg = LabelingConfig(min_teacher_accuracy=0.7, min_teacher_kappa=0.5)
    assert gate_thresholds(cfg) == {"min_accuracy": 0.7, "min_kappa": 0.5, "min_macro_f1": None}
    assert gate_thresholds(LabelingConfig(min_teacher_macro_f1=0.3))["min_macro_f1"] == 0.3
    report = teacher_quality(*_from_confusion([[4, 1, 0], [2, 2, 1], [0, 1, 3]]))  # macro-F1 0.641
    with pytest.raises(LabelingError):  # the gate's error is one of the labelling step's typed stops
        check_quality(report, **gate_thresholds(LabelingConfig(min_teacher_macro_f1=0.7)))


def test_write_quality_report_writes_json_and_a_valid_png(tmp_path):
    report = teacher_quality(*_from_confusion([[4, 1, 0], [2, 2, 1], [0, 1, 3]]))
    paths = write_quality_report(report, tmp_path / "quality")
    folder = Labels(tmp_path / "quality")  # the step folder's file names: one place knows them
    assert (paths["json"], paths["confusion_png"]) == (folder.teacher_quality, folder.teacher_confusion_png)
    assert json.loads(paths["json"].read_text()) == report
    with Image.open(paths["confusion_png"]) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
        im.verify()
    with Image.open(paths["confusion_png"]) as im:  # not a blank canvas: the heat map has several colours
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 10


class _Scripted:
    """A real Labeler that answers from a dict (answers missing from it fail); results come back reversed."""

    def __init__(self, answers: dict[tuple[str, str], int], labeler_id: str = "scripted:v1") -> None:
        self.answers = answers
        self.labeler_id = labeler_id

    def label(self, requests: Iterable[LabelRequest]) -> Iterator[LabelResult]:
        out = []
        for r in requests:
            g = self.answers.get((r.query, r.product_id))
            out.append(LabelResult(r.query, r.product_id, g, "ok" if g is not None else "failed", self.labeler_id,
                                   reason=None if g is not None else "no answer"))
        return iter(out[::-1])


class _AlwaysZero:
    labeler_id = "always-zero:v1"

    def label(self, requests: Iterable[LabelRequest]) -> Iterator[LabelResult]:
        for r in requests:
            yield LabelResult(r.query, r.product_id, 0, "ok", self.labeler_id)


def _held_out() -> pd.DataFrame:
    return pd.DataFrame({
        "query": ["milk", "milk", "milk", "bread", "bread", "bread"],
        "product_id": ["p1", "p2", "p3", "p4", "p1", "p5"],
        "title": ["Whole milk", "Greek yogurt", "Potato chips", "Sourdough", "Whole milk", "Bagels"],
        "description": None, "category": "c", "aisle": ["Dairy", "Dairy", "Snacks", "Bakery", "Dairy", "Bakery"],
        "label": [2, 1, 0, 2, 0, 1],
    })


def test_evaluate_teacher_matches_results_by_pair_and_counts_failures():
    held = _held_out()
    answers = {(q, p): int(y) for q, p, y in zip(held["query"], held["product_id"], held["label"])}
    assert isinstance(_Scripted(answers), Labeler)
    perfect = evaluate_teacher(_Scripted(answers), held)
    assert perfect["accuracy"] == 1.0 and perfect["kappa"] == pytest.approx(1.0) and perfect["n_failed"] == 0
    assert perfect["labeler_id"] == "scripted:v1" and perfect["n"] == 6
    del answers[("bread", "p5")]  # this pair now fails
    partial = evaluate_teacher(_Scripted(answers), held)
    assert partial["n_failed"] == 1 and partial["accuracy"] == pytest.approx(5 / 6)
    with pytest.raises(QualityGateError, match=r"\(1 failed labels counted as wrong\).*accuracy 0.833 < min_accuracy 0.9"):
        check_quality(partial, min_accuracy=0.9)


def test_a_teacher_that_always_answers_zero_fails_the_gate():
    report = evaluate_teacher(_AlwaysZero(), _held_out())
    assert report["accuracy"] == pytest.approx(2 / 6) and report["kappa"] == pytest.approx(0.0)
    with pytest.raises(QualityGateError) as err:
        check_quality(report, min_accuracy=0.6, min_kappa=0.4, min_macro_f1=0.5)
    assert [f.split()[0] for f in err.value.failures] == ["accuracy", "kappa", "macro_f1"]


def test_pairs_with_product_text_joins_fields_and_names_unknown_ids():
    labels = pd.DataFrame({"query": ["milk", "chips"], "product_id": ["p1", "p2"], "label": [2, 0], "split": "train"})
    products = pd.DataFrame({"product_id": ["p1", "p2"], "title": ["Whole milk", None], "description": ["1 l", "salty"],
                             "category": ["Milk", "Chips"], "aisle": ["Dairy", "Snacks"], "image_uri": ["a", "b"]})
    out = pairs_with_product_text(labels, products)
    assert out[["query", "product_id", "label", "title", "aisle"]].fillna("<missing>").to_dict("records") == [
        {"query": "milk", "product_id": "p1", "label": 2, "title": "Whole milk", "aisle": "Dairy"},
        {"query": "chips", "product_id": "p2", "label": 0, "title": "<missing>", "aisle": "Snacks"},
    ]
    with pytest.raises(ValueError, match=r"1 labelled product_id\(s\) are not in the products table, e.g. \['p9'\]"):
        pairs_with_product_text(labels.assign(product_id=["p1", "p9"]), products)
