"""Tests for ranking metrics (hand-computed cases, cross-checked against ir-measures / trec_eval) and
nearest-centroid category accuracy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dashclip_core.evaluation.metrics import category_accuracy, evaluate_rankings, ndcg_at_k, recall_at_k

GAINS = {"a": 2, "c": 1, "d": 2, "z": 0}


def test_ndcg_hand_computed() -> None:
    # DCG@3 of [a, b, c] = (2^2-1)/log2(2) + 0 + (2^1-1)/log2(4) = 3 + 0.5
    # IDCG@3 from all judged labels [2, 2, 1] = 3/1 + 3/log2(3) + 1/2  (d was never retrieved but counts)
    expected = 3.5 / (3 + 3 / math.log2(3) + 0.5)
    assert ndcg_at_k(["a", "b", "c"], GAINS, k=3) == pytest.approx(expected)
    assert ndcg_at_k(["a", "b", "c"], GAINS, k=3) == pytest.approx(0.649015, abs=1e-6)
    # k=1: [b] -> 0; [d] -> 3/3
    assert ndcg_at_k(["b", "a"], GAINS, k=1) == 0.0
    assert ndcg_at_k(["d", "b"], GAINS, k=1) == 1.0
    assert ndcg_at_k(["d", "a", "c", "z"], GAINS, k=10) == pytest.approx(1.0)


def test_ndcg_counts_a_repeated_id_once_and_skips_queries_without_relevant() -> None:
    assert ndcg_at_k(["c", "c", "c"], {"c": 1, "d": 2}, k=3) == ndcg_at_k(["c"], {"c": 1, "d": 2}, k=3)
    assert ndcg_at_k(["a"], {"a": 0, "b": 0}, k=10) is None
    assert ndcg_at_k(["a"], {}, k=10) is None
    with pytest.raises(ValueError, match="k must be >= 1"):
        ndcg_at_k(["a"], GAINS, k=0)


def test_recall_hand_computed() -> None:
    relevant = {"a", "c", "d"}
    assert recall_at_k(["a", "b", "c"], relevant, k=2) == pytest.approx(1 / 3)
    assert recall_at_k(["a", "b", "c"], relevant, k=3) == pytest.approx(2 / 3)
    assert recall_at_k([], relevant, k=3) == 0.0
    assert recall_at_k(["a"], set(), k=3) is None


def test_evaluate_rankings() -> None:
    judgments = pd.DataFrame(
        {
            "query": ["q1", "q1", "q1", "q2", "q2", "q3", "q4"],
            "product_id": ["a", "b", "b", "x", "y", "m", "n"],
            "label": [2, 0, 1, 1, 0, 0, 2],  # q1/b judged twice -> max label 1; q3 has nothing relevant
        }
    )
    rankings = {"q1": ["b", "a"], "q2": ["y", "w", "x"], "q3": ["m"], "unjudged": ["a"]}  # q4 has no ranking

    result = evaluate_rankings(rankings, judgments, ks=(1, 2), min_relevant_label=1)

    idcg_q1 = 3 + 1 / math.log2(3)
    ndcg2 = [(1 + 3 / math.log2(3)) / idcg_q1, 0.0, 0.0]  # q1, q2 (x is at rank 3), q4
    assert result["ndcg@2"] == pytest.approx(np.mean(ndcg2))
    assert result["ndcg@1"] == pytest.approx(np.mean([1 / 3, 0.0, 0.0]))
    assert result["recall@1"] == pytest.approx(np.mean([0.5, 0.0, 0.0]))
    assert result["recall@2"] == pytest.approx(np.mean([1.0, 0.0, 0.0]))
    assert (result["n_queries"], result["n_queries_skipped"], result["n_queries_without_ranking"]) == (3, 1, 1)

    strict = evaluate_rankings(rankings, judgments, ks=(2,), min_relevant_label=2)  # only q1/a and q4/n relevant
    assert strict["n_queries"] == 2 and strict["recall@2"] == pytest.approx(0.5)


def test_evaluate_rankings_without_relevant_queries_raises() -> None:
    judgments = pd.DataFrame({"query": ["q"], "product_id": ["a"], "label": [0]})
    with pytest.raises(ValueError, match="none of the 1 judged queries"):
        evaluate_rankings({"q": ["a"]}, judgments)


# trec_eval's ndcg_cut uses the label itself as gain; ours is 2^label - 1 (Burges et al. 2005), which
# ir-measures' nDCG takes as a gain map {label: 2^label - 1} over the same log2 discount.
EXP_GAINS = {0: 0, 1: 1, 2: 3}


def judged_run(seed: int = 0, n_queries: int = 6, n_docs: int = 40) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Graded judgments (0/1/2, each query with a label-2 product) and rankings that mix judged and
    unjudged products, some shorter than the deepest cut-off, some missing a judged relevant product."""
    rng = np.random.default_rng(seed)
    docs = [f"p{i:02d}" for i in range(n_docs)]
    rows, rankings = [], {}
    for q in range(n_queries):
        judged = rng.choice(docs, size=12, replace=False)
        labels = rng.choice([0, 1, 2], size=12, p=[0.5, 0.3, 0.2])
        labels[0] = 2
        rows += [(f"q{q}", d, int(lab)) for d, lab in zip(judged, labels)]
        rankings[f"q{q}"] = list(rng.choice(docs, size=int(rng.integers(5, 25)), replace=False))
    return pd.DataFrame(rows, columns=["query", "product_id", "label"]), rankings


@pytest.mark.parametrize("min_relevant_label", [1, 2])
def test_evaluate_rankings_matches_ir_measures(min_relevant_label: int) -> None:
    import ir_measures
    from ir_measures import Qrel, R, ScoredDoc, nDCG

    # Given graded judgments and rankings as trec_eval input: a strictly decreasing score per rank, so no ties;
    # one judged query has no ranking (both score it 0)
    judgments, rankings = judged_run()
    del rankings["q5"]
    qrels = [Qrel(q, d, lab) for q, d, lab in judgments.itertuples(index=False)]
    run = [ScoredDoc(q, d, float(len(ids) - i)) for q, ids in rankings.items() for i, d in enumerate(ids)]
    ks = (1, 5, 10, 20)
    ndcg = {k: nDCG(gains=EXP_GAINS) @ k for k in ks}
    recall = {k: R(rel=min_relevant_label) @ k for k in ks}

    # When both score them
    ours = evaluate_rankings(rankings, judgments, ks=ks, min_relevant_label=min_relevant_label)
    theirs = ir_measures.calc_aggregate([*ndcg.values(), *recall.values()], qrels, run)

    # Then nDCG@k and Recall@k agree (every query here has a relevant product, so both average the same queries)
    assert (ours["n_queries"], ours["n_queries_skipped"], ours["n_queries_without_ranking"]) == (6, 0, 1)
    for k in ks:
        assert ours[f"ndcg@{k}"] == pytest.approx(theirs[ndcg[k]], abs=1e-12), k
        assert ours[f"recall@{k}"] == pytest.approx(theirs[recall[k]], abs=1e-12), k
    # and trec_eval's own nDCG (linear gain) is a different number on graded labels
    assert ours["ndcg@10"] != pytest.approx(ir_measures.calc_aggregate([nDCG @ 10], qrels, run)[nDCG @ 10], abs=1e-6)


def test_queries_without_relevant_products_are_left_out_where_trec_eval_scores_them_0() -> None:
    import ir_measures
    from ir_measures import Qrel, R, ScoredDoc

    judgments, rankings = judged_run(seed=1, n_queries=4)
    judgments = pd.concat([judgments, pd.DataFrame({"query": ["none"], "product_id": ["p00"], "label": [0]})])
    rankings["none"] = ["p00", "p01"]
    qrels = [Qrel(q, d, lab) for q, d, lab in judgments.itertuples(index=False)]
    run = [ScoredDoc(q, d, float(len(ids) - i)) for q, ids in rankings.items() for i, d in enumerate(ids)]

    ours = evaluate_rankings(rankings, judgments, ks=(10,))
    theirs = ir_measures.calc_aggregate([R @ 10], qrels, run)[R @ 10]

    assert ours["n_queries"] == 4 and ours["n_queries_skipped"] == 1
    assert ours["recall@10"] == pytest.approx(theirs * 5 / 4, abs=1e-12)  # trec_eval's mean counts the extra query as 0


def test_category_accuracy_on_separable_data() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(4)[:3] * 5  # three well-separated directions in 4-D
    train = np.repeat(centres, 10, axis=0) + 0.1 * rng.standard_normal((30, 4))
    test = np.repeat(centres, 4, axis=0) + 0.1 * rng.standard_normal((12, 4))
    train_labels = np.repeat(["apple", "pear", "plum"], 10)
    test_labels = list(np.repeat(["apple", "pear", "plum"], 4))

    assert category_accuracy(train, train_labels, test, test_labels) == 1.0
    test_labels[0] = "pear"  # one wrong label
    test_labels[1] = "kiwi"  # a class never seen in train is always wrong
    assert category_accuracy(train, train_labels, test, test_labels) == pytest.approx(10 / 12)
    with pytest.raises(ValueError, match="3 test labels for 12 rows"):
        category_accuracy(train, train_labels, test, test_labels[:3])
