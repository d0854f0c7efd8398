"""Tests for the label gate (GX checks on labels, class balance), and for the one teacher gate, which is not here.

The teacher is gated once, in the labelling step, before a candidate is paid for: the last test pins that
that gate is the one that stops a bad teacher (the label gate never sees its labels).
"""

from __future__ import annotations

import json
from pathlib import Path

import dashclip_tests_openai_server as fake  # tests/labeling/openai_server.py, registered by tests/conftest.py
import numpy as np
import pandas as pd
import pytest

from dashclip_core.config import LabelingConfig, PipelineConfig
from dashclip_core.labeling.build import LLMEndpoint
from dashclip_core.labeling.errors import QualityGateError
from dashclip_core.labeling.step import run_labeling
from dashclip_core.layout import Labels
from dashclip_core.storage import read_json
from dashclip_core.validation.label_gate import validate_labels, write_label_gate_report

CFG = LabelingConfig(min_class_fraction=0.1, max_class_fraction=0.8)


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
    result = validate_labels(make_labels(), CFG)

    assert result.passed, result.summary["failures"]
    assert result.summary["label_counts"] == {"0": 5, "1": 3, "2": 2}
    assert result.summary["label_fractions"] == {"0": 0.5, "1": 0.3, "2": 0.2}
    report = json.loads(write_label_gate_report(result, tmp_path / "gate").read_text())
    assert report["passed"] is True and "teacher" not in report


def test_label_outside_0_1_2_fails_with_sample() -> None:
    labels = make_labels()
    labels.loc[4, "label"] = 3

    result = validate_labels(labels, CFG)

    assert not result.passed
    failing = {f["check"]: f for f in result.summary["failing_expectations"]}
    assert failing["label_in_set"]["unexpected_count"] == 1
    assert failing["label_in_set"]["sample_ids"] == ["q1 | p004"]


def test_null_query_and_product_and_duplicate_pair_fail() -> None:
    labels = make_labels()
    labels.loc[0, "query"] = None
    labels.loc[1, "product_id"] = None
    labels.loc[9, ["query", "product_id"]] = ["q2", "p002"]  # same pair as row 2

    result = validate_labels(labels, CFG)

    checks = {f["check"] for f in result.summary["failing_expectations"]}
    assert checks == {"query_not_null", "product_id_not_null", "query_product_unique"}
    assert not result.passed


def test_class_balance_bounds() -> None:
    result = validate_labels(make_labels((9, 1, 0)), CFG)

    assert not result.passed
    assert result.summary["class_balance"]["failing_labels"] == ["0", "2"]  # 0.9 > 0.8, 0.0 < 0.1; 0.1 is in bounds
    assert any("label 2 is 0.0000 of 10 labels" in f for f in result.summary["failures"])


def test_missing_column_raises() -> None:
    with pytest.raises(ValueError, match=r"missing column\(s\) \['label'\]"):
        validate_labels(make_labels().drop(columns="label"), CFG)


def test_the_labelling_step_is_the_one_gate_that_stops_a_bad_teacher(tiny_config, tmp_path: Path) -> None:
    # Given an LLM teacher that calls every pair highly relevant, and human labels of all three grades
    products = pd.DataFrame({"product_id": [f"p{i}" for i in range(12)], "title": [f"item {i % 3}" for i in range(12)],
                             "description": None, "category": "c", "aisle": "a"})
    rng = np.random.default_rng(0)
    human = pd.DataFrame({"query": [f"q{i // 4}" for i in range(80)], "product_id": rng.choice(products["product_id"], 80),
                          "label": np.arange(80) % 3, "split": "train"}).drop_duplicates(["query", "product_id"])
    log = pd.DataFrame({"query": ["q0"], "product_id": ["p0"]})
    cfg = PipelineConfig.from_file(tiny_config).with_overrides(**{
        "labeling.labeler": "openai", "labeling.llm_model": "gpt-test", "labeling.candidates_per_query": 4,
        "labeling.random_candidates_per_query": 1, "storage.cache_dir": str(tmp_path / "cache")})
    out = Labels(tmp_path / "label_pairs")
    with fake.FakeOpenAIServer(api_key="sk-gate", grader=lambda query, text: 2) as srv:
        # When the labelling step scores it
        with pytest.raises(QualityGateError) as err:
            run_labeling(cfg, products, log, human, out.dir, endpoint=LLMEndpoint(srv.base_url, "sk-gate"))
        n_billed = len(srv.billed)
    # Then the step stops at its quality gate (kappa 0 < labeling.min_teacher_kappa), naming the threshold
    assert any(f.startswith("kappa 0.000 < min_kappa") for f in err.value.failures)
    assert err.value.report["kappa"] == pytest.approx(0.0, abs=1e-9)
    # with the report already in the step folder, and no labels for the label gate to see
    assert read_json(out.teacher_quality)["n"] == err.value.report["n"] > 0 and out.teacher_confusion_png.exists()
    assert not out.labels.exists()
    # and only held-out pairs were paid for: no candidate was sent
    assert 0 < n_billed <= err.value.report["n"]
