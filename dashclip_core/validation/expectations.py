"""Great Expectations plumbing shared by the catalog, label and embedding gates.

Each gate computes its per-row figures in Python, then asks GX one question per check. This module
runs such a suite (:func:`run_expectations`: one ephemeral GX context per call, pandas datasource,
``COMPLETE`` results), turns what GX found into plain Python (:class:`ExpectationOutcome`), lists the
failing checks with a sample of bad ids (:func:`failing_summary`) and writes a gate's
``report.json`` (:func:`write_report`). The checks themselves live with their gate.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from dashclip_core.layout import GATE_REPORT

SAMPLE_SIZE = 10  # bad ids listed per failing expectation in a gate's summary
BLANK = r"^\s*$"  # matches "" and whitespace-only strings; GX skips nulls, so a nullable column passes on null


@dataclass(frozen=True)
class ExpectationOutcome:
    """What one expectation found, in plain Python types.

    Attributes:
        check: our name for the check (the expectation's ``meta["check"]``).
        expectation: GX expectation type, e.g. ``"expect_column_values_to_be_unique"``.
        column: column the expectation looked at; ``"a,b"`` for a column list; None for table-level
            expectations.
        success: whether the expectation passed.
        unexpected_rows: 0-based positions of the failing rows (empty for table-level expectations).
        details: extra JSON-serialisable figures GX reported (observed value, counts).
    """

    check: str
    expectation: str
    column: str | None
    success: bool
    unexpected_rows: list[int] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def run_expectations(df: pd.DataFrame, expectations: Sequence[Any], suite_name: str) -> dict[str, ExpectationOutcome]:
    """Validate ``df`` against ``expectations`` in a fresh ephemeral GX context.

    Every expectation must carry ``meta={"check": <unique name>}``; GX does not return results in
    the order they were added, so the name is how a result is matched to its check.

    Args:
        df: frame to validate; its index is replaced by a RangeIndex so that GX's
            ``unexpected_index_list`` holds 0-based row positions.
        expectations: ``great_expectations.expectations`` instances, each with ``meta["check"]``.
        suite_name: name of the GX suite (appears in logs).

    Returns:
        Outcomes keyed by check name, in the order the expectations were given.

    Raises:
        ValueError: an expectation lacks ``meta["check"]`` or two share a name.
        RuntimeError: GX raised while evaluating an expectation (e.g. a missing column); the message
            names the check and GX's error.
    """
    names = [(e.meta or {}).get("check") for e in expectations]
    if any(n is None for n in names) or len(set(names)) != len(names):
        raise ValueError(f"suite {suite_name!r}: every expectation needs a unique meta['check'], got {names}")

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas(f"{suite_name}_source")
        .add_dataframe_asset(f"{suite_name}_frame")
        .add_batch_definition_whole_dataframe("whole_frame")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name))
    for expectation in expectations:
        suite.add_expectation(expectation)
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{suite_name}_validation", data=batch_definition, suite=suite)
    )
    result = validation.run(batch_parameters={"dataframe": df.reset_index(drop=True)}, result_format="COMPLETE")

    by_name: dict[str, ExpectationOutcome] = {}
    for r in result.results:
        config = r.expectation_config
        check = config.meta["check"]
        if r.exception_info and r.exception_info.get("raised_exception"):
            raise RuntimeError(
                f"suite {suite_name!r}: expectation {config.type} ({check}) raised: {r.exception_info['exception_message']}"
            )
        raw = dict(r.result or {})
        rows = [int(i) for i in raw.pop("unexpected_index_list", None) or []]
        details = {
            k: to_jsonable(v)
            for k, v in raw.items()
            if k in ("observed_value", "element_count", "unexpected_count", "missing_count", "unexpected_percent")
        }
        by_name[check] = ExpectationOutcome(
            check=check,
            expectation=config.type,
            column=config.kwargs.get("column") or ",".join(config.kwargs.get("column_list") or []) or None,
            success=bool(r.success),
            unexpected_rows=rows,
            details=details,
        )
    return {n: by_name[n] for n in names}


def failing_summary(outcomes: dict[str, ExpectationOutcome], row_ids: Sequence[Any]) -> list[dict[str, Any]]:
    """JSON-ready list of the failing expectations, each with a sample of bad ids.

    Args:
        outcomes: result of :func:`run_expectations`.
        row_ids: id per row position (e.g. the ``product_id`` column), used for the sample.

    Returns:
        One dict per failing check: ``check``, ``expectation``, ``column``, ``unexpected_count``,
        ``sample_ids`` (at most ``SAMPLE_SIZE``, deduplicated, nulls as None) and GX's ``details``.
    """
    failing = []
    for o in outcomes.values():
        if o.success:
            continue
        sample: list[Any] = []
        for i in o.unexpected_rows:
            rid = to_jsonable(row_ids[i])
            if rid not in sample:
                sample.append(rid)
            if len(sample) == SAMPLE_SIZE:
                break
        failing.append(
            {
                "check": o.check,
                "expectation": o.expectation,
                "column": o.column,
                "unexpected_count": len(o.unexpected_rows) if o.unexpected_rows else o.details.get("unexpected_count"),
                "sample_ids": sample,
                "details": o.details,
            }
        )
    return failing


def to_jsonable(value: Any) -> Any:
    """Turn numpy / pandas scalars and containers into JSON types; NaN and NA become None."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, np.ndarray)):
        return [to_jsonable(v) for v in value]
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(passed: bool, summary: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write a gate's ``report.json`` (``passed`` + its summary) into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = out / GATE_REPORT
    report.write_text(json.dumps({"passed": passed, **summary}, indent=2, sort_keys=True))
    return report
