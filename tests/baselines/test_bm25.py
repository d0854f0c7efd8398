"""Tests for the BM25 baseline: hand-checked scores, tie order, empty documents."""

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
