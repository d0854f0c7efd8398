"""One run's labelling step, as one call: build the configured labeler, gate it on held-out human labels,
then stream the candidate pairs through the label cache, the budget and the label store.

The order matters for money: the teacher is scored on held-out human labels *before* any candidate is
sent, so a bad teacher (a wrong model id, a broken prompt) costs the held-out pairs only. The held-out
pairs go through the cache too, so a retried run pays for neither twice.

The labeler that is gated is the labeler that labels: offline teachers are fitted once, on the human
'train' labels outside the held-out queries, and that fitted model both gets scored and grades the
candidates (no refit on all labels afterwards, whose quality nobody measured).

Everything paid for outlives the run in ``<cache>/labels`` (the label cache, the label store, the batch and
fine-tune records); the step folder ``out_dir`` receives the files of :class:`dashclip_core.layout.Labels`.
No Airflow and no MLflow here: the task logs what :class:`LabelingOutcome` (or ``on_teacher_scored``) hands it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dashclip_core.config import PipelineConfig
from dashclip_core.labeling.budget import BudgetExhausted, budget_for
from dashclip_core.labeling.build import LLMEndpoint, build_labeler
from dashclip_core.labeling.cache import LabelCache
from dashclip_core.labeling.errors import DryRunEstimate, HoldoutOverBudget, StoppedByBudget, TooManyFailedPairs
from dashclip_core.labeling.holdout import split_human_labels
from dashclip_core.labeling.label_requests import requests_for
from dashclip_core.labeling.pairs import candidate_pairs, combine_labels
from dashclip_core.labeling.quality import check_quality, gate_thresholds, write_quality_report
from dashclip_core.labeling.runner import LabelingSummary, label_pairs_streaming
from dashclip_core.labeling.scoring import estimate_run, score_labeler
from dashclip_core.labeling.store import LabelStore
from dashclip_core.layout import Labels
from dashclip_core.storage import write_json

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelingOutcome:
    """What a finished labelling step produced (small: no frames).

    Attributes:
        labeler_id: the labeler that was gated and graded the candidates.
        quality: its quality on the held-out human labels (``teacher_quality.json``).
        streaming: what labelling the candidates did: cache hits, tokens, cost.
        n_labels: rows of ``labels.parquet`` (human + teacher).
        n_teacher_labels: candidate pairs with an ok teacher grade.
        n_human_labels: human labels of products in the validated snapshot.
        n_failed: candidate pairs without a grade (at most ``labeling.max_failed_fraction`` of them).
        files: the files written into the step folder.
    """

    labeler_id: str
    quality: dict
    streaming: LabelingSummary
    n_labels: int
    n_teacher_labels: int
    n_human_labels: int
    n_failed: int
    files: tuple[Path, ...]

    def metrics(self) -> dict[str, float]:
        """The labels/* metrics of the run (the teacher/* ones are the gate's: see ``on_teacher_scored``)."""
        return {"labels/n": self.n_labels, "labels/cache_hit_rate": self.streaming.cache_hit_rate,
                "labels/tokens": self.streaming.tokens, "labels/cost_usd": self.streaming.cost_usd,
                "labels/failed": self.n_failed}

    def summary(self) -> dict:
        """The step's small summary (its XCom value, printed by the run summary)."""
        return {"n_labels": self.n_labels, "n_teacher_labels": self.n_teacher_labels, "n_human_labels": self.n_human_labels,
                "n_failed": self.n_failed, "labeler_id": self.labeler_id, "cache_hit_rate": self.streaming.cache_hit_rate,
                "tokens": self.streaming.tokens, "cost_usd": self.streaming.cost_usd,
                "teacher_accuracy": self.quality["accuracy"], "teacher_kappa": self.quality["kappa"],
                "teacher_macro_f1": self.quality["macro_f1"]}


def run_labeling(cfg: PipelineConfig, products: pd.DataFrame, search_log: pd.DataFrame, human_labels: pd.DataFrame,
                 out_dir: Path, *, endpoint: LLMEndpoint | None = None,
                 on_teacher_scored: Callable[[dict], None] | None = None) -> LabelingOutcome:
    """Label one snapshot's candidate pairs with the configured labeler, gated on held-out human labels.

    Steps:
        1. Keep the human labels of validated products; build the candidate pairs (search log + BM25 + random).
        2. Split the human 'train' labels by query into the teacher's fit set and the held-out set.
        3. Dry run (``labeling.dry_run``): price the run from the cache and stop, before anything is fitted or sent.
        4. Build (fit, fine-tune) the labeler.
        5. Score it on the held-out pairs through the cache and the step's one budget; write the quality report.
        6. The teacher quality gate (``labeling.min_teacher_*``), before a candidate is paid for.
        7. Stream the candidates through cache, budget and label store.
        8. Collect this run's ok grades; stop if too many pairs failed.
        9. Write labels (human + teacher), the teacher report and the streaming summary.

    Args:
        cfg: the pipeline config (``labeling``, ``catalog.seed``, the cache folder).
        products: the validated products (the catalog gate's clean rows).
        search_log: (query, product_id) rows shoppers saw.
        human_labels: (query, product_id, label, split) human judgements.
        out_dir: the step folder; receives the files of :class:`~dashclip_core.layout.Labels`.
        endpoint: the API of an ``openai`` labeler (None for offline teachers).
        on_teacher_scored: called with the quality dict once its report files are in ``out_dir`` and before the
            gate is checked, so a caller can publish them (MLflow) even when the gate or the budget stops the step.

    Returns:
        The :class:`LabelingOutcome`.

    Raises:
        DryRunEstimate: ``labeling.dry_run`` is set (carries the estimate; nothing was fitted, sent or written).
        HoldoutOverBudget: scoring the held-out pairs alone would not fit the budget (nothing was sent).
        QualityGateError: the teacher is below a ``labeling.min_teacher_*`` threshold (carries the quality report,
            already written to ``out_dir``).
        StoppedByBudget: the budget ran out during the candidates (what was labelled is stored and cached).
        TooManyFailedPairs: more than ``labeling.max_failed_fraction`` of the candidates got no grade.
        ValueError: a bad labeling config, a held-out fraction that leaves one side empty, or a pair whose product
            is missing.
    """
    lc, seed = cfg.labeling, cfg.catalog.seed
    out = Labels(out_dir)
    # Step 1.
    human = human_labels[human_labels["product_id"].isin(set(products["product_id"]))]
    cands = candidate_pairs(products, search_log, human, lc, seed=seed)
    labels_dir = cfg.cache_dir() / "labels"  # outlives the run: a re-run pays nothing twice
    labels_dir.mkdir(parents=True, exist_ok=True)
    cache_path = labels_dir / "label_cache.sqlite"

    # Steps 2 and 3.
    fit, held_out = split_human_labels(human, lc.teacher_holdout_fraction, seed, lc.teacher_holdout_max_pairs)
    if lc.dry_run:
        with LabelCache(cache_path) as cache:
            raise DryRunEstimate(estimate_run(lc, requests_for(held_out, products), requests_for(cands, products), cache))

    # Step 4.
    labeler = build_labeler(lc, fit, products, seed, endpoint=endpoint, state_dir=labels_dir)
    budget = budget_for(lc)  # one budget for the whole step: held-out scoring and candidates
    store = LabelStore(labels_dir / "store")
    with LabelCache(cache_path) as cache:
        # Step 5.
        try:
            quality = score_labeler(labeler, held_out, products, cache, budget)
        except BudgetExhausted as exc:
            raise HoldoutOverBudget(len(held_out), str(exc)) from exc
        quality["n_train"], quality["n_holdout"] = len(fit), len(held_out)
        quality_files = write_quality_report(quality, out.dir)
        if on_teacher_scored is not None:
            on_teacher_scored(quality)
        # Step 6.
        check_quality(quality, **gate_thresholds(lc))
        # Step 7.
        streaming = label_pairs_streaming(requests_for(cands, products), labeler, cache, store, budget=budget,
                                          chunk_size=lc.label_chunk_size)
    if streaming.stopped_by_budget:
        raise StoppedByBudget(streaming)

    # Step 8.
    # Only grades of this run's pairs *on the product text they have now* count: a product whose text changed
    # and whose re-grade failed is a failed pair, never the old text's grade.
    current = cands[["query", "product_id"]].assign(
        text_key=[LabelCache.key(r, labeler.labeler_id) for r in requests_for(cands, products)])
    teacher, _ = store.ok_labels(labeler.labeler_id, current)
    n_failed = len(cands) - len(teacher)
    if n_failed > lc.max_failed_fraction * len(cands):
        raise TooManyFailedPairs(n_failed, len(cands), labeler.labeler_id, lc.max_failed_fraction, store.root)

    # Step 9.
    labels = combine_labels(human, teacher)
    labels.to_parquet(out.labels, index=False)
    report = {"labeler": labeler.labeler_id, **{k: quality[k] for k in ("accuracy", "kappa", "macro_f1", "n")},
              "n_holdout": len(held_out), "n_train": len(fit), "confusion": quality["confusion"],
              "label_counts": {str(k): int(v) for k, v in teacher["label"].value_counts().sort_index().items()}}
    write_json(out.teacher_report, report)
    write_json(out.labeling_summary, streaming.as_dict())
    logger.info("labelled %d candidate pairs with %s (%d failed); %d labels in all", len(teacher), labeler.labeler_id,
                n_failed, len(labels))
    return LabelingOutcome(labeler.labeler_id, quality, streaming, len(labels), len(teacher), len(human), n_failed,
                           (*quality_files.values(), out.labels, out.teacher_report, out.labeling_summary))
