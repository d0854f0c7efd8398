"""labeling/pipeline.py: requests from pairs, the human split, the cached scorer, the resumable Batch API labeler."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import dashclip_tests_openai_server as fake  # tests/labeling/openai_server.py, registered by tests/conftest.py
import pandas as pd
import pytest

from dashclip_core.config import LabelingConfig
from dashclip_core.labeling.base import LabelRequest, LabelResult
from dashclip_core.labeling.cache import LabelCache
from dashclip_core.labeling.pipeline import (
    BatchAPILabeler,
    CachedLabeler,
    LLMEndpoint,
    budget_for,
    build_labeler,
    ok_labels,
    requests_for,
    split_human_labels,
)
from dashclip_core.labeling.store import LabelStore

PRODUCTS = pd.DataFrame({
    "product_id": ["p1", "p2", "p3"],
    "title": ["Oat Milk", "Gala Apples", None],
    "description": ["Creamy oat drink", None, "Lemon dish soap"],
    "category": ["Milk", "Apple", "Cleaning"],
    "aisle": ["Dairy", "Fruit", "Household"],
})


class CountingLabeler:
    labeler_id = "counting-v1"

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def label(self, requests: Iterable[LabelRequest]) -> Iterator[LabelResult]:
        for r in requests:
            self.sent.append((r.query, r.product_id))
            ok = r.product_id != "p3"
            yield LabelResult(r.query, r.product_id, 2 if ok else None, "ok" if ok else "failed", self.labeler_id,
                              reason=None if ok else "malformed", input_tokens=10, output_tokens=5)


def test_requests_carry_every_product_field_and_bad_ids_name_the_row():
    pairs = pd.DataFrame({"query": ["oat milk", "soap"], "product_id": ["p1", "p3"]})
    first, second = list(requests_for(pairs, PRODUCTS))
    assert first == LabelRequest("oat milk", "p1", "Oat Milk", "Creamy oat drink", "Milk", "Dairy")
    assert second.title is None and second.description == "Lemon dish soap"
    bad = pd.DataFrame({"query": ["oat milk", "tea"], "product_id": ["p1", "p9"]})
    with pytest.raises(ValueError, match=r"pair row 1: product_id 'p9' \(query 'tea'\)"):
        list(requests_for(bad, PRODUCTS))


def test_human_split_is_by_query_and_uses_train_rows_only():
    human = pd.DataFrame({"query": [f"q{i // 3}" for i in range(60)], "product_id": "p1", "label": 1,
                          "split": ["train"] * 54 + ["eval"] * 6})
    fit, held = split_human_labels(human, 0.25, seed=0)
    assert len(fit) + len(held) == 54 and len(held) > 0
    assert not set(fit["query"]) & set(held["query"])
    _, capped = split_human_labels(human, 0.25, seed=0, max_holdout=5)
    assert len(capped) == 5 and set(capped["query"]) <= set(held["query"])
    with pytest.raises(ValueError, match="teacher_holdout_fraction"):
        split_human_labels(human, 1.0, seed=0)


def test_cached_labeler_pays_each_pair_once_and_never_caches_failures(tmp_path):
    inner = CountingLabeler()
    requests = list(requests_for(pd.DataFrame({"query": ["oat milk"] * 3, "product_id": ["p1", "p2", "p3"]}), PRODUCTS))
    with LabelCache(tmp_path / "c.sqlite") as cache:
        first = list(CachedLabeler(inner, cache).label(requests))
        again = CachedLabeler(inner, cache)
        second = list(again.label(requests))
    assert len(first) == len(second) == 3
    # p1, p2 answered from the cache the second time; p3 failed, so it is asked again
    assert inner.sent == [("oat milk", "p1"), ("oat milk", "p2"), ("oat milk", "p3"), ("oat milk", "p3")]
    assert again.n_cached == 2
    assert {r.product_id: r.cached for r in second} == {"p1": True, "p2": True, "p3": False}
    assert all(r.input_tokens == 0 for r in second if r.cached)


def test_batch_labeler_resumes_the_batch_it_already_submitted(tmp_path):
    from dashclip_core.labeling.openai_backend import OpenAICompatibleLabeler

    requests = list(requests_for(pd.DataFrame({"query": ["oat milk", "apples"], "product_id": ["p1", "p2"]}), PRODUCTS))
    with fake.FakeOpenAIServer(api_key="sk-b", batch_polls=1) as srv:
        client = OpenAICompatibleLabeler(srv.base_url, "gpt-test", "sk-b", backoff_base=0.0)
        # Given a task that submitted a batch and died before reading all of its results
        interrupted = BatchAPILabeler(client, tmp_path, 0.01, 10.0).label(requests)
        next(interrupted)
        interrupted.close()
        # When the retried task labels the same pairs (in another order, with a fresh labeler object)
        resumed = {(r.query, r.product_id): r.label for r in BatchAPILabeler(client, tmp_path, 0.01, 10.0).label(reversed(requests))}
        # Then it polls the batch it already paid for instead of submitting it again
        assert srv.count("batches_create") == 1 and srv.count("files_upload") == 1
        assert resumed == {("oat milk", "p1"): 2, ("apples", "p2"): 2}
        # and once that batch was read, the same pairs sent again (as failed pairs would be) go out in a new batch
        list(BatchAPILabeler(client, tmp_path, 0.01, 10.0).label(requests))
        assert srv.count("batches_create") == 2
    assert len(list(tmp_path.glob("batch-*.json"))) == 1


def test_fine_tune_runs_once_per_training_set_and_its_model_grades(tmp_path):
    human = pd.DataFrame({"query": ["oat milk", "apples", "soap"], "product_id": ["p1", "p2", "p3"], "label": [2, 2, 0]})
    cfg = LabelingConfig(labeler="openai", llm_model="gpt-base", llm_fine_tune=True, llm_batch_poll_s=0.01, llm_backoff_s=0.0)
    with fake.FakeOpenAIServer(api_key="sk-f", fine_tune_polls=1) as srv:
        endpoint = LLMEndpoint(srv.base_url, "sk-f")
        first = build_labeler(cfg, human, PRODUCTS, seed=0, endpoint=endpoint, state_dir=tmp_path)
        again = build_labeler(cfg, human, PRODUCTS, seed=0, endpoint=endpoint, state_dir=tmp_path)
        assert srv.count("ft_create") == 1  # the second build reuses the fine-tuned model
        other = build_labeler(cfg, human.assign(label=[2, 1, 0]), PRODUCTS, seed=0, endpoint=endpoint, state_dir=tmp_path)
        assert srv.count("ft_create") == 2  # other human labels: another fine-tune
        upload = srv.of("files_upload")[0].body
    assert first.model == again.model == other.model and first.model.startswith("ft:")  # the fake names every job alike
    assert first.labeler_id == f"openai:{first.model}:relevance-v1"
    assert "oat milk" in str(upload)  # the training file holds the human labels


def test_ok_labels_keeps_the_latest_ok_grade_and_counts_pairs_that_only_failed(tmp_path):
    store = LabelStore(tmp_path / "store")
    lid = "counting-v1"
    store.append([LabelResult("q", "p1", None, "failed", lid, reason="timeout"),
                  LabelResult("q", "p2", None, "failed", lid, reason="malformed")], partition=lid)
    store.append([LabelResult("q", "p1", 1, "ok", lid)], partition=lid)
    labels, n_failed = ok_labels(store, lid)
    assert labels.to_dict("records") == [{"query": "q", "product_id": "p1", "label": 1}]
    assert n_failed == 1


def test_budget_only_for_llms_or_explicit_limits_and_unknown_kinds_raise():
    assert budget_for(LabelingConfig()) is None
    assert budget_for(LabelingConfig(labeler="openai")).max_tokens is None  # prices the run, no limit
    assert budget_for(LabelingConfig(max_cost_usd=5.0, price_per_1k_input=0.1)).max_cost_usd == 5.0
    with pytest.raises(ValueError, match="labeling.labeler must be one of"):
        build_labeler(LabelingConfig(labeler="gpt"), pd.DataFrame(), PRODUCTS, seed=0)
    with pytest.raises(ValueError, match="needs an API base URL"):
        build_labeler(LabelingConfig(labeler="openai", llm_model="m"), pd.DataFrame(), PRODUCTS, seed=0)
