"""step.run_labeling without Airflow: what a finished step writes, and each typed stop in its case.

The data is a tiny synthetic snapshot whose human grades follow the fake LLM's word-overlap rule, so the
HTTP teacher (tests/labeling/openai_server.py) is exact and the softmax teacher learns it.
"""

from __future__ import annotations

import dashclip_tests_openai_server as fake  # tests/labeling/openai_server.py, registered by tests/conftest.py
import numpy as np
import pandas as pd
import pytest

from dashclip_core.config import PipelineConfig
from dashclip_core.labeling.budget import Budget
from dashclip_core.labeling.build import LLMEndpoint
from dashclip_core.labeling.errors import (
    DryRunEstimate,
    HoldoutOverBudget,
    LabelingError,
    StoppedByBudget,
    TooManyFailedPairs,
)
from dashclip_core.labeling.holdout import split_human_labels
from dashclip_core.labeling.label_requests import requests_for
from dashclip_core.labeling.pairs import candidate_pairs
from dashclip_core.labeling.step import run_labeling
from dashclip_core.labeling.store import LabelStore
from dashclip_core.layout import Labels
from dashclip_core.storage import read_json

KEY = "sk-step-test"
WORDS = ["milk", "bread", "apple", "cheese", "chips", "coffee", "tea", "rice"]
KINDS = ["organic", "fresh", "sweet", "salted"]
SUMMARY_KEYS = {"n_labels", "n_teacher_labels", "n_human_labels", "n_failed", "labeler_id", "cache_hit_rate", "tokens",
                "cost_usd", "teacher_accuracy", "teacher_kappa", "teacher_macro_f1"}


def snapshot(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(products, search_log, human_labels): 40 products, 24 queries, human grades by the overlap rule."""
    rng = np.random.default_rng(seed)
    products = pd.DataFrame([{"product_id": f"p{i:03d}", "title": f"{KINDS[(i // len(WORDS)) % len(KINDS)]} {w}",
                              "description": f"a {w} product", "category": w.title(), "aisle": "Aisle " + w[0]}
                             for i, w in enumerate(WORDS * 5)])
    queries = [f"{k} {w}" for w in WORDS for k in KINDS[:2]] + WORDS
    log = pd.DataFrame({"query": rng.choice(queries, 60), "product_id": rng.choice(products["product_id"], 60)})
    text = {r["product_id"]: ". ".join((r["title"], r["description"], r["category"], r["aisle"])) for r in products.to_dict("records")}
    rows = []
    for i, q in enumerate(queries):
        for pid in rng.choice(products["product_id"], 8, replace=False):
            rows.append({"query": q, "product_id": pid, "label": fake.overlap_grader(q, text[pid]),
                         "split": "eval" if i % 6 == 5 else "train"})
    return products, log, pd.DataFrame(rows)


def config(tiny_config, tmp_path, **labeling) -> PipelineConfig:
    overrides = {"candidates_per_query": 8, "random_candidates_per_query": 2, **labeling}
    return PipelineConfig.from_file(tiny_config).with_overrides(
        **{f"labeling.{k}": v for k, v in overrides.items()}, **{"storage.cache_dir": str(tmp_path / "cache")})


def llm_config(tiny_config, tmp_path, **labeling) -> PipelineConfig:
    return config(tiny_config, tmp_path, labeler="openai", llm_model="gpt-test", llm_backoff_s=0.0, label_chunk_size=50,
                  **labeling)


@pytest.fixture()
def llm():
    with fake.FakeOpenAIServer(api_key=KEY) as srv:
        yield srv


def test_softmax_step_writes_labels_and_reports(tiny_config, tmp_path):
    # Given the default offline teacher and a callback standing in for the task's MLflow logging
    cfg = config(tiny_config, tmp_path)
    products, log, human = snapshot()
    out = Labels(tmp_path / "step")
    seen = []

    def on_teacher_scored(quality: dict) -> None:
        seen.append((quality["labeler_id"], out.teacher_quality.exists(), out.teacher_confusion_png.exists(), out.labels.exists()))

    # When the step runs
    outcome = run_labeling(cfg, products, log, human, out.dir, on_teacher_scored=on_teacher_scored)
    # Then the report files were there for the callback before any label was written
    assert seen == [(outcome.labeler_id, True, True, False)]
    assert outcome.labeler_id.startswith("minilm-softmax-v1:")
    # and the step folder holds every file of the layout, and nothing else
    assert set(outcome.files) == {out.labels, out.teacher_report, out.teacher_quality, out.teacher_confusion_png,
                                  out.labeling_summary}
    assert {p.name for p in out.dir.iterdir()} == {p.name for p in outcome.files}
    labels = pd.read_parquet(out.labels)
    teacher = labels[labels["source"] == "teacher"]
    assert len(labels) == outcome.n_labels == outcome.n_human_labels + outcome.n_teacher_labels
    assert outcome.n_human_labels == len(human) and outcome.n_failed == 0 and len(teacher) > 50
    assert not set(teacher["query"]) & set(human.loc[human["split"] == "eval", "query"])  # no eval leakage
    report = read_json(out.teacher_report)
    assert report["labeler"] == outcome.labeler_id and report["n_holdout"] == outcome.quality["n_holdout"] > 0
    assert outcome.quality["accuracy"] >= cfg.labeling.min_teacher_accuracy
    assert set(outcome.summary()) == SUMMARY_KEYS
    assert set(outcome.metrics()) == {"labels/n", "labels/cache_hit_rate", "labels/tokens", "labels/cost_usd", "labels/failed"}
    assert read_json(out.labeling_summary)["n_requested"] == outcome.n_teacher_labels


def test_llm_step_grades_exactly_and_a_rerun_pays_nothing(tiny_config, tmp_path, llm):
    cfg = llm_config(tiny_config, tmp_path)
    products, log, human = snapshot()
    endpoint = LLMEndpoint(llm.base_url, KEY)
    first = run_labeling(cfg, products, log, human, tmp_path / "run1", endpoint=endpoint)
    assert first.labeler_id == "openai:gpt-test:relevance-v1" and first.quality["accuracy"] == 1.0
    assert first.streaming.tokens > 0
    text = {r["product_id"]: ". ".join((r["title"], r["description"], r["category"], r["aisle"])) for r in products.to_dict("records")}
    teacher = pd.read_parquet(Labels(tmp_path / "run1").labels).query("source == 'teacher'")
    assert all(row.label == fake.overlap_grader(row.query, text[row.product_id]) for row in teacher.itertuples())
    # When the same snapshot is labelled again (another run, the same cache)
    n_chat = llm.count("chat")
    again = run_labeling(cfg, products, log, human, tmp_path / "run2", endpoint=endpoint)
    # Then nothing is sent and the labels are the same
    assert llm.count("chat") == n_chat and again.streaming.cache_hit_rate == 1.0 and again.streaming.tokens == 0
    assert again.summary() | {"cache_hit_rate": None, "tokens": None} == first.summary() | {"cache_hit_rate": None, "tokens": None}


def test_dry_run_carries_the_estimate_and_sends_nothing(tiny_config, tmp_path, llm):
    cfg = llm_config(tiny_config, tmp_path, dry_run=True, price_per_1k_input=0.15, price_per_1k_output=0.6, max_cost_usd=0.01)
    with pytest.raises(DryRunEstimate) as err:
        run_labeling(cfg, *snapshot(), tmp_path / "step", endpoint=LLMEndpoint(llm.base_url, KEY))
    assert llm.requests == []
    assert err.value.estimate.startswith("dry run with openai:gpt-test:relevance-v1: teacher scoring (held-out): ")
    assert "EXCEEDS the budget" in err.value.estimate
    assert str(err.value).startswith("labeling.dry_run: dry run with") and "set labeling.dry_run false" in str(err.value)
    assert not (tmp_path / "step").exists() or not any((tmp_path / "step").iterdir())


def test_offline_dry_run_fits_nothing(tiny_config, tmp_path):
    cfg = config(tiny_config, tmp_path, dry_run=True, teacher_encoder="/no/such/encoder")  # building it would raise
    with pytest.raises(DryRunEstimate, match=r"the offline softmax teacher would be fitted, scored on \d+ held-out pairs"):
        run_labeling(cfg, *snapshot(), tmp_path / "step")


def test_held_out_scoring_over_budget_sends_nothing(tiny_config, tmp_path, llm):
    cfg = llm_config(tiny_config, tmp_path, max_tokens=100)
    with pytest.raises(HoldoutOverBudget, match=r"scoring the teacher on \d+ held-out human labels does not fit the budget "
                                                r".*lower labeling.teacher_holdout_max_pairs"):
        run_labeling(cfg, *snapshot(), tmp_path / "step", endpoint=LLMEndpoint(llm.base_url, KEY))
    assert llm.count("chat") == 0


def test_budget_stops_the_candidates_and_keeps_what_was_paid_for(tiny_config, tmp_path, llm):
    # Given a token limit the held-out scoring fits (by its estimate) but the candidates do not
    products, log, human = snapshot()
    lc = llm_config(tiny_config, tmp_path).labeling
    _, held_out = split_human_labels(human, lc.teacher_holdout_fraction, 0, lc.teacher_holdout_max_pairs)
    held_out_tokens = sum(sum(Budget().estimate(r)) for r in requests_for(held_out, products))
    cfg = llm_config(tiny_config, tmp_path, max_tokens=held_out_tokens + 2_000)
    # When the step runs
    with pytest.raises(StoppedByBudget, match=r"stopped by budget after .* raise labeling.max_tokens") as err:
        run_labeling(cfg, products, log, human, tmp_path / "step", endpoint=LLMEndpoint(llm.base_url, KEY))
    # Then the teacher report is in the step folder, no labels are, and the paid candidate grades are in the store
    assert err.value.summary.stopped_by_budget and isinstance(err.value, LabelingError)
    assert Labels(tmp_path / "step").teacher_quality.exists() and not Labels(tmp_path / "step").labels.exists()
    stored = LabelStore(cfg.cache_dir() / "labels" / "store").read("openai:gpt-test:relevance-v1")
    assert len(stored) > 0 and (stored["status"] == "ok").all()  # the candidates labelled before the limit
    assert sum(b.prompt_tokens + b.completion_tokens for b in llm.billed) <= cfg.labeling.max_tokens


def test_too_many_failed_pairs_names_the_store(tiny_config, tmp_path, llm):
    # Given an LLM that refuses every pair and a gate that lets any teacher through
    llm.fault_rate(1.0, seed=0, faults=[fake.Fault.refusal()])
    cfg = llm_config(tiny_config, tmp_path, llm_max_retries=0, max_failed_fraction=0.5, min_teacher_accuracy=0.0,
                     min_teacher_kappa=0.0)
    with pytest.raises(TooManyFailedPairs) as err:
        run_labeling(cfg, *snapshot(), tmp_path / "step", endpoint=LLMEndpoint(llm.base_url, KEY))
    assert err.value.n_failed == err.value.n_candidates > 0
    assert err.value.store_dir == cfg.cache_dir() / "labels" / "store"
    assert f"see the store {err.value.store_dir}" in str(err.value) and "labeling.max_failed_fraction 0.5" in str(err.value)
    assert not Labels(tmp_path / "step").labels.exists()


def changed_product(cfg: PipelineConfig, human: pd.DataFrame, teacher: pd.DataFrame) -> str:
    """A product the teacher graded that no held-out human pair names (so the teacher's scoring stays cached)."""
    lc = cfg.labeling
    _, held_out = split_human_labels(human, lc.teacher_holdout_fraction, cfg.catalog.seed, lc.teacher_holdout_max_pairs)
    return min(set(teacher["product_id"]) - set(held_out["product_id"]))


@pytest.mark.parametrize("max_failed_fraction", [0.0, 0.5])
def test_changed_product_text_whose_regrade_fails_is_a_failed_pair_not_the_old_label(tiny_config, tmp_path, llm,
                                                                                      max_failed_fraction):
    # Given a snapshot labelled once by the LLM
    cfg = llm_config(tiny_config, tmp_path, llm_max_retries=0, max_failed_fraction=max_failed_fraction)
    products, log, human = snapshot()
    endpoint = LLMEndpoint(llm.base_url, KEY)
    run_labeling(cfg, products, log, human, tmp_path / "run1", endpoint=endpoint)
    first = pd.read_parquet(Labels(tmp_path / "run1").labels).query("source == 'teacher'")
    pid = changed_product(cfg, human, first)
    # When that product's title changes and the LLM fails every pair it is sent (only the changed text misses the cache)
    changed = products.assign(title=products["title"].where(products["product_id"] != pid, "discontinued item"))
    cands = candidate_pairs(changed, log, human, cfg.labeling, seed=cfg.catalog.seed)
    graded = set(zip(first["query"], first["product_id"]))
    pairs = set(zip(cands["query"], cands["product_id"]))
    stale = {(q, p) for q, p in pairs & graded if p == pid}
    assert stale  # pairs graded on the old title that are candidates again
    expected_failed = stale | (pairs - graded)  # every pair without a grade on its current text (BM25 moved a few)
    llm.fault_rate(1.0, seed=0, faults=[fake.Fault.refusal()])
    n_billed = len(llm.billed)
    if max_failed_fraction == 0.0:
        # Then the failures count toward labeling.max_failed_fraction (HEAD reused the old title's grades)
        with pytest.raises(TooManyFailedPairs) as err:
            run_labeling(cfg, changed, log, human, tmp_path / "run2", endpoint=endpoint)
        assert err.value.n_failed == len(expected_failed)
    else:
        outcome = run_labeling(cfg, changed, log, human, tmp_path / "run2", endpoint=endpoint)
        second = pd.read_parquet(Labels(tmp_path / "run2").labels).query("source == 'teacher'")
        # Then no grade of the old title survives for the changed product, and its pairs are counted failed
        assert not set(zip(second["query"], second["product_id"])) & stale and outcome.n_failed == len(expected_failed)
        assert len(second) == len(cands) - len(expected_failed)
    title = dict(zip(changed["product_id"], changed["title"]))
    sent = {(b.query, b.title) for b in llm.billed[n_billed:]}
    assert sent == {(q, title[p]) for q, p in expected_failed}  # cache misses: exactly the pairs without a current grade
