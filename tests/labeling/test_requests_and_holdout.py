"""label_requests.py and holdout.py: requests from pairs, and the human split that fits and scores the teacher."""

from __future__ import annotations

import pandas as pd
import pytest

from dashclip_core.labeling.base import LabelRequest
from dashclip_core.labeling.holdout import holdout_mask, split_human_labels
from dashclip_core.labeling.label_requests import requests_for


def test_requests_carry_every_product_field_and_bad_ids_name_the_row(three_products):
    pairs = pd.DataFrame({"query": ["oat milk", "soap"], "product_id": ["p1", "p3"]})
    first, second = list(requests_for(pairs, three_products))
    assert first == LabelRequest("oat milk", "p1", "Oat Milk", "Creamy oat drink", "Milk", "Dairy")
    assert second.title is None and second.description == "Lemon dish soap"
    bad = pd.DataFrame({"query": ["oat milk", "tea"], "product_id": ["p1", "p9"]})
    with pytest.raises(ValueError, match=r"pair row 1: product_id 'p9' \(query 'tea'\)"):
        list(requests_for(bad, three_products))


def test_holdout_is_deterministic_and_near_the_fraction():
    q = pd.Series([f"q{i}" for i in range(200)])
    m1, m2 = holdout_mask(q, 0.25, 0), holdout_mask(q, 0.25, 0)
    assert (m1 == m2).all() and 0.1 < m1.mean() < 0.4


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
