"""Okapi BM25 over product text: the lexical baseline and the labeling candidate generator.

For a query q and document d (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework:
BM25 and Beyond", Eq. 3.15, with the non-negative idf used by Lucene)::

    score(q, d) = sum_{t in unique terms of q} idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5))

N counts the documents that have at least one token, n(t) those that contain t, |d| is d's token
count and avgdl the mean |d| over the N documents. Documents that are None or have no token are
not indexed and never match. A repeated query term counts once.

The index is built by ``bm25s`` (Lù 2024, arXiv 2407.03618), which precomputes every (document, term)
contribution into a sparse matrix, so a query costs only the postings of its terms. Its ``lucene``
method is the formula above (the "Lucene (accurate)" variant of Kamphuis et al. 2020, "Which BM25 Do
You Mean? A Large-Scale Reproducibility Study of Scoring Variants", ECIR, Table 1) without the
constant factor (k1 + 1), which Lucene drops since it does not change the order; we put it back so a
score is the textbook one. bm25s's own top-k breaks ties arbitrarily and fills k with documents that
score 0, so the selection is ours: only matching documents, equal scores ordered by id.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import bm25s
import numpy as np
import scipy.sparse as sp

_TOKEN = re.compile(r"[^\W_]+")  # runs of Unicode letters and digits
_MAX_CHUNK_CELLS = 2**22  # queries x documents scored at once in rank_many: bounds the sparse product's size


def tokenize(text: str | None) -> list[str]:
    """Lowercase ``text`` and split it into runs of letters and digits ("Kellogg's 2-pack" -> kellogg, s, 2, pack).

    No stemming and no stopword list: "apples" does not match "apple", and every word counts.
    """
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
        tokens = [tokenize(d) for d in docs]
        self._rows = np.array([i for i, t in enumerate(tokens) if t], dtype=np.int64)  # (N,) position of each indexed doc
        self.n_indexed = len(self._rows)
        by_id = np.argsort(np.array(self.ids, dtype=object), kind="stable")
        self._id_rank = np.empty(len(self.ids), dtype=np.int64)  # (n_docs,) position of each id in sorted order: the tie order
        self._id_rank[by_id] = np.arange(len(self.ids))
        self._vocab, self._term_doc = _term_doc_matrix([tokens[i] for i in self._rows], k1, b)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query``; (n_docs,) float64, 0 where nothing matches."""
        out = np.zeros(len(self.ids))
        row = self._score_rows([query])  # (1, N) sparse
        out[self._rows[row.indices]] = row.data
        return out

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
        return self.rank_many([query], k)[0]

    def rank_many(self, queries: Sequence[str], k: int) -> list[list[str]]:
        """:meth:`rank` for every query, scored a chunk of queries at a time (one sparse product per chunk).

        Args:
            queries: free-text queries.
            k: maximum number of ids per query (>= 1).

        Returns:
            One list per query, as :meth:`rank` returns it.

        Raises:
            ValueError: ``k < 1``.
        """
        if k < 1:
            raise ValueError(f"BM25Index.rank: k must be >= 1, got {k}")
        chunk = max(1, _MAX_CHUNK_CELLS // max(1, self.n_indexed))
        out: list[list[str]] = []
        for start in range(0, len(queries), chunk):
            rows = self._score_rows(queries[start : start + chunk])  # (chunk, N) sparse, matches only
            for r in range(rows.shape[0]):
                cols = rows.indices[rows.indptr[r] : rows.indptr[r + 1]]
                out.append(self._top_k(cols, rows.data[rows.indptr[r] : rows.indptr[r + 1]], k))
        return out

    def _score_rows(self, queries: Sequence[str]) -> sp.csr_matrix:
        """(Q, N) scores over the indexed documents; only documents that match a query term are stored."""
        rows, cols = [], []
        for r, query in enumerate(queries):
            terms = sorted({self._vocab[t] for t in tokenize(query) if t in self._vocab})  # a repeated term counts once
            cols += terms
            rows += [r] * len(terms)
        hits = sp.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(queries), len(self._vocab)))  # (Q, V)
        return (hits @ self._term_doc).tocsr()

    def _top_k(self, cols: np.ndarray, scores: np.ndarray, k: int) -> list[str]:
        """Ids of the k best of these indexed documents (``cols``), best first, ties by id."""
        keep = scores > 0
        cols, scores = cols[keep], scores[keep]
        if len(scores) > k:  # keep every document tied with the k-th score, so the tie order decides who stays
            kth = np.partition(scores, len(scores) - k)[len(scores) - k]
            cols, scores = cols[scores >= kth], scores[scores >= kth]
        docs = self._rows[cols]
        order = np.lexsort((self._id_rank[docs], -scores))[:k]
        return [self.ids[i] for i in docs[order]]


def _term_doc_matrix(docs: list[list[str]], k1: float, b: float) -> tuple[dict[str, int], sp.csr_matrix]:
    """Vocabulary and the (V, N) matrix of per-term BM25 contributions of the non-empty ``docs``, via bm25s."""
    if not docs:
        return {}, sp.csr_matrix((0, 0))
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene", dtype="float64")
    retriever.index(docs, create_empty_token=False, show_progress=False)
    s = retriever.scores  # CSC (N, V): column t holds idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl))
    doc_term = sp.csc_matrix((s["data"] * (k1 + 1.0), s["indices"], s["indptr"]), shape=(s["num_docs"], len(retriever.vocab_dict)))
    return retriever.vocab_dict, doc_term.T.tocsr()
