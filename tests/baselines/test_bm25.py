"""Tests for the BM25 baseline: hand-checked scores, the formula computed directly, tie order, empty documents."""

from __future__ import annotations

import math

import pytest

from dashclip_core.baselines.bm25 import BM25Index, tokenize


def test_tokenize() -> None:
    assert tokenize("Kellogg's 2-Pack, Crème BRÛLÉE!") == ["kellogg", "s", "2", "pack", "crème", "brûlée"]
    assert tokenize(None) == [] and tokenize("") == [] and tokenize("--") == []


def test_scores_match_hand_computation() -> None:
    # Indexed docs: d1 (2 tokens), d2 (3 tokens), d4 (1 token) -> N = 3, avgdl = 2; d3 / d5 have no text.
    index = BM25Index(["red apple", "green apple pie", None, "banana", ""], ["d1", "d2", "d3", "d4", "d5"])
    idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # "apple" is in 2 of 3 docs
    k1, b = 1.2, 0.75
    d1 = idf * (k1 + 1) / (1 + k1 * (1 - b + b * 2 / 2))
    d2 = idf * (k1 + 1) / (1 + k1 * (1 - b + b * 3 / 2))

    scores = index.scores("Apple")

    assert scores[0] == pytest.approx(d1) and scores[1] == pytest.approx(d2)
    assert list(scores[2:]) == [0.0, 0.0, 0.0]
    assert index.rank("apple", k=10) == ["d1", "d2"]  # shorter doc first; zero-score docs left out
    assert index.rank("apple apple", k=10) == ["d1", "d2"]  # a repeated query term counts once
    assert index.rank("apple", k=1) == ["d1"]


def test_more_matching_terms_rank_higher_and_ties_break_by_id() -> None:
    index = BM25Index(["granola bar", "chocolate bar", "granola bar", "granola chocolate bar"], ["z", "m", "a", "q"])

    assert index.rank("chocolate granola", k=4)[0] == "q"
    assert index.rank("granola bar", k=3) == ["a", "z", "q"]  # a and z tie; q is longer
    assert index.rank("nothing matches", k=5) == []
    assert index.rank("", k=5) == []


def test_errors() -> None:
    with pytest.raises(ValueError, match="2 docs but 1 ids"):
        BM25Index(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="'x' appears more than once"):
        BM25Index(["a", "b"], ["x", "x"])
    with pytest.raises(ValueError, match="k must be >= 1"):
        BM25Index(["a"], ["x"]).rank("a", k=0)


def direct_bm25(docs: list[str | None], query: str, k1: float, b: float) -> list[float]:
    """The module docstring's formula, term by term, with no index: the reference the index must match."""
    tokens = [tokenize(d) for d in docs]
    indexed = [t for t in tokens if t]
    n, avgdl = len(indexed), sum(map(len, indexed)) / len(indexed)
    out = []
    for doc in tokens:
        score = 0.0
        for term in set(tokenize(query)):
            tf, df = doc.count(term), sum(term in t for t in indexed)
            if tf:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        out.append(score)
    return out


@pytest.mark.parametrize(("k1", "b"), [(1.2, 0.75), (2.0, 0.3), (0.5, 1.0), (1.2, 0.0)])
def test_scores_match_a_direct_implementation_of_the_formula(k1: float, b: float) -> None:
    docs = [
        "Organic red apples, 2 lb bag", "Green apple pie apple crumble", None, "Oat milk oat drink barista oat",
        "", "Red pepper", "apple", "Milk chocolate bar with red berries", "Crème brûlée 2-pack",
    ]
    index = BM25Index(docs, [f"d{i}" for i in range(len(docs))], k1=k1, b=b)

    for query in ("apple", "red apple", "oat milk", "crème 2 pack", "red red berries", "nothing here", ""):
        assert index.scores(query) == pytest.approx(direct_bm25(docs, query, k1, b), rel=1e-12, abs=0), query


def test_rank_many_equals_rank_and_ties_at_the_cut_off_go_by_id() -> None:
    # Given five identical documents (equal scores) whose ids are not in position order
    ids = ["e", "b", "d", "a", "c"]
    index = BM25Index(["oat milk"] * 5 + ["milk"], ids + ["f"])

    # Then the cut-off keeps the smallest ids among the tied ones, whatever their positions
    assert index.rank("oat milk", k=2) == ["a", "b"]
    assert index.rank("oat milk", k=6) == ["a", "b", "c", "d", "e", "f"]
    queries = ["oat", "milk", "", "oat oat milk", "tea"]
    assert index.rank_many(queries, k=3) == [index.rank(q, k=3) for q in queries]
    assert index.rank_many([], k=3) == []


def test_a_corpus_without_any_token_never_matches() -> None:
    index = BM25Index([None, "", "--"], ["x", "y", "z"])

    assert index.n_indexed == 0
    assert index.rank("anything", k=3) == [] and list(index.scores("anything")) == [0.0, 0.0, 0.0]
