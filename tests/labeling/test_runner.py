"""label_pairs_streaming: cache hits are free, budget stops keep everything, failures are retried, dry runs write nothing."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import pytest

from dashclip_core.labeling.base import Labeler, LabelRequest, LabelResult
from dashclip_core.labeling.budget import OUTPUT_TOKENS_PER_PAIR, Budget, estimate_tokens
from dashclip_core.labeling.cache import LabelCache
from dashclip_core.labeling.runner import label_pairs_streaming
from dashclip_core.labeling.store import LabelStore

LID = "openai:gpt-4o-mini:relevance-v1"
N = 5000
_WORD = re.compile(r"[a-z0-9]+")


class OverlapLabeler:
    """A real Labeler: grades by word overlap, records every call and pair, reports tokens like an LLM would.

    Args:
        fail_ids: product_ids it answers with a failed result (a malformed answer).
        drop_ids: product_ids it silently gives no result for.
        token_factor: reported tokens = estimate_tokens x factor (1.0: the runner's estimate is exact).
        crash_on_call: raise on this call number (1-based), as a dead network would.
    """

    def __init__(self, labeler_id: str = LID, fail_ids: Iterable[str] = (), drop_ids: Iterable[str] = (),
                 token_factor: float = 1.0, crash_on_call: int | None = None) -> None:
        self.labeler_id = labeler_id
        self.fail_ids, self.drop_ids = set(fail_ids), set(drop_ids)
        self.token_factor = token_factor
        self.crash_on_call = crash_on_call
        self.calls = 0
        self.sent: list[tuple[str, str]] = []

    def label(self, requests: Iterable[LabelRequest]) -> Iterator[LabelResult]:
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise ConnectionError("labeler unreachable")
        requests = list(requests)
        self.sent += [(r.query, r.product_id) for r in requests]
        return iter([res for r in requests if (res := self._grade(r)) is not None])

    def _grade(self, r: LabelRequest) -> LabelResult | None:
        tin = int(estimate_tokens(r) * self.token_factor)
        tout = int(OUTPUT_TOKENS_PER_PAIR * self.token_factor)
        if r.product_id in self.drop_ids:
            return None
        if r.product_id in self.fail_ids:
            return LabelResult(r.query, r.product_id, None, "failed", self.labeler_id, "malformed answer", tin, 0)
        q = set(_WORD.findall(r.query.lower()))
        share = len(q & set(_WORD.findall((r.title or "").lower()))) / max(1, len(q))
        label = 2 if share >= 0.5 else 1 if share > 0 else 0
        return LabelResult(r.query, r.product_id, label, "ok", self.labeler_id, f"overlap {share:.2f}", tin, tout)


def pairs(n: int = N) -> Iterator[LabelRequest]:
    """n distinct pairs: 100 queries x products with distinct titles (a generator, as the DAG streams them)."""
    words = ["milk", "bread", "apple", "oat", "cheese", "organic", "whole", "snack"]
    for i in range(n):
        q = f"{words[i % 8]} {words[(i // 8) % 8]} {i % 100}"
        yield LabelRequest(q, f"p{i}", title=f"{words[(i * 7) % 8]} item {i}", description=f"pack of {i % 12}",
                           category="grocery", aisle=words[i % 5])


def total_estimate(reqs: Iterable[LabelRequest]) -> int:
    return sum(estimate_tokens(r) + OUTPUT_TOKENS_PER_PAIR for r in reqs)


@pytest.fixture()
def env(tmp_path):
    cache = LabelCache(tmp_path / "cache" / "labels.sqlite")
    yield cache, LabelStore(tmp_path / "labels")
    cache.close()


def test_overlap_labeler_implements_the_protocol():
    assert isinstance(OverlapLabeler(), Labeler)


def test_second_run_is_all_cache_hits_and_never_calls_the_labeler(env):
    cache, store = env
    first = OverlapLabeler()
    s1 = label_pairs_streaming(pairs(), first, cache, store, chunk_size=1000)
    assert (s1.n_requested, s1.n_labelled, s1.n_cached, s1.n_failed, s1.n_chunks) == (N, N, 0, 0, 5)
    assert first.calls == 5 and len(first.sent) == N and s1.tokens == total_estimate(pairs())
    assert cache.stats().n_entries == N and len(store.parts(LID)) == 5

    again = OverlapLabeler()
    s2 = label_pairs_streaming(pairs(), again, cache, store, chunk_size=1000)
    assert again.calls == 0 and again.sent == []
    assert (s2.n_cached, s2.n_labelled, s2.cache_hit_rate, s2.tokens, s2.stopped_by_budget) == (N, 0, 1.0, 0, False)
    # The second run's rows are in the store too (marked cached); dedupe leaves one row per pair with the same label.
    raw = store.read(dedupe=False)
    assert len(raw) == 2 * N and raw["cached"].sum() == N
    labels = store.read()
    assert len(labels) == N and labels["status"].eq("ok").all()
    first_labels = raw[~raw["cached"]].set_index("product_id")["label"]
    assert (labels.set_index("product_id")["label"].sort_index() == first_labels.sort_index()).all()


def test_budget_stop_keeps_labels_and_a_rerun_labels_only_the_rest(env):
    cache, store = env
    limit = int(0.45 * total_estimate(pairs()))  # runs out inside the third chunk
    budget = Budget(max_tokens=limit)
    first = OverlapLabeler()
    s1 = label_pairs_streaming(pairs(), first, cache, store, budget=budget, chunk_size=1000)

    assert s1.stopped_by_budget and "token limit" in s1.message and f"{limit:,}" in s1.message
    assert "re-run" in s1.message
    assert budget.spent_tokens <= limit and s1.tokens == budget.spent_tokens
    assert 2000 < s1.n_labelled < 3000 and s1.n_skipped == s1.n_requested - s1.n_labelled > 0
    assert s1.n_requested == 3000  # the input after the stopping chunk is not read
    # Everything labelled so far is kept in the store and in the cache.
    stored = store.read()
    assert len(stored) == s1.n_labelled == cache.stats().n_entries == len(first.sent)
    assert set(zip(stored["query"], stored["product_id"])) == set(first.sent)

    more = Budget(max_tokens=10 * limit)
    second = OverlapLabeler()
    s2 = label_pairs_streaming(pairs(), second, cache, store, budget=more, chunk_size=1000)
    assert not s2.stopped_by_budget and s2.n_cached == s1.n_labelled and s2.n_labelled == N - s1.n_labelled
    assert set(second.sent).isdisjoint(first.sent) and len(set(second.sent) | set(first.sent)) == N
    assert len(store.read()) == N and cache.stats().n_entries == N


def test_budget_reached_exactly_on_the_last_chunk_is_not_a_stop(env):
    cache, store = env
    budget = Budget(max_tokens=total_estimate(pairs()))
    s = label_pairs_streaming(pairs(), OverlapLabeler(), cache, store, budget=budget, chunk_size=1000)
    assert budget.exhausted and not s.stopped_by_budget and s.n_labelled == N


def test_cost_budget_stops_too(env):
    cache, store = env
    budget = Budget(max_cost_usd=0.05, price_per_1k_input=0.00015, price_per_1k_output=0.0006)  # gpt-4o-mini list prices
    s = label_pairs_streaming(pairs(), OverlapLabeler(), cache, store, budget=budget, chunk_size=500)
    assert s.stopped_by_budget and "cost limit $0.0500" in s.message
    assert 0 < s.n_labelled < N and s.cost_usd == pytest.approx(budget.spent_cost_usd) and s.cost_usd <= 0.05


def test_estimates_are_corrected_by_the_tokens_the_labeler_reports(env):
    # The labeler reports twice the estimated tokens. After the first chunk the runner scales its estimates,
    # so only the first chunk can be under-estimated and the spend stays within the limit.
    cache, store = env
    limit = int(0.5 * total_estimate(pairs()))
    budget = Budget(max_tokens=limit)
    s = label_pairs_streaming(pairs(), OverlapLabeler(token_factor=2.0), cache, store, budget=budget, chunk_size=500)
    assert s.stopped_by_budget and budget.spent_tokens <= limit
    assert budget.spent_tokens > 0.9 * limit  # and the budget is still used, not abandoned early


def test_failed_pairs_are_stored_as_failed_not_cached_and_retried(env):
    cache, store = env
    fail = {f"p{i}" for i in range(0, N, 10)}
    s1 = label_pairs_streaming(pairs(), OverlapLabeler(fail_ids=fail), cache, store, chunk_size=1000)
    assert (s1.n_failed, s1.n_labelled) == (len(fail), N - len(fail))
    failed = store.read().query("status == 'failed'")
    assert set(failed["product_id"]) == fail and failed["label"].isna().all() and set(failed["reason"]) == {"malformed answer"}
    assert cache.stats().n_entries == N - len(fail)

    retry = OverlapLabeler()
    s2 = label_pairs_streaming(pairs(), retry, cache, store, chunk_size=1000)
    assert {p for _, p in retry.sent} == fail and (s2.n_labelled, s2.n_cached) == (len(fail), N - len(fail))
    final = store.read()
    assert len(final) == N and final["status"].eq("ok").all() and final["label"].notna().all()
    assert cache.stats().n_entries == N


def test_a_pair_without_an_answer_is_recorded_as_failed(env):
    cache, store = env
    s = label_pairs_streaming(pairs(20), OverlapLabeler(drop_ids={"p3"}), cache, store, chunk_size=8)
    assert s.n_failed == 1 and s.n_labelled == 19
    row = store.read().query("product_id == 'p3'").iloc[0]
    assert row["status"] == "failed" and "no result" in row["reason"]


def test_results_under_another_labeler_id_are_refused(env):
    cache, store = env

    class Impostor(OverlapLabeler):
        def _grade(self, r):
            return LabelResult(r.query, r.product_id, 1, "ok", "someone-else")

    with pytest.raises(ValueError, match="someone-else"):
        label_pairs_streaming(pairs(10), Impostor(), cache, store)
    assert cache.stats().n_entries == 0 and store.parts() == []


def test_a_crash_keeps_finished_chunks_and_the_rerun_pays_only_for_the_rest(env):
    cache, store = env
    crashing = OverlapLabeler(crash_on_call=3)
    with pytest.raises(ConnectionError):
        label_pairs_streaming(pairs(), crashing, cache, store, chunk_size=1000)
    assert len(store.read()) == 2000 and cache.stats().n_entries == 2000

    rerun = OverlapLabeler()
    s = label_pairs_streaming(pairs(), rerun, cache, store, chunk_size=1000)
    assert s.n_cached == 2000 and len(rerun.sent) == N - 2000 and set(rerun.sent).isdisjoint(crashing.sent)


def test_dry_run_estimates_and_writes_nothing(env):
    cache, store = env
    label_pairs_streaming(pairs(1000), OverlapLabeler(), cache, store, chunk_size=1000)
    parts_before, entries_before = store.parts(), cache.stats().n_entries

    labeler = OverlapLabeler()
    budget = Budget(max_tokens=1000, price_per_1k_input=0.15, price_per_1k_output=0.6)
    s = label_pairs_streaming(pairs(), labeler, cache, store, budget=budget, chunk_size=700, dry_run=True)
    assert labeler.calls == 0 and store.parts() == parts_before and cache.stats().n_entries == entries_before
    assert budget.spent_tokens == 0
    est = s.estimate
    assert s.dry_run and (est.n_pairs, est.n_cached, est.n_to_label) == (N, 1000, N - 1000)
    assert est.est_input_tokens + est.est_output_tokens == total_estimate(list(pairs())[1000:])
    assert est.est_cost_usd == pytest.approx(est.est_input_tokens * 0.15e-3 + est.est_output_tokens * 0.6e-3)
    assert (s.n_requested, s.n_cached, s.n_labelled) == (N, 1000, 0)
    assert "dry run" in s.message and "EXCEEDS the budget" in s.message and "token limit 1,000" in s.message


def test_products_with_the_same_text_are_labelled_once(env):
    cache, store = env
    same = [LabelRequest("oat milk", pid, title="Oat Milk 1 l", category="dairy") for pid in ("a", "b", "c")]
    labeler = OverlapLabeler()
    s = label_pairs_streaming(same + [LabelRequest("oat milk", "d", title="Bread")], labeler, cache, store)
    assert len(labeler.sent) == 2 and s.n_sent == 2 and s.n_labelled == 4
    stored = store.read().set_index("product_id")
    assert stored.loc[["a", "b", "c"], "label"].tolist() == [2, 2, 2]
    assert stored["input_tokens"].astype(bool).sum() == 2  # tokens are counted once per distinct request
    # A new product with that text, in a later run, is a cache hit.
    later = OverlapLabeler()
    s2 = label_pairs_streaming([LabelRequest("oat milk", "e", title="Oat Milk 1 l", category="dairy")], later, cache, store)
    assert later.calls == 0 and s2.n_cached == 1 and store.read().set_index("product_id").loc["e", "label"] == 2


def test_progress_is_reported_per_chunk_and_chunk_size_is_checked(env):
    cache, store = env
    seen = []
    label_pairs_streaming(pairs(2500), OverlapLabeler(), cache, store, chunk_size=1000,
                          progress=lambda s: seen.append(s.n_requested))
    assert seen == [1000, 2000, 2500]
    with pytest.raises(ValueError, match="chunk_size"):
        label_pairs_streaming(pairs(1), OverlapLabeler(), cache, store, chunk_size=0)
