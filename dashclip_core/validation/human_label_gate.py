"""Human label gate: Great Expectations checks on the snapshot's human labels, with a per-row quarantine.

Runs in ``validate_catalog`` right after the product gate, over ``human_labels.parquet`` (CONTRACTS.md,
"Human label gate"). The source DB's CHECK constraints (``label IN (0,1,2)``, ``split IN ('train','eval')``)
exist only in DBs made by ``create_schema``; a ``sql`` catalog may hold anything, and a bad grade used to
crash deep in torch (a label of 3 indexes past the class axis), or wrap silently in the int8 cast (258 -> 2).

One row in, one verdict per check (``meta.check``, also the quarantine reason code):

- ``query_not_null`` / ``query_not_blank``; ``product_id_not_null`` / ``product_id_not_blank``;
- ``label_in_set``: an integer 0, 1 or 2. Integral floats (2.0, as pandas reads an integer column holding a
  null) count as integers; 3, -1, 258, 1.5, NaN, booleans and strings such as "2" do not;
- ``split_in_set``: ``train`` or ``eval`` (null fails);
- ``split_consistent``: every row of a query has the same split (eval queries are held out by query: a query
  in both splits would leak the evaluation into training). Every row of such a query is quarantined;
- ``product_id_known``: the product exists in the snapshot's products.

A label of a product that exists but that the *product* gate quarantined is dropped too (reason
``product_quarantined``), but it does not count as a bad label: the product gate already judged that row's
cause against ``validation.max_bad_product_fraction``.

Several annotators judging one (query, product_id) are fine: labelling averages them
(:func:`dashclip_core.labeling.pairs.combine_labels`). The gate passes when the share of bad rows is at most
``validation.max_bad_label_fraction`` (default 0: any bad human label stops the DAG).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations.expectations as gxe
import numpy as np
import pandas as pd

from dashclip_core.config import ValidationConfig
from dashclip_core.layout import CatalogGate
from dashclip_core.validation.expectations import BLANK, failing_summary, run_expectations, to_jsonable

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("query", "product_id", "label", "split")
LABEL_VALUES = (0, 1, 2)
SPLITS = ("train", "eval")
QUARANTINE_COLUMNS = ("row", "query", "product_id", "field", "reason")
PRODUCT_QUARANTINED = "product_quarantined"  # dropped with its product, not counted as a bad label
_SHOWN_CHARS = 80  # a value quoted in a reason is cut to this many characters (a 1 MB query stays readable)


@dataclass
class HumanLabelGateResult:
    """Outcome of :func:`validate_human_labels`.

    Attributes:
        passed: bad share <= ``max_bad_label_fraction``.
        clean: the rows that passed every check, all columns, ``label`` as int64, input order, index reset.
        quarantine: one row per dropped input row: ``row`` (0-based position in ``human_labels.parquet``),
            ``query``, ``product_id`` (as text, cut to 80 characters), ``field`` (the failing fields, joined by
            ``","``) and ``reason`` (each failure as ``<check>: field <f> <value>: <why>``, joined by ``"; "``).
        summary: JSON-ready figures (``n_rows``, ``n_bad``, ``n_clean``, ``n_product_quarantined``,
            ``bad_fraction``, ``max_bad_label_fraction``, ``n_bad_by_check``, ``failing_expectations``).
        validation_results: the GX result behind ``summary`` (rendered as Data Docs by the caller).
    """

    passed: bool
    clean: pd.DataFrame
    quarantine: pd.DataFrame
    summary: dict[str, Any]
    validation_results: list[Any] = field(default_factory=list)


def validate_human_labels(human: pd.DataFrame, snapshot_ids: Iterable[Any], clean_ids: Iterable[Any],
                          cfg: ValidationConfig) -> HumanLabelGateResult:
    """Validate the human labels and split them into clean and quarantined rows.

    Args:
        human: the snapshot's ``human_labels`` frame; needs ``query``, ``product_id``, ``label``, ``split``
            (other columns, e.g. ``annotator``, are carried into ``clean``).
        snapshot_ids: every ``product_id`` of the snapshot's products.
        clean_ids: the ``product_id`` values the product gate kept.
        cfg: ``max_bad_label_fraction``.

    Returns:
        A :class:`HumanLabelGateResult`.

    Raises:
        ValueError: a required column is missing (named, with the columns found).
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in human.columns]
    if missing:
        raise ValueError(f"human_labels.parquet: missing column(s) {missing}; found {list(human.columns)}; "
                         f"expected at least {list(REQUIRED_COLUMNS)} (CONTRACTS.md, human_labels.parquet)")
    human = human.reset_index(drop=True)
    n_rows = len(human)
    queries = [_as_text(v) for v in human["query"].tolist()]
    ids = [_as_text(v) for v in human["product_id"].tolist()]
    raw_labels = human["label"].tolist()
    splits = [_as_text(v) for v in human["split"].tolist()]
    known, kept = set(map(_as_text, snapshot_ids)), set(map(_as_text, clean_ids))

    splits_of: dict[str, set[str]] = {}
    for q, s in zip(queries, splits):
        if q is not None and s in SPLITS:
            splits_of.setdefault(q, set()).add(s)
    frame = pd.DataFrame({
        "query": pd.Series(queries, dtype=object),
        "product_id": pd.Series(ids, dtype=object),
        "label_valid": pd.Series([_grade(v) is not None for v in raw_labels], dtype=bool),
        "split": pd.Series(splits, dtype=object),
        # None (skipped by GX's InSet) where another check already speaks: no query / no split, no product id.
        "split_consistent": pd.Series([None if q is None or s not in SPLITS else len(splits_of[q]) == 1
                                       for q, s in zip(queries, splits)], dtype=object),
        "product_id_known": pd.Series([None if p is None or not p.strip() else p in known for p in ids], dtype=object),
    })
    outcomes = run_expectations(
        frame,
        [
            gxe.ExpectColumnValuesToNotBeNull(column="query", meta={"check": "query_not_null"}),
            gxe.ExpectColumnValuesToNotMatchRegex(column="query", regex=BLANK, meta={"check": "query_not_blank"}),
            gxe.ExpectColumnValuesToNotBeNull(column="product_id", meta={"check": "product_id_not_null"}),
            gxe.ExpectColumnValuesToNotMatchRegex(column="product_id", regex=BLANK, meta={"check": "product_id_not_blank"}),
            gxe.ExpectColumnValuesToBeInSet(column="product_id_known", value_set=[True], meta={"check": "product_id_known"}),
            gxe.ExpectColumnValuesToBeInSet(column="label_valid", value_set=[True], meta={"check": "label_in_set"}),
            gxe.ExpectColumnValuesToNotBeNull(column="split", meta={"check": "split_not_null"}),
            gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS), meta={"check": "split_in_set"}),
            gxe.ExpectColumnValuesToBeInSet(column="split_consistent", value_set=[True], meta={"check": "split_consistent"}),
        ],
        suite_name="human_label_gate",
    )

    # Reasons come from the GX outcomes; Python only words them (field and value named).
    reason_for = {
        "query_not_null": ("query", lambda i: f"field query is missing ({_show(human['query'].iat[i])})"),
        "query_not_blank": ("query", lambda i: "field query is empty"),
        "product_id_not_null": ("product_id", lambda i: f"field product_id is missing ({_show(human['product_id'].iat[i])})"),
        "product_id_not_blank": ("product_id", lambda i: "field product_id is empty"),
        "product_id_known": ("product_id", lambda i: f"field product_id {_show(ids[i])} is not a product of the snapshot"),
        "label_in_set": ("label", lambda i: f"field label {_show(raw_labels[i])} ({type(raw_labels[i]).__name__}) "
                                             "is not an integer in {0, 1, 2}"),
        "split_not_null": ("split", lambda i: "field split is missing"),
        "split_in_set": ("split", lambda i: f"field split {_show(splits[i])} is not one of {list(SPLITS)}"),
        "split_consistent": ("split", lambda i: f"field split: query {_show(queries[i])} has rows in both "
                                                f"{sorted(splits_of[queries[i]])} (a query is either train or eval)"),
    }
    problems: dict[int, list[tuple[str, str]]] = {}
    for check, outcome in outcomes.items():
        column, words = reason_for[check]
        for i in outcome.unexpected_rows:
            problems.setdefault(i, []).append((column, f"{check}: {words(i)}"))
    bad_rows = set(problems)
    for i, p in enumerate(ids):  # labels of products the product gate quarantined leave with their product
        if i not in bad_rows and p in known and p not in kept:
            problems[i] = [("product_id", f"{PRODUCT_QUARANTINED}: field product_id {_show(p)} was quarantined by the product gate")]

    dropped = sorted(problems)
    quarantine = pd.DataFrame({
        "row": pd.Series(dropped, dtype="int64"),
        "query": pd.Series([_cut(queries[i]) for i in dropped], dtype=object),
        "product_id": pd.Series([_cut(ids[i]) for i in dropped], dtype=object),
        "field": pd.Series([",".join(dict.fromkeys(c for c, _ in problems[i])) for i in dropped], dtype=object),
        "reason": pd.Series(["; ".join(r for _, r in problems[i]) for i in dropped], dtype=object),
    }, columns=list(QUARANTINE_COLUMNS))
    clean = human.drop(index=dropped).reset_index(drop=True)
    clean["label"] = pd.Series([_grade(v) for v in clean["label"].tolist()], dtype="int64")

    n_bad = len(bad_rows)
    bad_fraction = n_bad / n_rows if n_rows else 0.0
    passed = bad_fraction <= cfg.max_bad_label_fraction
    by_check = {c: len(o.unexpected_rows) for c, o in outcomes.items() if o.unexpected_rows}
    summary = {
        "n_rows": n_rows,
        "n_bad": n_bad,
        "n_clean": len(clean),
        "n_product_quarantined": len(dropped) - n_bad,
        "bad_fraction": bad_fraction,
        "max_bad_label_fraction": cfg.max_bad_label_fraction,
        "n_bad_by_check": by_check,
        "failing_expectations": failing_summary(outcomes, [f"row {i}" for i in range(n_rows)]),
    }
    if passed:
        logger.info("human label gate passed: %d rows, %d dropped (%d bad)", n_rows, len(dropped), n_bad)
    else:
        logger.warning("human label gate failed: %d of %d rows bad (max fraction %s): %s", n_bad, n_rows,
                       cfg.max_bad_label_fraction, by_check)
    return HumanLabelGateResult(passed, clean, quarantine, to_jsonable(summary), [outcomes.validation_result])


def write_human_label_outputs(result: HumanLabelGateResult, out_dir: str | os.PathLike) -> Path:
    """Write ``human_labels.parquet``, ``human_labels_quarantine.parquet`` (always) and ``human_labels_report.json``.

    The GX result is not rendered here: the step renders the product and human-label validations into one
    Data Docs site (``write_data_docs`` replaces the whole site).

    Returns:
        The path of the report.
    """
    files = CatalogGate(Path(out_dir))
    files.dir.mkdir(parents=True, exist_ok=True)
    result.clean.to_parquet(files.human_labels, index=False)
    quarantine = result.quarantine.reindex(columns=list(QUARANTINE_COLUMNS)).astype(
        {"row": "int64", "query": "string", "product_id": "string", "field": "string", "reason": "string"})
    quarantine.to_parquet(files.human_labels_quarantine, index=False)
    # Not expectations.write_report: that writes report.json, which is the product gate's report in this folder.
    files.human_labels_report.write_text(json.dumps({"passed": result.passed, **result.summary}, indent=2, sort_keys=True))
    return files.human_labels_report


def _grade(value: Any) -> int | None:
    """``value`` as a grade 0/1/2, or None when it is not an integer grade (see the module docstring)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    if not isinstance(value, numbers.Integral) and not (math.isfinite(float(value)) and float(value).is_integer()):
        return None
    number = int(value)
    return number if number in LABEL_VALUES else None


def _as_text(value: Any) -> str | None:
    """A key field as text: strings as they are, numbers as their text, nulls (None, NaN, NA) as None."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value if isinstance(value, str) else str(value)


def _cut(text: str | None) -> str | None:
    return text if text is None or len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}... ({len(text):,} chars)"


def _show(value: Any) -> str:
    """A value for a reason: its repr, cut to ``_SHOWN_CHARS``."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}... ({len(text):,} chars)"
