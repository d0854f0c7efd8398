"""Candidate (query, product) pairs and the combined label table.

Candidates for a query: the products shoppers saw for it (search log), its BM25 top-k over the
teacher's product text, and a few random products (negatives the log never shows). Queries of the
held-out human 'eval' split are never candidates: their judgements are the evaluation set, and
teacher labels on them would leak it into training.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from dashclip_core.baselines.bm25 import BM25Index
from dashclip_core.config import LabelingConfig
from dashclip_core.labeling.base import LABELS
from dashclip_core.labeling.teacher import teacher_text

logger = logging.getLogger(__name__)


def candidate_pairs(products: pd.DataFrame, search_log: pd.DataFrame, human: pd.DataFrame, cfg: LabelingConfig, seed: int = 0) -> pd.DataFrame:
    """Distinct (query, product_id) pairs to label, excluding eval queries and human-labelled pairs."""
    eval_queries = set(human.loc[human["split"] == "eval", "query"])
    known = set(products["product_id"])
    queries = sorted((set(search_log["query"]) | set(human["query"])) - eval_queries)
    log_pairs = search_log[search_log["product_id"].isin(known) & ~search_log["query"].isin(eval_queries)][["query", "product_id"]]

    ids = products["product_id"].tolist()
    bm25 = BM25Index([teacher_text(r) for r in products.to_dict("records")], ids)
    rng = np.random.default_rng(seed)
    n_bm25 = max(0, cfg.candidates_per_query - cfg.random_candidates_per_query)
    lexical = bm25.rank_many(queries, n_bm25) if n_bm25 > 0 else [[] for _ in queries]  # one sparse product per chunk of queries
    rows = []
    for q, top in zip(queries, lexical):
        rows += [(q, p) for p in top]
        rows += [(q, ids[i]) for i in rng.choice(len(ids), size=min(cfg.random_candidates_per_query, len(ids)), replace=False)]
    cands = pd.concat([log_pairs, pd.DataFrame(rows, columns=["query", "product_id"])], ignore_index=True).drop_duplicates()
    labelled = set(zip(human["query"], human["product_id"]))
    keep = np.array([(q, p) not in labelled for q, p in zip(cands["query"], cands["product_id"])], dtype=bool)
    return cands[keep].sort_values(["query", "product_id"]).reset_index(drop=True)


def combine_labels(human: pd.DataFrame, teacher: pd.DataFrame) -> pd.DataFrame:
    """One table: human labels (their own split) and teacher labels ('train'), with provenance.

    Several annotators may judge one (query, product_id): their grades become one row with the rounded mean
    (``Series.round``, half to even, as ``evaluation.report.eval_judgments`` rounds), so the table keeps one
    label per pair (the label gate's key). A query has one split (the human label gate quarantines a query
    found in both), so grouping by split adds no row.

    Raises:
        ValueError: a grade outside {0, 1, 2} (the gates let none through; this guards the int8 cast, which
            would otherwise wrap 258 to 2).
    """
    h = (human.groupby(["query", "product_id", "split"], as_index=False, sort=False, dropna=False)["label"].mean()
         .assign(label=lambda d: d["label"].round(), source="human"))
    t = teacher[["query", "product_id", "label"]].assign(split="train", source="teacher")
    out = pd.concat([h, t], ignore_index=True)
    out["label"] = as_grades(out["label"], "combined labels")
    return out[["query", "product_id", "label", "source", "split"]]


def as_grades(labels: pd.Series, what: str) -> pd.Series:
    """``labels`` as int8 grades, after checking every value is 0, 1 or 2 (an int8 cast alone wraps 258 to 2)."""
    bad = ~labels.isin(LABELS)
    if bad.any():
        rows = labels.index[bad].tolist()[:5]
        raise ValueError(f"{what}: {int(bad.sum())} label(s) outside {{0, 1, 2}}, e.g. rows {rows}: "
                         f"{labels[bad].tolist()[:5]}")
    return labels.astype(np.int8)
