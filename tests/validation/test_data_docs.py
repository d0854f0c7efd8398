"""Every gate renders its GX validation results as Data Docs in its folder: pages that name each check and
mark the failing ones, a small site, the summary's link, and (task level) the MLflow copy of a failing gate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
import pytest

from dashclip_core.config import LabelingConfig, PipelineConfig, ValidationConfig
from dashclip_core.layout import DAG_ID, SUMMARY, CatalogGate, GateReport, Step
from dashclip_core.storage import RunPaths
from dashclip_core.validation.catalog_gate import validate_catalog, write_gate_outputs
from dashclip_core.validation.embedding_gate import validate_embeddings, write_embedding_gate_report
from dashclip_core.validation.expectations import run_expectations, write_data_docs
from dashclip_core.validation.label_gate import validate_labels, write_label_gate_report

ICON = re.compile(r"fa-(times) text-danger|fa-(check-circle) text-success")  # GX's failed / passed status icons


def docs_status(site: Path) -> dict[str, dict[str, str]]:
    """For each validation page the index links to: ``{suite: {check: "failed" | "passed"}}``.

    A row of GX's validation table is the status icon, then the expectation's description (which
    run_expectations starts with the check name): the icon nearest before ``"<check>: "`` is its status.
    """
    index = (site / "index.html").read_text()
    pages = sorted(set(re.findall(r"validations/[^'\"\\<>]+?\.html", index)))
    assert pages, f"{site}/index.html links no validation page"
    status: dict[str, dict[str, str]] = {}
    for rel in pages:
        html = (site / rel).read_text()
        checks = {}
        for m in re.finditer(r">\s*([a-z_]+): ", html):
            icons = list(ICON.finditer(html, 0, m.start()))
            if icons:
                checks[m.group(1)] = "failed" if icons[-1].group(1) else "passed"
        status[Path(rel).parts[1]] = checks  # validations/<suite>/<run name>/<run time>/<batch>.html
    return status


def test_catalog_gate_docs_name_every_check_and_mark_the_failing_ones(good_image: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    products = pd.DataFrame({
        "product_id": ["p1", "p1", "p2", "p3", "p4"],
        "title": ["oat milk", "oat milk", "  ", "granola", "yogurt"],
        "category": ["dairy"] * 5,
        "image_uri": [str(good_image), str(good_image), str(good_image), str(corrupt), None],
    })
    result = validate_catalog(products, ValidationConfig(max_bad_product_fraction=0.0, min_products=1))
    out = tmp_path / "validate_catalog"

    write_gate_outputs(result, out)

    assert CatalogGate(out).data_docs_index.is_file()
    status = docs_status(CatalogGate(out).data_docs)
    assert status == {"catalog_gate": {
        "product_id_not_null": "passed", "product_id_not_blank": "passed", "product_id_unique": "failed",
        "title_not_blank": "failed", "category_not_null": "passed", "category_not_blank": "passed",
        "image_readable": "failed", "has_title_or_image": "passed",
    }}
    # The report and the docs agree on what failed.
    assert {f["check"] for f in result.summary["failing_expectations"]} == {c for c, s in status["catalog_gate"].items() if s == "failed"}
    assert "ge-failed-icon" in CatalogGate(out).data_docs_index.read_text()  # the index marks the validation failed


def test_label_gate_docs_hold_both_suites_with_class_balance(tmp_path: Path) -> None:
    labels = pd.DataFrame({
        "query": ["oat milk", "oat milk", "granola", " ", "yogurt", "tea"],
        "product_id": ["p1", "p1", "p2", "p3", "p4", "p5"],
        "label": [2, 2, 2, 2, 7, 2],
    })
    result = validate_labels(labels, LabelingConfig(min_class_fraction=0.1, max_class_fraction=0.8))
    out = tmp_path / "validate_labels"

    write_label_gate_report(result, out)

    status = docs_status(GateReport(out).data_docs)
    assert status["label_gate"] == {
        "label_not_null": "passed", "label_in_set": "failed", "query_not_null": "passed", "query_not_blank": "failed",
        "product_id_not_null": "passed", "query_product_unique": "failed",
    }
    # Labels 0 and 1 never occur (share 0 < 0.1) and 2 is 5 of 5 valid labels (> 0.8): GX sees the shares too.
    assert status["label_gate_class_balance"] == {"class_balance": "failed"}
    assert result.summary["class_balance"]["failing_labels"] == ["0", "1", "2"]


def test_embedding_gate_docs_pass_on_good_input_and_fail_on_bad(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    emb = pd.DataFrame({"product_id": [f"p{i}" for i in range(6)], "embedding": list(x)})
    ids = set(emb["product_id"])

    good = validate_embeddings(emb, ids, 8)
    write_embedding_gate_report(good, tmp_path / "good")
    (good_checks,) = docs_status(GateReport(tmp_path / "good").data_docs).values()
    assert good.passed and good_checks and set(good_checks.values()) == {"passed"}

    bad_emb = emb.copy()
    bad_emb.at[1, "embedding"] = np.full(8, np.nan, dtype=np.float32)
    bad = validate_embeddings(bad_emb.iloc[1:], ids, 8)  # p0 missing, p1 NaN
    write_embedding_gate_report(bad, tmp_path / "bad")
    (bad_checks,) = docs_status(GateReport(tmp_path / "bad").data_docs).values()
    assert not bad.passed
    assert set(bad_checks) == set(good_checks)
    assert {c for c, s in bad_checks.items() if s == "failed"} == {f["check"] for f in bad.summary["failing_expectations"]}
    assert {"finite", "one_row_per_expected_id"} <= {c for c, s in bad_checks.items() if s == "failed"}


def test_site_is_small_fresh_and_needs_real_results(tmp_path: Path) -> None:
    outcomes = run_expectations(pd.DataFrame({"a": [1, 2]}), [gxe.ExpectColumnValuesToBeUnique(column="a", meta={"check": "a_unique"})], "tiny")
    stale = tmp_path / "data_docs" / "validations" / "old_suite" / "x.html"
    stale.parent.mkdir(parents=True)
    stale.write_text("<html>a previous attempt</html>")

    index = write_data_docs(outcomes.validation_result, tmp_path)

    site = index.parent
    assert not stale.exists()  # the site holds this gate's results only
    assert docs_status(site) == {"tiny": {"a_unique": "passed"}}
    assert sum(p.stat().st_size for p in site.rglob("*") if p.is_file()) < 200_000  # GX's ~4 MB of tutorial images pruned
    assert not list(site.rglob("*.gif"))
    with pytest.raises(TypeError, match="ExpectationSuiteValidationResult"):
        write_data_docs([], tmp_path / "none")
    with pytest.raises(TypeError, match="dict"):
        write_data_docs([{"success": True}], tmp_path / "none")


def test_run_summary_links_each_gates_data_docs(tmp_path: Path) -> None:
    from orchestration.summary import summary_lines

    config = tmp_path / "c.yaml"
    config.write_text(f"name: t\nstorage:\n  root: {tmp_path / 'runs'}\n")
    run_id = "manual__2026-01-01T00:00:00+00:00"
    paths = RunPaths(str(tmp_path / "runs"), DAG_ID, run_id)
    for step, passed in ((Step.VALIDATE_CATALOG, True), (Step.VALIDATE_LABELS, False)):
        with paths.step_output(step) as out:
            (out / "data_docs").mkdir()
            (out / "data_docs" / "index.html").write_text("<html></html>")
            (out / SUMMARY).write_text(json.dumps({"passed": passed, "data_docs": "data_docs/index.html"}))

    lines = summary_lines(run_id, str(config), tasks=[])

    start = lines.index("data docs (Great Expectations) per gate:")
    catalog_line, labels_line = lines[start + 1], lines[start + 2]
    assert catalog_line.split() == ["validate_catalog", "passed", (Path(paths.uri("validate_catalog")) / "data_docs/index.html").resolve().as_uri()]
    assert labels_line.split()[:2] == ["validate_labels", "FAILED"] and labels_line.split()[2].startswith("file:///")


def test_failing_gate_task_publishes_its_docs_and_logs_them_to_mlflow(tiny_config: Path) -> None:
    """The embedding gate task, outside Airflow, on published upstream folders: it fails, after publishing."""
    from airflow.sdk.exceptions import AirflowFailException

    from dashclip_core.registry.mlflow_registry import client, pipeline_run
    from tasks import steps

    cfg = PipelineConfig.from_file(tiny_config)
    run_id = "manual__data_docs_gate"
    paths = RunPaths(cfg.storage_root(), DAG_ID, run_id, cache_dir=cfg.cache_dir())
    ids = [f"p{i}" for i in range(4)]
    with paths.step_output(Step.VALIDATE_CATALOG) as out:
        pd.DataFrame({"product_id": ids}).to_parquet(CatalogGate(out).clean)
        (out / SUMMARY).write_text("{}")
    with paths.step_output(Step.BACKFILL_EMBEDDINGS) as out:
        vectors = np.eye(4, cfg.model.embed_dim, dtype=np.float32) * 2.0  # norm 2: every row fails unit_norm
        pd.DataFrame({"product_id": ids, "embedding": list(vectors)}).to_parquet(out / "embeddings.parquet")
        (out / SUMMARY).write_text("{}")
    upstream = {s: {"uri": paths.uri(s)} for s in (Step.VALIDATE_CATALOG, Step.BACKFILL_EMBEDDINGS)}

    with pytest.raises(AirflowFailException, match=r"embedding gate failed: unit_norm:norm.*Data Docs .*data_docs/index.html"):
        steps.validate_embeddings(upstream[Step.VALIDATE_CATALOG], upstream[Step.BACKFILL_EMBEDDINGS],
                                  params={"config_path": str(tiny_config)}, run_id=run_id)

    assert paths.is_done(Step.VALIDATE_EMBEDDINGS)
    gate = GateReport(paths.local(Step.VALIDATE_EMBEDDINGS))
    assert json.loads(gate.summary.read_text())["data_docs"] == "data_docs/index.html"
    assert docs_status(gate.data_docs)["embedding_gate"]["unit_norm"] == "failed"
    mlflow_run_id = pipeline_run(cfg, run_id, DAG_ID)
    logged = {a.path for a in client(cfg).list_artifacts(mlflow_run_id, "data_docs/validate_embeddings")}
    assert "data_docs/validate_embeddings/index.html" in logged and "data_docs/validate_embeddings/validations" in logged


def test_passing_label_gate_task_returns_and_logs_its_docs(tiny_config: Path) -> None:
    from dashclip_core.registry.mlflow_registry import client, pipeline_run
    from tasks import steps

    cfg = PipelineConfig.from_file(tiny_config)
    run_id = "manual__data_docs_labels"
    paths = RunPaths(cfg.storage_root(), DAG_ID, run_id, cache_dir=cfg.cache_dir())
    with paths.step_output(Step.LABEL_PAIRS) as out:
        pd.DataFrame({"query": [f"q{i}" for i in range(9)], "product_id": [f"p{i}" for i in range(9)],
                      "label": [0, 1, 2] * 3}).to_parquet(out / "labels.parquet")
        (out / SUMMARY).write_text("{}")

    summary = steps.validate_labels({"uri": paths.uri(Step.LABEL_PAIRS)}, params={"config_path": str(tiny_config)}, run_id=run_id)

    assert summary["passed"] and summary["data_docs"] == "data_docs/index.html"
    assert set(docs_status(GateReport(paths.local(Step.VALIDATE_LABELS)).data_docs)["label_gate_class_balance"].values()) == {"passed"}
    logged = {a.path for a in client(cfg).list_artifacts(pipeline_run(cfg, run_id, DAG_ID), "data_docs/validate_labels")}
    assert "data_docs/validate_labels/index.html" in logged
