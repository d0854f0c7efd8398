"""Okapi BM25 over product text: the lexical baseline and the labeling candidate generator.

For a query q and document d (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework:
BM25 and Beyond", Eq. 3.15, with the non-negative idf used by Lucene)::

    score(q, d) = sum_{t in unique terms of q} idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5))

N counts the documents that have at least one token, n(t) those that contain t, |d| is d's token
count and avgdl the mean |d| over the N documents. Documents that are None or have no token are
not indexed and never match. A repeated query term counts once.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

_TOKEN = re.compile(r"[^\W_]+")  # runs of Unicode letters and digits


def tokenize(text: str | None) -> list[str]:
    """Lowercase ``text`` and split it into runs of letters and digits ("Kellogg's 2-pack" -> kellogg, s, 2, pack)."""
    if not text:
        return []
    return _TOKEN.findall(text.lower())


class BM25Index:
    """BM25 ranking over a fixed list of documents.

    Args:
        docs: text per document (e.g. title + description); None or "" for a product with no text.
        ids: one distinct id per document, in the same order as ``docs``.
        k1: term-frequency saturation (> 0); 1.2 is the usual default.
        b: length normalisation in [0, 1]; 0 ignores document length, 1 normalises fully.

    Raises:
        ValueError: ``docs`` and ``ids`` differ in length, ids repeat, or k1 / b are out of range.
    """

    def __init__(self, docs: Sequence[str | None], ids: Sequence[str], k1: float = 1.2, b: float = 0.75) -> None:
        if len(docs) != len(ids):
            raise ValueError(f"BM25Index: {len(docs)} docs but {len(ids)} ids; they must match one to one")
        if len(set(ids)) != len(ids):
            dup = next(i for i, c in Counter(ids).items() if c > 1)
            raise ValueError(f"BM25Index: ids must be distinct, {dup!r} appears more than once")
        if k1 <= 0 or not 0.0 <= b <= 1.0:
            raise ValueError(f"BM25Index: need k1 > 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.ids = list(ids)
        self.k1, self.b = k1, b

        token_counts = [Counter(tokenize(d)) for d in docs]
        lengths = np.array([sum(c.values()) for c in token_counts], dtype=np.float64)  # (n_docs,)
        indexed = lengths > 0
        self.n_indexed = int(indexed.sum())
        avgdl = float(lengths[indexed].mean()) if self.n_indexed else 0.0
        # Per-document denominator term k1 * (1 - b + b * |d| / avgdl), computed once.
        self._length_norm = k1 * (1.0 - b + b * lengths / avgdl) if self.n_indexed else lengths  # (n_docs,)

        postings: dict[str, tuple[list[int], list[int]]] = {}
        for doc, counts in enumerate(token_counts):
            for term, tf in counts.items():
                docs_tf = postings.setdefault(term, ([], []))
                docs_tf[0].append(doc)
                docs_tf[1].append(tf)
        self._postings = {
            t: (np.array(d, dtype=np.int64), np.array(f, dtype=np.float64)) for t, (d, f) in postings.items()
        }
        self._idf = {
            t: math.log(1.0 + (self.n_indexed - len(d) + 0.5) / (len(d) + 0.5)) for t, (d, _) in self._postings.items()
        }

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query``; (n_docs,) float64, 0 where nothing matches."""
        scores = np.zeros(len(self.ids))
        for term in set(tokenize(query)):
            if term not in self._postings:
                continue
            docs, tf = self._postings[term]
            scores[docs] += self._idf[term] * tf * (self.k1 + 1.0) / (tf + self._length_norm[docs])
        return scores

    def rank(self, query: str, k: int) -> list[str]:
        """Ids of the top-k documents by BM25 score.

        Args:
            query: free text, tokenized like the documents.
            k: maximum number of ids to return (>= 1).

        Returns:
            Up to k ids, best first; equal scores are ordered by id; documents scoring 0 are left out.

        Raises:
            ValueError: ``k < 1``.
        """
        if k < 1:
            raise ValueError(f"BM25Index.rank: k must be >= 1, got {k}")
        scores = self.scores(query)
        matched = np.flatnonzero(scores > 0)
        best = sorted(matched.tolist(), key=lambda i: (-scores[i], self.ids[i]))[:k]
        return [self.ids[i] for i in best]
