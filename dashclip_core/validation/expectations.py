"""Great Expectations plumbing shared by the catalog, label and embedding gates.

Each gate computes its per-row figures in Python, then asks GX one question per check. This module
runs such a suite (:func:`run_expectations`: one ephemeral GX context per call, pandas datasource,
``COMPLETE`` results), turns what GX found into plain Python (:class:`ExpectationOutcome`), lists the
failing checks with a sample of bad ids (:func:`failing_summary`), writes a gate's ``report.json``
(:func:`write_report`) and renders the GX validation results themselves as a Data Docs site in the
gate's folder (:func:`write_data_docs`). The checks themselves live with their gate.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import great_expectations as gx
import numpy as np
import pandas as pd
from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResult
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.data_context.types.resource_identifiers import (
    ExpectationSuiteIdentifier,
    ValidationResultIdentifier,
)

from dashclip_core.layout import DATA_DOCS, DATA_DOCS_INDEX, GATE_REPORT

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


class ExpectationOutcomes(dict[str, ExpectationOutcome]):
    """:func:`run_expectations`' outcomes by check name, plus the GX result they were read from.

    A plain dict for the gate's own logic; ``validation_result`` is what :func:`write_data_docs` renders.
    """

    def __init__(self, outcomes: dict[str, ExpectationOutcome], validation_result: ExpectationSuiteValidationResult):
        super().__init__(outcomes)
        self.validation_result = validation_result


def run_expectations(df: pd.DataFrame, expectations: Sequence[Any], suite_name: str) -> ExpectationOutcomes:
    """Validate ``df`` against ``expectations`` in a fresh ephemeral GX context.

    Every expectation must carry ``meta={"check": <unique name>}``; GX does not return results in
    the order they were added, so the name is how a result is matched to its check.

    Args:
        df: frame to validate; its index is replaced by a RangeIndex so that GX's
            ``unexpected_index_list`` holds 0-based row positions.
        expectations: ``great_expectations.expectations`` instances, each with ``meta["check"]``.
        suite_name: name of the GX suite (appears in logs).

    Returns:
        Outcomes keyed by check name, in the order the expectations were given; its
        ``validation_result`` (GX's own result) is what :func:`write_data_docs` renders.

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
    for expectation, check in zip(expectations, names):
        if not expectation.description:  # Data Docs show the description: let it name our check
            expectation.description = check_description(expectation, check)
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
    return ExpectationOutcomes({n: by_name[n] for n in names}, result)


def check_description(expectation: Any, check: str) -> str:
    """``"<check>: <GX's own sentence for the expectation>"``, e.g. ``"label_in_set: label values must belong to this set: 0 1 2."``.

    GX's Data Docs print an expectation's ``description`` instead of their generated sentence; this puts
    our check name (the one in ``report.json`` and in the task's error) in front of that sentence, so a
    failing row of the docs is found by the name the report gives.
    """
    expectation.render()
    rendered = expectation.rendered_content[0].value if expectation.rendered_content else None
    template = getattr(rendered, "template", None)
    if not template:
        return f"{check}: {expectation.expectation_type}"
    params = {k: v.get("value") if isinstance(v, dict) else v for k, v in (getattr(rendered, "params", None) or {}).items()}
    sentence = Template(template).safe_substitute({k: v if isinstance(v, str) else json.dumps(to_jsonable(v)) for k, v in params.items()})
    return f"{check}: {sentence}"


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


DATA_DOCS_SITE = "gate_data_docs"  # the one site of write_data_docs' throwaway context
STATIC_REF = re.compile(r"""(?:^|[/"'(])(static/[^"'()?#\s]+)""")  # static asset paths the rendered pages refer to


def write_data_docs(
    validation_results: ExpectationSuiteValidationResult | Iterable[ExpectationSuiteValidationResult],
    out_dir: str | os.PathLike,
) -> Path:
    """Render a gate's GX validation result(s) as a Data Docs site in ``<out_dir>/data_docs``.

    The site is what GX itself renders (index page, one page per validation: every expectation with its
    status, observed value and sample of unexpected values) from the very results the gate decided on.
    Called with ``out_dir`` = the step's staging folder, the site is published atomically with the step,
    a failing gate's included. A throwaway ephemeral context holds the results and the site config: no
    GX project directory is written anywhere (a file context would write a GX project, ~6 files, for nothing).
    Static assets no page refers to are removed (GX copies ~4 MB of images for its tutorial pages).

    Args:
        validation_results: one or more ``ExpectationSuiteValidationResult`` (``run_expectations(...)
            .validation_result``); each becomes one validation page.
        out_dir: the gate's (staging) folder; ``data_docs/`` in it is replaced.

    Returns:
        The path of the site's ``index.html``.

    Raises:
        TypeError: no results, or an item is not a GX suite validation result.
        RuntimeError: GX built no index page, or no page for one of the results (GX only logs its rendering errors).
    """
    results = [validation_results] if isinstance(validation_results, ExpectationSuiteValidationResult) else list(validation_results)
    bad = [type(r).__name__ for r in results if not isinstance(r, ExpectationSuiteValidationResult)]
    if bad or not results:
        raise TypeError(f"write_data_docs: expected one or more GX ExpectationSuiteValidationResult, got {bad or 'none'}")
    site_dir = Path(out_dir) / DATA_DOCS
    if site_dir.exists():  # a site holds this gate's results only, never a previous attempt's
        shutil.rmtree(site_dir)

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.add_data_docs_site(
        DATA_DOCS_SITE,
        {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site_dir)},
            "show_how_to_buttons": False,
            # Validation pages only: the suite pages would repeat the expectations without the outcomes.
            "site_section_builders": {"expectations": "None", "profiling": "None"},
        },
    )
    identifiers = []
    for result in results:
        identifier = ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=result.suite_name),
            run_id=result.meta.get("run_id"),
            batch_identifier=result.batch_id or "batch",
        )
        context.validation_results_store.set(identifier, result)
        identifiers.append(identifier)
    built = context.build_data_docs(site_names=[DATA_DOCS_SITE], resource_identifiers=identifiers)
    index = site_dir / DATA_DOCS_INDEX
    if DATA_DOCS_SITE not in built or not index.is_file():
        raise RuntimeError(f"write_data_docs: GX built no {index} (build_data_docs returned {built})")
    # GX logs a page it fails to render and goes on: a site missing a validation must not pass for complete.
    missing = [
        f"{i.expectation_suite_identifier.name} (run {i.run_id.run_time})"
        for i in identifiers
        if not context.get_docs_sites_urls(resource_identifier=i, site_name=DATA_DOCS_SITE, only_if_exists=True)[0]["site_url"]
    ]
    if missing:
        raise RuntimeError(f"write_data_docs: GX rendered no page for {missing} in {site_dir} (see GX's error in the log)")
    prune_static_assets(site_dir)
    return index


def prune_static_assets(site_dir: Path) -> None:
    """Delete the files under ``<site_dir>/static`` that no page of the site refers to."""
    used = {m for page in site_dir.rglob("*.html") for m in STATIC_REF.findall(page.read_text(encoding="utf-8"))}
    static = site_dir / "static"
    for path in sorted(static.rglob("*"), reverse=True):  # children before their folders
        if path.is_file() and path.relative_to(site_dir).as_posix() not in used:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
