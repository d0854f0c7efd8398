"""The GX helpers the three gates share: check names, the failing-checks summary, JSON conversion, report.json."""

from __future__ import annotations

import json
import math

import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
import pytest

from dashclip_core.validation.expectations import (
    SAMPLE_SIZE,
    ExpectationOutcome,
    failing_summary,
    run_expectations,
    to_jsonable,
    write_report,
)


def test_every_expectation_needs_a_unique_check_name() -> None:
    frame = pd.DataFrame({"a": [1]})
    with pytest.raises(ValueError, match="unique meta\\['check'\\]"):
        run_expectations(frame, [gxe.ExpectColumnValuesToNotBeNull(column="a")], "s")
    twice = [gxe.ExpectColumnValuesToNotBeNull(column="a", meta={"check": "x"}), gxe.ExpectColumnValuesToBeUnique(column="a", meta={"check": "x"})]
    with pytest.raises(ValueError, match="unique meta"):
        run_expectations(frame, twice, "s")


def test_failing_summary_samples_distinct_ids_and_skips_passing_checks() -> None:
    outcomes = {
        "ok": ExpectationOutcome("ok", "expect_column_values_to_not_be_null", "a", True),
        "bad": ExpectationOutcome("bad", "expect_column_values_to_be_unique", "a", False, unexpected_rows=[0, 1, 2] + list(range(3, 30))),
        "table": ExpectationOutcome("table", "expect_table_row_count_to_equal", None, False, details={"unexpected_count": 4}),
    }
    ids = ["dup", "dup", None] + [f"p{i}" for i in range(3, 30)]

    failing = failing_summary(outcomes, ids)

    assert [f["check"] for f in failing] == ["bad", "table"]
    assert failing[0]["sample_ids"][:3] == ["dup", None, "p3"] and len(failing[0]["sample_ids"]) == SAMPLE_SIZE
    assert failing[0]["unexpected_count"] == 30
    assert failing[1]["sample_ids"] == [] and failing[1]["unexpected_count"] == 4  # table-level: GX's count


def test_to_jsonable_and_write_report(tmp_path) -> None:
    value = {1: np.int64(3), "f": np.float32(0.5), "nan": math.nan, "na": pd.NA, "arr": np.array([1, 2]), "t": (None, "x")}
    assert to_jsonable(value) == {"1": 3, "f": 0.5, "nan": None, "na": None, "arr": [1, 2], "t": [None, "x"]}

    path = write_report(False, {"n_rows": 2}, tmp_path / "gate")

    assert json.loads(path.read_text()) == {"passed": False, "n_rows": 2}


def test_outcomes_keep_the_gx_result_and_name_each_check_in_its_description() -> None:
    given = gxe.ExpectColumnValuesToBeUnique(column="a", meta={"check": "own"}, description="our own words")
    outcomes = run_expectations(
        pd.DataFrame({"a": [1, 1], "b": ["x", " "]}),
        [given, gxe.ExpectColumnValuesToNotMatchRegex(column="b", regex=r"^\s*$", meta={"check": "b_not_blank"})],
        "s",
    )

    assert list(outcomes) == ["own", "b_not_blank"] and isinstance(outcomes, dict)
    result = outcomes.validation_result
    assert result.suite_name == "s" and result.success is False
    descriptions = {r.expectation_config.meta["check"]: r.expectation_config.description for r in result.results}
    assert descriptions == {"own": "our own words", "b_not_blank": "b_not_blank: b values must not match this regular expression: ^\\s*$."}
