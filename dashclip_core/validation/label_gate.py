"""Label gate: checks on the (query, product, label) set before training uses it.

Two groups of checks, each reported with its figures:

1. Great Expectations on ``labels.parquet`` (CONTRACTS.md, "Labels"): ``label`` in {0, 1, 2} and
   not null, ``query`` / ``product_id`` not null and not blank, one label per (query, product_id).
2. Class balance: the share of each label value (0, 1, 2) lies in
   [``LabelingConfig.min_class_fraction``, ``LabelingConfig.max_class_fraction``]. A value that never
   occurs has share 0 and fails the lower bound. GX checks the shares too (a second suite, one row per
   label value).

Both GX results become the gate's Data Docs (:func:`write_label_gate_report`). The gate passes when every check passes. The teacher itself is gated once, earlier: the labelling step
scores it on held-out human labels against ``labeling.min_teacher_*`` before it grades a single
candidate (:func:`dashclip_core.labeling.step.run_labeling`), so labels from a bad teacher never reach here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations.expectations as gxe
import pandas as pd

from dashclip_core.config import LabelingConfig
from dashclip_core.validation.expectations import (
    BLANK,
    failing_summary,
    run_expectations,
    write_data_docs,
    write_report,
)

logger = logging.getLogger(__name__)

LABEL_VALUES = (0, 1, 2)  # irrelevant, moderately relevant, highly relevant
REQUIRED_COLUMNS = ("query", "product_id", "label")


@dataclass
class LabelGateResult:
    """Outcome of :func:`validate_labels`.

    Attributes:
        passed: every GX expectation and the class-balance check passed.
        summary: JSON-serialisable: ``n_rows``, ``label_counts``, ``label_fractions``,
            ``failing_expectations`` (GX, with a sample of bad ``query | product_id`` pairs),
            ``class_balance`` (figures, bounds, passed) and ``failures`` (one readable line per
            failed check).
        validation_results: the GX validation results behind ``summary`` (the label frame, the class
            shares); the writer renders them as the gate's Data Docs.
    """

    passed: bool
    summary: dict[str, Any]
    validation_results: list[Any] = field(default_factory=list)


def validate_labels(labels: pd.DataFrame, cfg: LabelingConfig) -> LabelGateResult:
    """Validate a label set (human + teacher labels).

    Args:
        labels: frame with at least ``query``, ``product_id`` and ``label`` (int 0/1/2).
        cfg: gate thresholds (``min_class_fraction``, ``max_class_fraction``).

    Returns:
        A :class:`LabelGateResult`.

    Raises:
        ValueError: a required column is missing.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in labels.columns]
    if missing:
        raise ValueError(
            f"labels frame: missing column(s) {missing}; found {list(labels.columns)}; "
            f"expected at least {list(REQUIRED_COLUMNS)} (CONTRACTS.md, labels.parquet)"
        )
    labels = labels.reset_index(drop=True)
    failures: list[str] = []

    # Step 1: GX on the frame.
    outcomes = run_expectations(
        labels[list(REQUIRED_COLUMNS)],
        [
            gxe.ExpectColumnValuesToNotBeNull(column="label", meta={"check": "label_not_null"}),
            gxe.ExpectColumnValuesToBeInSet(
                column="label", value_set=list(LABEL_VALUES), meta={"check": "label_in_set"}
            ),
            gxe.ExpectColumnValuesToNotBeNull(column="query", meta={"check": "query_not_null"}),
            gxe.ExpectColumnValuesToNotMatchRegex(column="query", regex=BLANK, meta={"check": "query_not_blank"}),
            gxe.ExpectColumnValuesToNotBeNull(column="product_id", meta={"check": "product_id_not_null"}),
            gxe.ExpectCompoundColumnsToBeUnique(
                column_list=["query", "product_id"], meta={"check": "query_product_unique"}
            ),
        ],
        suite_name="label_gate",
    )
    pair_ids = [f"{q} | {p}" for q, p in zip(labels["query"].tolist(), labels["product_id"].tolist())]
    failing = failing_summary(outcomes, pair_ids)
    for f in failing:
        failures.append(
            f"{f['check']}: {f['unexpected_count']} bad row(s) in column {f['column']!r}, e.g. {f['sample_ids'][:3]}"
        )

    # Step 2: class balance over the rows whose label is a known value; GX checks the per-label shares
    # (one row per label value), so the bounds and the failing labels are in the Data Docs too.
    valid = labels["label"][labels["label"].isin(LABEL_VALUES)].astype(int)
    n_valid = len(valid)
    counts = {v: int((valid == v).sum()) for v in LABEL_VALUES}
    fractions = {v: (counts[v] / n_valid if n_valid else 0.0) for v in LABEL_VALUES}
    balance = run_expectations(
        pd.DataFrame({"label": list(LABEL_VALUES), "fraction": [fractions[v] for v in LABEL_VALUES]}),
        [
            gxe.ExpectColumnValuesToBeBetween(
                column="fraction",
                min_value=cfg.min_class_fraction,
                max_value=cfg.max_class_fraction,
                meta={"check": "class_balance"},
            )
        ],
        suite_name="label_gate_class_balance",
    )
    balance_bad = {LABEL_VALUES[i]: fractions[LABEL_VALUES[i]] for i in balance["class_balance"].unexpected_rows}
    for v, f in balance_bad.items():
        failures.append(
            f"class_balance: label {v} is {f:.4f} of {n_valid} labels; expected a share in "
            f"[{cfg.min_class_fraction}, {cfg.max_class_fraction}] (labeling.min_class_fraction / max_class_fraction)"
        )

    passed = not failures
    summary = {
        "n_rows": len(labels),
        "label_counts": {str(v): c for v, c in counts.items()},
        "label_fractions": {str(v): f for v, f in fractions.items()},
        "failing_expectations": failing,
        "class_balance": {
            "passed": not balance_bad,
            "min_class_fraction": cfg.min_class_fraction,
            "max_class_fraction": cfg.max_class_fraction,
            "failing_labels": [str(v) for v in balance_bad],
        },
        "failures": failures,
    }
    if passed:
        logger.info("label gate passed: %d labels, fractions %s", len(labels), summary["label_fractions"])
    else:
        logger.warning("label gate failed: %s", "; ".join(failures))
    return LabelGateResult(
        passed=passed, summary=summary, validation_results=[outcomes.validation_result, balance.validation_result]
    )


def write_label_gate_report(result: LabelGateResult, out_dir: str | os.PathLike) -> Path:
    """Write ``report.json`` (``passed`` + the summary) and the GX Data Docs site ``data_docs/`` into ``out_dir``.

    Args:
        result: output of :func:`validate_labels`.
        out_dir: destination folder.

    Returns:
        The path of ``report.json``.
    """
    write_data_docs(result.validation_results, out_dir)
    return write_report(result.passed, result.summary, out_dir)
