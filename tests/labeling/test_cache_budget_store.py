"""Label cache (keys, round trip, failures, WAL across processes), budget (charge, limits, estimates), parquet store."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from dashclip_core.labeling.base import LabelRequest, LabelResult
from dashclip_core.labeling.budget import (
    PROMPT_OVERHEAD_TOKENS,
    Budget,
    BudgetExhausted,
    estimate_cost,
    estimate_tokens,
)
from dashclip_core.labeling.cache import LabelCache
from dashclip_core.labeling.store import COLUMNS, LabelStore

LID = "openai:gpt-4o-mini:relevance-v1"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _requests(n: int, prefix: str = "p") -> list[LabelRequest]:
    return [LabelRequest(f"query {i % 50}", f"{prefix}{i}", title=f"product {prefix}{i}", description=f"desc {i}",
                         category="dairy", aisle="milk") for i in range(n)]


def _ok(r: LabelRequest, label: int = 2, labeler_id: str = LID, tokens: tuple[int, int] = (100, 10)) -> LabelResult:
    return LabelResult(r.query, r.product_id, label, "ok", labeler_id, f"reason {r.product_id}", *tokens)


def _failed(r: LabelRequest, labeler_id: str = LID) -> LabelResult:
    return LabelResult(r.query, r.product_id, None, "failed", labeler_id, "malformed answer", 90, 0)


# ---- cache ------------------------------------------------------------------------------------------------------


def test_cache_round_trip_in_batches(tmp_path):
    # Given 5000 ok results (more than one SQL IN batch)
    reqs = _requests(5000)
    results = [_ok(r, label=i % 3, tokens=(100 + i, 7)) for i, r in enumerate(reqs)]
    with LabelCache(tmp_path / "cache" / "labels.sqlite") as cache:
        # When they are put and read back
        assert cache.put_many(results, reqs) == 5000
        got = cache.get_many(reqs, LID)
        # Then every one comes back with its label, reason and tokens, marked cached
        assert len(got) == 5000
        for r, res in zip(reqs, results):
            hit = got[LabelCache.key(r, LID)]
            assert (hit.query, hit.product_id, hit.label, hit.reason) == (r.query, r.product_id, res.label, res.reason)
            assert (hit.input_tokens, hit.output_tokens, hit.cached, hit.status) == (res.input_tokens, 7, True, "ok")
        stats = cache.stats()
        assert stats.n_entries == 5000 and stats.n_by_labeler == {LID: 5000}
        assert stats.hits == 5000 and stats.misses == 0 and stats.writes == 5000
        # and a different labeler misses everything
        assert cache.get_many(reqs[:10], "openai:gpt-4o-mini:relevance-v2") == {}


def test_cache_key_depends_on_what_the_labeler_sees_and_who_labels():
    r = LabelRequest("oat milk", "p1", title="Oat Drink", description="1 l", category="dairy", aisle="milk")
    k = LabelCache.key(r, LID)
    assert len(k) == 64 and k == LabelCache.key(r, LID)
    changed = [
        LabelCache.key(r, "openai:gpt-4o-mini:relevance-v2"),  # prompt version
        LabelCache.key(r, "openai:gpt-4o:relevance-v1"),  # model
        LabelCache.key(LabelRequest("oat milks", "p1", "Oat Drink", "1 l", "dairy", "milk"), LID),
        LabelCache.key(LabelRequest("oat milk", "p1", "Oat Drink 2", "1 l", "dairy", "milk"), LID),
        LabelCache.key(LabelRequest("oat milk", "p1", "Oat Drink", "1.5 l", "dairy", "milk"), LID),
        LabelCache.key(LabelRequest("oat milk", "p1", "Oat Drink", "1 l", "drinks", "milk"), LID),
        LabelCache.key(LabelRequest("oat milk", "p1", "Oat Drink", "1 l", "dairy", "plant milk"), LID),
        # field boundaries matter: the same characters split differently are another product
        LabelCache.key(LabelRequest("oat milk", "p1", "Oat", "Drink 1 l", "dairy", "milk"), LID),
    ]
    assert len(set(changed)) == len(changed) and k not in changed
    # The product_id is not part of the key (same text, same grade), and None reads as "" like in a prompt.
    assert LabelCache.key(LabelRequest("oat milk", "p2", "Oat Drink", "1 l", "dairy", "milk"), LID) == k
    assert LabelCache.key(LabelRequest("q", "p", "t", None), LID) == LabelCache.key(LabelRequest("q", "p", "t", " "), LID)


def test_failed_and_cached_results_are_not_cached(tmp_path):
    reqs = _requests(4)
    with LabelCache(tmp_path / "labels.sqlite") as cache:
        cached_hit = LabelResult(reqs[3].query, reqs[3].product_id, 1, "ok", LID, cached=True)
        written = cache.put_many([_ok(reqs[0]), _failed(reqs[1]), _failed(reqs[2]), cached_hit], reqs)
        assert written == 1
        got = cache.get_many(reqs, LID)
        assert set(got) == {LabelCache.key(reqs[0], LID)}
        assert cache.stats().misses == 3


def test_first_label_of_a_key_wins(tmp_path):
    r = _requests(1)[0]
    with LabelCache(tmp_path / "labels.sqlite") as cache:
        assert cache.put_many([_ok(r, label=2)], [r]) == 1
        assert cache.put_many([_ok(r, label=0)], [r]) == 0
        assert cache.get_many([r], LID)[LabelCache.key(r, LID)].label == 2


def test_put_many_needs_the_matching_request(tmp_path):
    a, b = _requests(2)
    with LabelCache(tmp_path / "labels.sqlite") as cache, pytest.raises(ValueError, match="no matching request"):
        cache.put_many([_ok(a)], [b])


def test_cache_is_wal_and_shared_by_connections_and_processes(tmp_path):
    path = tmp_path / "labels.sqlite"
    reqs = _requests(3000)
    with LabelCache(path) as writer, LabelCache(path) as reader:
        assert writer._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # A reader holding an open snapshot does not block the writer.
        reader._conn.execute("BEGIN")
        assert reader.get_many(reqs[:5], LID) == {}
        writer.put_many([_ok(r) for r in reqs[:1000]], reqs[:1000])
        reader._conn.execute("COMMIT")
        assert len(reader.get_many(reqs[:1000], LID)) == 1000

    # Two processes write overlapping halves at the same time; nothing is lost and nothing fails.
    script = textwrap.dedent(f"""
        import sys
        from dashclip_core.labeling.base import LabelRequest, LabelResult
        from dashclip_core.labeling.cache import LabelCache
        lo, hi = int(sys.argv[1]), int(sys.argv[2])
        reqs = [LabelRequest(f"query {{i % 50}}", f"p{{i}}", title=f"product p{{i}}", description=f"desc {{i}}",
                             category="dairy", aisle="milk") for i in range(lo, hi)]
        with LabelCache({str(path)!r}, timeout_s=30) as cache:
            for s in range(0, len(reqs), 100):  # many small transactions so the two writers interleave
                part = reqs[s:s + 100]
                cache.put_many([LabelResult(r.query, r.product_id, 1, "ok", {LID!r}) for r in part], part)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, lo, hi]) for lo, hi in (("500", "2000"), ("1500", "3000"))]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with LabelCache(path) as cache:
        assert cache.stats().n_entries == 3000
        got = cache.get_many(reqs, LID)
        assert len(got) == 3000
        # the first 1000 keep the label written first (2), the rest got 1 from the processes
        assert {got[LabelCache.key(r, LID)].label for r in reqs[:1000]} == {2}
        assert {got[LabelCache.key(r, LID)].label for r in reqs[1000:]} == {1}


# ---- budget -----------------------------------------------------------------------------------------------------


def test_budget_charge_and_exhaust_by_tokens():
    r = _requests(1)[0]
    budget = Budget(max_tokens=200)
    assert not budget.exhausted and budget.remaining.tokens == 200 and budget.remaining.cost_usd is None
    budget.charge(_ok(r, tokens=(100, 10)))
    assert budget.spent_tokens == 110 and budget.remaining.tokens == 90 and not budget.exhausted
    # A cached result was paid by an earlier run: free.
    budget.charge(LabelResult(r.query, r.product_id, 1, "ok", LID, None, 500, 50, cached=True))
    assert budget.spent_tokens == 110
    assert budget.fits(80, 10) and not budget.fits(81, 10)
    budget.charge(_failed(r))  # a failed call is still paid for
    assert budget.spent_tokens == 200 and budget.remaining.tokens == 0 and budget.exhausted


def test_budget_cost_limit_message_names_limit_and_spend():
    budget = Budget(max_cost_usd=0.01, price_per_1k_input=0.00015, price_per_1k_output=0.0006)
    budget.charge(LabelResult("q", "p", 2, "ok", LID, None, 40_000, 5_000))  # 0.006 + 0.003 = $0.009
    assert budget.spent_cost_usd == pytest.approx(0.009)
    assert budget.remaining.cost_usd == pytest.approx(0.001)
    assert not budget.exhausted
    with pytest.raises(BudgetExhausted) as err:
        budget.require(10_000, 0)  # $0.0015 > $0.001 left
    msg = str(err.value)
    assert "cost limit $0.0100" in msg and "spent $0.0090" in msg and "remaining $0.0010" in msg
    assert "max_cost_usd" in msg
    budget.require(6_000, 0)  # $0.0009 fits


def test_budget_rejects_negative_limits():
    with pytest.raises(ValueError, match="max_tokens"):
        Budget(max_tokens=-1)
    with pytest.raises(ValueError, match="price_per_1k_input"):
        Budget(price_per_1k_input=-0.1)


def test_zero_budget_is_exhausted_from_the_start():
    assert Budget(max_tokens=0).exhausted and Budget(max_cost_usd=0.0).exhausted and not Budget().exhausted


def test_estimate_tokens_heuristic_and_exact_counter():
    r = LabelRequest("oat milk", "p1", title="Oat Drink")  # 8 + 9 = 17 chars -> ceil(17 / 4) = 5
    assert estimate_tokens(r) == 5 + PROMPT_OVERHEAD_TOKENS
    assert estimate_tokens(r, overhead_tokens=0) == 5
    assert estimate_tokens(r, count_prompt_tokens=lambda req: 321) == 321
    assert Budget(output_tokens_per_pair=12, count_prompt_tokens=lambda req: 40).estimate(r) == (40, 12)


def test_estimate_cost_counts_cache_hits_as_free(tmp_path):
    reqs = _requests(1000)
    with LabelCache(tmp_path / "labels.sqlite") as cache:
        cache.put_many([_ok(r) for r in reqs[:300]], reqs[:300])
        est = estimate_cost(reqs, cache, LID, price_per_1k_input=0.15, price_per_1k_output=0.6,
                            output_tokens_per_pair=20, chunk_size=128)
    expected_in = sum(estimate_tokens(r) for r in reqs[300:])
    assert (est.n_pairs, est.n_cached, est.n_to_label) == (1000, 300, 700)
    assert est.est_input_tokens == expected_in and est.est_output_tokens == 700 * 20
    assert est.est_cost_usd == pytest.approx(expected_in / 1000 * 0.15 + 14_000 / 1000 * 0.6)
    # Without a cache every pair is paid; a generator is fine (read once, chunk by chunk).
    assert estimate_cost((r for r in reqs), None, LID).n_to_label == 1000


# ---- store ------------------------------------------------------------------------------------------------------


def test_store_append_writes_one_atomic_part_per_call(tmp_path):
    store = LabelStore(tmp_path / "labels")
    reqs = _requests(10)
    p0 = store.append([_ok(r) for r in reqs[:6]], partition=LID)
    p1 = store.append((_failed(r) for r in reqs[6:]), partition=LID)
    assert store.append([], partition=LID) is None
    assert [p.name for p in (p0, p1)] == ["part-000000.parquet", "part-000001.parquet"]
    assert p0.parent.name.startswith("labeler=openai_gpt-4o-mini_relevance-v1-") and ":" not in p0.parent.name
    assert not [p for p in (tmp_path / "labels").rglob("*") if p.is_file() and not p.name.endswith(".parquet")]
    df = store.read(dedupe=False)
    assert list(df.columns) == COLUMNS and len(df) == 10
    assert str(df["label"].dtype) == "Int8" and df["label"].isna().sum() == 4
    assert df["created_at"].dt.tz is not None
    failed = df[df["status"] == "failed"]
    assert set(failed["reason"]) == {"malformed answer"} and failed["input_tokens"].eq(90).all()


def test_store_rejects_results_of_another_labeler_and_leaves_no_tmp(tmp_path):
    store = LabelStore(tmp_path / "labels")
    r = _requests(1)[0]
    with pytest.raises(ValueError, match="labeler_id 'teacher:v1'"):
        store.append([_ok(r), _ok(r, labeler_id="teacher:v1")], partition=LID)
    assert store.parts() == []
    assert [p.name for p in (tmp_path / "labels").rglob("*") if p.is_file()] == []
    empty = store.read()
    assert empty.empty and list(empty.columns) == COLUMNS


def test_store_dedupe_keeps_latest_ok_then_latest_failed(tmp_path):
    store = LabelStore(tmp_path / "labels")
    a, b, c = _requests(3)
    store.append([_ok(a, label=1), _failed(b)], LID, created_at=T0)
    store.append([_ok(a, label=2), _failed(b), _ok(c, label=0)], LID, created_at=T0 + timedelta(hours=1))
    store.append([_failed(a), _failed(c)], LID, created_at=T0 + timedelta(hours=2))  # later failures lose to ok rows
    # Same timestamp: write order decides.
    store.append([_ok(c, label=1)], LID, created_at=T0 + timedelta(hours=1))
    df = store.read()
    assert len(df) == 3 and len(store.read(dedupe=False)) == 8
    got = {(r.product_id, r.status): (r.label, r.created_at) for r in df.itertuples()}
    assert got[("p0", "ok")] == (2, pd.Timestamp(T0 + timedelta(hours=1)))
    assert got[("p2", "ok")][0] == 1
    assert ("p1", "failed") in got and pd.isna(got[("p1", "failed")][0])
    assert got[("p1", "failed")][1] == pd.Timestamp(T0 + timedelta(hours=1))


def test_ok_labels_keeps_the_latest_ok_grade_and_counts_pairs_that_only_failed(tmp_path):
    store = LabelStore(tmp_path / "store")
    lid = "counting-v1"
    store.append([LabelResult("q", "p1", None, "failed", lid, reason="timeout"),
                  LabelResult("q", "p2", None, "failed", lid, reason="malformed")], partition=lid)
    store.append([LabelResult("q", "p1", 1, "ok", lid)], partition=lid)
    labels, n_failed = store.ok_labels(lid)
    assert labels.to_dict("records") == [{"query": "q", "product_id": "p1", "label": 1}]
    assert str(labels["label"].dtype) == "int8" and n_failed == 1


def test_store_keeps_labelers_side_by_side(tmp_path):
    store = LabelStore(tmp_path / "labels")
    reqs = _requests(5)
    store.append([_ok(r, label=2) for r in reqs], partition=LID)
    store.append([_ok(r, label=0, labeler_id="teacher:minilm-v1") for r in reqs[:3]], partition="teacher:minilm-v1")
    both = store.read()
    assert len(both) == 8 and both.groupby("labeler_id").size().to_dict() == {LID: 5, "teacher:minilm-v1": 3}
    only = store.read(labeler_id="teacher:minilm-v1")
    assert len(only) == 3 and set(only["label"]) == {0}
    assert store.labeler_ids() == sorted([LID, "teacher:minilm-v1"])
    wide = store.read_wide()
    assert list(wide.columns) == ["query", "product_id", LID, "teacher:minilm-v1"] and len(wide) == 5
    assert wide[LID].tolist() == [2] * 5 and wide["teacher:minilm-v1"].isna().sum() == 2


def test_store_iter_batches_is_bounded_and_filters(tmp_path):
    store = LabelStore(tmp_path / "labels")
    reqs = _requests(5000)
    for s in range(0, 5000, 1250):
        store.append([_ok(r) if i % 10 else _failed(r) for i, r in enumerate(reqs[s : s + 1250], start=s)], LID)
    sizes = [b.num_rows for b in store.iter_batches(batch_size=400)]
    assert sum(sizes) == 5000 and max(sizes) <= 400
    ok = sum(b.num_rows for b in store.iter_batches(labeler_id=LID, status="ok", columns=["query", "label"]))
    assert ok == 4500
    batch = next(store.iter_batches(columns=["product_id"]))
    assert batch.schema.names == ["product_id"]
    assert list(store.iter_batches(labeler_id="nobody")) == []


def test_store_append_streams_more_than_one_arrow_batch(tmp_path):
    store = LabelStore(tmp_path / "labels")
    n = 70_000  # > the 65,536 rows converted per Arrow batch
    store.append((LabelResult(f"q{i % 100}", f"p{i}", i % 3, "ok", LID) for i in range(n)), LID)
    assert len(store.parts()) == 1 and len(store.read(dedupe=False)) == n


def test_concurrent_appends_never_clobber_a_part(tmp_path):
    store = LabelStore(tmp_path / "labels")
    reqs = _requests(16 * 50)

    def write(i: int) -> None:
        store.append([_ok(r) for r in reqs[i * 50 : (i + 1) * 50]], LID)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.parts()) == 16
    assert len(store.read()) == 16 * 50
    assert math.isclose(store.read()["input_tokens"].sum(), 16 * 50 * 100)
