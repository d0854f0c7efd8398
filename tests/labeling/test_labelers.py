"""labelers.py: the cache in front of a labeler (the held-out scoring path)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import pandas as pd
import pytest

from dashclip_core.labeling.base import LabelRequest, LabelResult
from dashclip_core.labeling.budget import Budget, BudgetExhausted
from dashclip_core.labeling.cache import LabelCache
from dashclip_core.labeling.label_requests import requests_for
from dashclip_core.labeling.labelers import CachedLabeler


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


def _requests(products: pd.DataFrame) -> list[LabelRequest]:
    return list(requests_for(pd.DataFrame({"query": ["oat milk"] * 3, "product_id": ["p1", "p2", "p3"]}), products))


def test_cached_labeler_pays_each_pair_once_and_never_caches_failures(tmp_path, three_products):
    inner = CountingLabeler()
    requests = _requests(three_products)
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


def test_cached_labeler_sends_nothing_that_does_not_fit_the_budget_and_charges_what_it_sends(tmp_path, three_products):
    inner = CountingLabeler()
    with LabelCache(tmp_path / "c.sqlite") as cache:
        with pytest.raises(BudgetExhausted):
            list(CachedLabeler(inner, cache, Budget(max_tokens=10)).label(_requests(three_products)))
        assert inner.sent == []
        budget = Budget(max_tokens=100_000)
        list(CachedLabeler(inner, cache, budget).label(_requests(three_products)))
    assert budget.spent_tokens == 3 * 15
