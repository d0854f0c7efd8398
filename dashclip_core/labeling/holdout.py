"""Which human labels fit an offline teacher and which ones score it: a split by query, seeded and deterministic.

Whole queries are held out, so the teacher is scored on queries it never saw (the situation it grades
candidates in). Only the human 'train' split is used: the 'eval' queries are the evaluation set.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd


def holdout_mask(queries: pd.Series, fraction: float, seed: int) -> np.ndarray:
    """True for the rows whose query falls in the held-out ``fraction`` (a hash of seed and query, so the same
    query is on the same side in every run and every row)."""
    def bucket(q: str) -> float:
        return int(hashlib.sha256(f"{seed}:{q}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    return np.array([bucket(q) < fraction for q in queries])


def split_human_labels(human: pd.DataFrame, holdout_fraction: float, seed: int,
                       max_holdout: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(fit, held_out) from the human 'train' split, cut by query so no query is on both sides.

    Args:
        human: human labels with columns query, product_id, label, split.
        holdout_fraction: share of the queries held out (``labeling.teacher_holdout_fraction``).
        seed: seeds the query hash and the sample.
        max_holdout: ``held_out`` is a seeded sample of at most this many rows (scoring an LLM teacher costs a
            call per pair); None keeps every held-out row.

    Raises:
        ValueError: the fraction leaves no query to fit on or none to score on.
    """
    train = human[human["split"] == "train"].reset_index(drop=True)
    held = holdout_mask(train["query"], holdout_fraction, seed)
    if held.all() or not held.any():
        raise ValueError(f"labeling.teacher_holdout_fraction={holdout_fraction} of {train['query'].nunique()} human-labelled "
                         "queries leaves no queries to fit or none to score the teacher on")
    held_out = train[held]
    if max_holdout is not None and len(held_out) > max_holdout:
        held_out = held_out.sample(n=max_holdout, random_state=seed)
    return train[~held].reset_index(drop=True), held_out.reset_index(drop=True)
