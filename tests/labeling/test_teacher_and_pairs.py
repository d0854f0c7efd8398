"""Teacher word overlap, candidate pairs (no eval leakage, only snapshot products), label provenance."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from dashclip_core.config import LabelingConfig
from dashclip_core.labeling.pairs import candidate_pairs, combine_labels
from dashclip_core.labeling.teacher import overlap


def test_overlap_is_the_share_of_query_words_in_the_text():
    assert overlap("oat milk", "Organic oat drink") == 0.5
    assert overlap("", "Organic oat drink") == 0.0


def _catalog(n_products: int, n_queries: int, seed: int):
    rng = np.random.default_rng(seed)
    products = pd.DataFrame({
        "product_id": [f"p{i}" for i in range(n_products)],
        "title": [f"item {w}" for w in rng.choice(["milk", "bread", "apple", "chips"], n_products)],
        "description": None, "category": "c", "aisle": "a",
    })
    queries = [f"{w} q{i}" for i, w in enumerate(rng.choice(["milk", "bread", "snack"], n_queries))]
    log = pd.DataFrame({"query": rng.choice(queries, 30), "product_id": rng.choice([f"p{i}" for i in range(n_products + 5)], 30)})
    human = pd.DataFrame({"query": rng.choice(queries, 20), "product_id": rng.choice(products["product_id"], 20),
                          "label": rng.integers(0, 3, 20), "split": rng.choice(["train", "eval"], 20)})
    return products, log, human


@settings(max_examples=25, deadline=None)
@given(n_products=st.integers(1, 30), n_queries=st.integers(1, 10), seed=st.integers(0, 1000))
def test_candidates_stay_in_snapshot_and_never_touch_eval_queries(n_products, n_queries, seed):
    products, log, human = _catalog(n_products, n_queries, seed)
    cands = candidate_pairs(products, log, human, LabelingConfig(candidates_per_query=6, random_candidates_per_query=2), seed=seed)
    assert set(cands["product_id"]) <= set(products["product_id"])
    assert not set(cands["query"]) & set(human.loc[human["split"] == "eval", "query"])
    assert not set(zip(cands["query"], cands["product_id"])) & set(zip(human["query"], human["product_id"]))
    assert not cands.duplicated().any()


def test_combine_labels_keeps_provenance():
    human = pd.DataFrame({"query": ["a", "b"], "product_id": ["p1", "p2"], "label": [2, 0], "split": ["train", "eval"]})
    teacher = pd.DataFrame({"query": ["a"], "product_id": ["p3"], "label": [1]})
    out = combine_labels(human, teacher)
    assert out.to_dict("records") == [
        {"query": "a", "product_id": "p1", "label": 2, "source": "human", "split": "train"},
        {"query": "b", "product_id": "p2", "label": 0, "source": "human", "split": "eval"},
        {"query": "a", "product_id": "p3", "label": 1, "source": "teacher", "split": "train"},
    ]
