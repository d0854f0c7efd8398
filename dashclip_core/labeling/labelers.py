"""Labelers that wrap others or run offline: the softmax teacher, and the cache in front of any labeler.

Both implement :class:`~dashclip_core.labeling.base.Labeler`. The cross-encoder teacher lives in
:mod:`~dashclip_core.labeling.cross_encoder`, the LLM ones in :mod:`~dashclip_core.labeling.openai_backend`
and :mod:`~dashclip_core.labeling.openai_jobs`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import pandas as pd

from dashclip_core.config import LabelingConfig
from dashclip_core.labeling.base import PRODUCT_FIELDS, Labeler, LabelRequest, LabelResult
from dashclip_core.labeling.cache import LabelCache

if TYPE_CHECKING:
    from dashclip_core.labeling.budget import Budget


class SoftmaxLabeler:
    """:class:`~dashclip_core.baselines.softmax_regression.SoftmaxRegression` on MiniLM pair features, as a Labeler.

    ``labeler_id`` hashes the fit labels and hyperparameters: a teacher refitted on other labels gets
    another id, so the cache never serves the old teacher's grades for it.

    Args:
        cfg: ``teacher_encoder``, ``teacher_batch_size``, ``teacher_l2`` and ``teacher_epochs`` are used.
        fit: human labels (query, product_id, label) joined with the product fields.
        seed: seeds the classifier's initialisation.
    """

    def __init__(self, cfg: LabelingConfig, fit: pd.DataFrame, seed: int) -> None:
        # torch and transformers load here, not when the step only prices a run or uses another labeler.
        from dashclip_core.baselines.softmax_regression import SoftmaxRegression
        from dashclip_core.labeling.teacher import LABELER_VERSION, PairFeatures, SentenceEncoder, teacher_text

        self._text = teacher_text
        self.features = PairFeatures(SentenceEncoder(cfg.teacher_encoder, cfg.teacher_batch_size))
        x = self.features(fit["query"].tolist(), [teacher_text(r) for r in fit.to_dict("records")])
        self.model = SoftmaxRegression(x.shape[1], cfg.teacher_l2, seed).fit(x, fit["label"].to_numpy(), cfg.teacher_epochs)
        digest = hashlib.sha256(json.dumps({
            "pairs": sorted(zip(fit["query"].astype(str), fit["product_id"].astype(str), fit["label"].astype(int).tolist())),
            "encoder": cfg.teacher_encoder, "l2": cfg.teacher_l2, "epochs": cfg.teacher_epochs, "seed": seed,
        }).encode()).hexdigest()[:12]
        self.labeler_id = f"{LABELER_VERSION}:{digest}"

    def label(self, requests: Iterable[LabelRequest]) -> Iterator[LabelResult]:
        """Grades every request with a query and some product text; the others fail (nothing to read)."""
        requests = list(requests)
        texts = [self._text({f: getattr(r, f) for f in PRODUCT_FIELDS}) for r in requests]
        ok = [i for i, r in enumerate(requests) if r.query.strip() and texts[i]]
        grades = self.model.predict(self.features([requests[i].query for i in ok], [texts[i] for i in ok])) if ok else []
        grade = dict(zip(ok, (int(g) for g in grades)))
        for i, r in enumerate(requests):
            if i in grade:
                yield LabelResult(r.query, r.product_id, grade[i], "ok", self.labeler_id)
            else:
                yield LabelResult(r.query, r.product_id, None, "failed", self.labeler_id, reason="empty query or product text")


class CachedLabeler:
    """Serves a labeler's grades from the label cache first and caches its new ok answers.

    Used for the held-out scoring, so a retried run does not pay the held-out pairs again; the
    candidates go through :func:`~dashclip_core.labeling.runner.label_pairs_streaming`, which does the same
    per chunk and also keeps a store and a budget.

    Args:
        labeler: grades the cache misses.
        cache: the label cache, keyed by ``labeler.labeler_id``.
        budget: when given, the misses must fit it before they are sent, and what they cost is charged to it.
    """

    def __init__(self, labeler: Labeler, cache: LabelCache, budget: Budget | None = None) -> None:
        self.inner = labeler
        self.cache = cache
        self.budget = budget
        self.labeler_id = labeler.labeler_id
        self.n_cached = 0  # requests served from the cache so far

    def label(self, requests: Iterable[LabelRequest]) -> Iterator[LabelResult]:
        """Cache hits, then the misses from the inner labeler.

        Raises:
            BudgetExhausted: with a budget, the misses' estimated cost does not fit it (nothing is sent).
        """
        requests = list(requests)
        keys = self.cache.keys(requests, self.labeler_id)
        hits = self.cache.get_many(requests, self.labeler_id, keys)
        misses = [r for k, r in zip(keys, requests) if k not in hits]
        if self.budget is not None and misses:
            estimates = [self.budget.estimate(r) for r in misses]
            self.budget.require(sum(i for i, _ in estimates), sum(o for _, o in estimates))
        fresh = list(self.inner.label(misses)) if misses else []
        self.cache.put_many(fresh, misses)
        for result in fresh if self.budget is not None else ():
            self.budget.charge(result)
        self.n_cached += len(requests) - len(misses)
        for k, r in zip(keys, requests):
            if k in hits:
                hit = hits[k]
                yield LabelResult(r.query, r.product_id, hit.label, hit.status, hit.labeler_id, hit.reason, 0, 0, True)
        yield from fresh
