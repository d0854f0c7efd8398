"""Tests for the label gate: GX checks on labels, class balance and teacher agreement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dashclip_core.config import LabelingConfig
from dashclip_core.validation.label_gate import validate_labels, write_label_gate_report

CFG = LabelingConfig(min_class_fraction=0.1, max_class_fraction=0.8, min_teacher_accuracy=0.6, min_teacher_kappa=0.4)
GOOD_TEACHER = {"accuracy": 0.8, "kappa": 0.6, "n_holdout": np.int64(40)}


def make_labels(counts: tuple[int, int, int] = (5, 3, 2)) -> pd.DataFrame:
    labels = np.repeat([0, 1, 2], counts).astype(np.int8)
    n = len(labels)
    return pd.DataFrame(
        {
            "query": [f"q{i % 3}" for i in range(n)],
            "product_id": [f"p{i:03d}" for i in range(n)],
            "label": labels,
            "source": ["human"] * n,
            "split": ["train"] * n,
        }
    )


def test_good_labels_pass_and_report_is_written(tmp_path: Path) -> None:
    result = validate_labels(make_labels(), GOOD_TEACHER, CFG)

    assert result.passed, result.summary["failures"]
    assert result.summary["label_counts"] == {"0": 5, "1": 3, "2": 2}
    assert result.summary["label_fractions"] == {"0": 0.5, "1": 0.3, "2": 0.2}
    report = json.loads(write_label_gate_report(result, tmp_path / "gate").read_text())
    assert report["passed"] is True and report["teacher"]["n_holdout"] == 40


def test_label_outside_0_1_2_fails_with_sample() -> None:
    labels = make_labels()
    labels.loc[4, "label"] = 3

    result = validate_labels(labels, GOOD_TEACHER, CFG)

    assert not result.passed
    failing = {f["check"]: f for f in result.summary["failing_expectations"]}
    assert failing["label_in_set"]["unexpected_count"] == 1
    assert failing["label_in_set"]["sample_ids"] == ["q1 | p004"]


def test_null_query_and_product_and_duplicate_pair_fail() -> None:
    labels = make_labels()
    labels.loc[0, "query"] = None
    labels.loc[1, "product_id"] = None
    labels.loc[9, ["query", "product_id"]] = ["q2", "p002"]  # same pair as row 2

    result = validate_labels(labels, GOOD_TEACHER, CFG)

    checks = {f["check"] for f in result.summary["failing_expectations"]}
    assert checks == {"query_not_null", "product_id_not_null", "query_product_unique"}
    assert not result.passed


def test_class_balance_bounds() -> None:
    result = validate_labels(make_labels((9, 1, 0)), GOOD_TEACHER, CFG)

    assert not result.passed
    assert result.summary["class_balance"]["failing_labels"] == ["0", "2"]  # 0.9 > 0.8, 0.0 < 0.1; 0.1 is in bounds
    assert any("label 2 is 0.0000 of 10 labels" in f for f in result.summary["failures"])


@pytest.mark.parametrize(
    ("teacher", "bad"),
    [
        ({"accuracy": 0.55, "kappa": 0.6}, "accuracy"),
        ({"accuracy": 0.9, "kappa": 0.3}, "kappa"),
        ({"accuracy": 0.9, "kappa": float("nan")}, "kappa"),
    ],
)
def test_teacher_agreement_thresholds(teacher: dict, bad: str) -> None:
    result = validate_labels(make_labels(), teacher, CFG)

    assert not result.passed
    assert not result.summary["teacher"]["passed"]
    assert [f.split(":")[0] for f in result.summary["failures"]] == ["teacher"]
    assert f"min_teacher_{bad}" in result.summary["failures"][0]
    json.dumps(result.summary, allow_nan=False)


def test_missing_teacher_key_or_column_raises() -> None:
    with pytest.raises(TypeError, match="key 'kappa'"):
        validate_labels(make_labels(), {"accuracy": 0.9}, CFG)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['label'\]"):
        validate_labels(make_labels().drop(columns="label"), GOOD_TEACHER, CFG)
