"""The human label gate: bad grades, ids and splits are quarantined with row and field; annotators may repeat a pair."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dashclip_core.config import LabelingConfig, ValidationConfig
from dashclip_core.labeling.pairs import combine_labels
from dashclip_core.layout import CatalogGate
from dashclip_core.validation.human_label_gate import validate_human_labels, write_human_label_outputs
from dashclip_core.validation.label_gate import validate_labels

IDS = ["p1", "p2", "p3"]


def rows(*extra: dict) -> pd.DataFrame:
    """Two good rows (two annotators of one pair) and the given ones."""
    good = [{"query": "oat milk", "product_id": "p1", "label": 2, "annotator": "a1", "split": "train"},
            {"query": "oat milk", "product_id": "p1", "label": 1, "annotator": "a2", "split": "train"}]
    return pd.DataFrame([*good, *extra])


BAD_CASES = [
    ({"label": 3}, "label", "label_in_set"),
    ({"label": -1}, "label", "label_in_set"),
    ({"label": 258}, "label", "label_in_set"),
    ({"label": 1.5}, "label", "label_in_set"),
    ({"label": math.nan}, "label", "label_in_set"),
    ({"label": "2"}, "label", "label_in_set"),
    ({"query": ""}, "query", "query_not_blank"),
    ({"query": None}, "query", "query_not_null"),
    ({"product_id": "  "}, "product_id", "product_id_not_blank"),
    ({"product_id": None}, "product_id", "product_id_not_null"),
    ({"product_id": "p404"}, "product_id", "product_id_known"),
    ({"split": "test"}, "split", "split_in_set"),
    ({"split": None}, "split", "split_not_null"),
]


@pytest.mark.parametrize(("change", "field", "check"), BAD_CASES, ids=[c for _, _, c in BAD_CASES])
def test_a_bad_row_is_quarantined_with_its_row_and_field(change, field, check):
    bad = {"query": "apples", "product_id": "p2", "label": 0, "annotator": "a1", "split": "train", **change}
    result = validate_human_labels(rows(bad), IDS, IDS, ValidationConfig(max_bad_label_fraction=0.5))
    assert result.passed  # 1 bad row of 3 is within the 0.5 allowed
    (q,) = result.quarantine.to_dict("records")
    assert q["row"] == 2 and q["field"] == field and q["reason"].startswith(f"{check}: field {field}")
    assert len(result.clean) == 2 and result.clean["label"].dtype == np.int64
    assert result.summary["n_bad"] == 1 and result.summary["n_bad_by_check"] == {check: 1}


def test_default_threshold_fails_on_any_bad_row_and_names_the_value():
    result = validate_human_labels(rows({"query": "x", "product_id": "p2", "label": 258, "split": "train"}), IDS, IDS,
                                   ValidationConfig())
    assert not result.passed and result.summary["bad_fraction"] == pytest.approx(1 / 3)
    assert "field label 258 (int) is not an integer in {0, 1, 2}" in result.quarantine["reason"].iat[0]


def test_several_annotators_pass_and_are_averaged_into_one_label():
    result = validate_human_labels(rows(), IDS, IDS, ValidationConfig())
    assert result.passed and result.quarantine.empty and len(result.clean) == 2
    labels = combine_labels(result.clean, pd.DataFrame(columns=["query", "product_id", "label"]))
    # one row per pair (the label gate's key), the rounded mean of 2 and 1 (half to even: 1.5 -> 2)
    assert labels.to_dict("records") == [{"query": "oat milk", "product_id": "p1", "label": 2, "source": "human", "split": "train"}]
    # and the label gate's (query, product_id) key holds (HEAD copied both rows and failed query_product_unique)
    gate = validate_labels(labels, LabelingConfig(min_class_fraction=0.0, max_class_fraction=1.0))
    assert gate.passed, gate.summary["failures"]


def test_integral_floats_are_grades():  # pandas reads an INTEGER column holding a NULL as float
    result = validate_human_labels(rows({"query": "tea", "product_id": "p3", "label": 2.0, "split": "eval"}), IDS, IDS,
                                   ValidationConfig())
    assert result.passed and result.clean["label"].tolist() == [2, 1, 2]


def test_a_query_in_both_splits_is_quarantined_whole():
    human = rows({"query": "oat milk", "product_id": "p2", "label": 0, "split": "eval"})
    result = validate_human_labels(human, IDS, IDS, ValidationConfig())
    assert not result.passed and result.quarantine["row"].tolist() == [0, 1, 2]
    assert set(result.quarantine["field"]) == {"split"} and "['eval', 'train']" in result.quarantine["reason"].iat[0]


def test_labels_of_a_quarantined_product_leave_with_it_without_failing_the_gate():
    human = rows({"query": "apples", "product_id": "p2", "label": 2, "split": "train"})
    result = validate_human_labels(human, IDS, ["p1", "p3"], ValidationConfig())
    assert result.passed and result.summary["n_bad"] == 0 and result.summary["n_product_quarantined"] == 1
    assert result.quarantine["reason"].iat[0].startswith("product_quarantined: field product_id 'p2'")


def test_unicode_passes_and_a_huge_query_is_quoted_short():
    human = rows({"query": "café 牛奶 🥛", "product_id": "p2", "label": 1, "split": "train"},
                 {"query": "x" * 1_000_000, "product_id": "p404", "label": 1, "split": "train"})
    result = validate_human_labels(human, IDS, IDS, ValidationConfig(max_bad_label_fraction=1.0))
    assert "café 牛奶 🥛" in set(result.clean["query"])
    (q,) = result.quarantine.to_dict("records")
    assert q["row"] == 3 and len(q["query"]) < 200 and "1,000,000 chars" in q["query"]


def test_missing_column_names_the_file_and_column():
    with pytest.raises(ValueError, match=r"human_labels.parquet: missing column\(s\) \['split'\]"):
        validate_human_labels(rows().drop(columns="split"), IDS, IDS, ValidationConfig())


def test_outputs_are_written_beside_the_product_gate(tmp_path):
    (tmp_path / "report.json").write_text("{}")  # the product gate's report must survive
    result = validate_human_labels(rows({"query": "x", "product_id": "p2", "label": 3, "split": "train"}), IDS, IDS,
                                   ValidationConfig())
    write_human_label_outputs(result, tmp_path)
    files = CatalogGate(tmp_path)
    assert len(pd.read_parquet(files.human_labels)) == 2 and (tmp_path / "report.json").read_text() == "{}"
    assert pd.read_parquet(files.human_labels_quarantine)["row"].tolist() == [2]
    assert files.human_labels_report.exists()


def test_combine_labels_refuses_to_wrap_a_grade_into_int8():
    human = pd.DataFrame({"query": ["q"], "product_id": ["p1"], "label": [258], "split": ["train"]})
    with pytest.raises(ValueError, match=r"outside \{0, 1, 2\}.*258"):
        combine_labels(human, pd.DataFrame(columns=["query", "product_id", "label"]))
