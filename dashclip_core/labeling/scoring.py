"""What a labeler is worth before it grades the candidates: its score on held-out human labels, and what
scoring it and labelling the candidates would cost (the dry run).

The held-out pairs go through the label cache and the run's budget like the candidates do, so a retried
run does not pay them twice and the budget covers the whole step.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from dashclip_core.config import LabelingConfig
from dashclip_core.labeling.base import Labeler, LabelRequest
from dashclip_core.labeling.budget import Budget, budget_for, estimate_cost
from dashclip_core.labeling.cache import LabelCache
from dashclip_core.labeling.labelers import CachedLabeler
from dashclip_core.labeling.prompt import PROMPT_VERSION
from dashclip_core.labeling.quality import evaluate_teacher, pairs_with_product_text


def score_labeler(labeler: Labeler, held_out: pd.DataFrame, products: pd.DataFrame, cache: LabelCache,
                  budget: Budget | None = None) -> dict:
    """Quality of ``labeler`` on held-out human pairs (:func:`~dashclip_core.labeling.quality.evaluate_teacher`),
    through the cache; the pairs it pays for are charged to ``budget`` (the same budget then limits the candidates).

    Returns:
        The quality dict plus ``n_cached`` (held-out pairs served from the cache).

    Raises:
        BudgetExhausted: the held-out pairs alone would not fit the budget (nothing is sent).
    """
    cached = CachedLabeler(labeler, cache, budget)
    report = evaluate_teacher(cached, pairs_with_product_text(held_out, products))
    report["n_cached"] = cached.n_cached
    return report


def expected_labeler_id(cfg: LabelingConfig) -> str | None:
    """The id the configured labeler will have, known without building it (so without paying): the LLM's
    ``openai:<model>:<prompt>``; None for offline teachers (their id hashes the fit) and for a model still to be
    fine-tuned (nothing of it can be cached yet)."""
    if cfg.labeler == "openai" and not cfg.llm_fine_tune:
        return f"openai:{cfg.llm_model}:{PROMPT_VERSION}"
    return None


def estimate_run(cfg: LabelingConfig, held_out: Iterable[LabelRequest], candidates: Iterable[LabelRequest],
                 cache: LabelCache) -> str:
    """The dry run: what scoring the teacher and labelling the candidates would cost, from the cache and the
    prices alone. Nothing is sent (no teacher is fitted or fine-tuned either).

    Returns:
        One readable line: pairs, cache hits, pairs to label, tokens and dollars of each part, the total, and
        whether it fits the budget.
    """
    lid = expected_labeler_id(cfg)
    if cfg.labeler != "openai":
        n_held, n_cand = sum(1 for _ in held_out), sum(1 for _ in candidates)
        return (f"dry run: the offline {cfg.labeler} teacher would be fitted, scored on {n_held:,} held-out pairs and "
                f"grade {n_cand:,} candidate pairs; it costs no tokens")
    prices = {"price_per_1k_input": cfg.price_per_1k_input, "price_per_1k_output": cfg.price_per_1k_output}
    parts = [(name, estimate_cost(requests, cache if lid else None, lid or "", **prices))
             for name, requests in (("teacher scoring (held-out)", held_out), ("candidates", candidates))]
    total_tokens = sum(e.est_tokens for _, e in parts)
    total_cost = sum(e.est_cost_usd for _, e in parts)
    text = "; ".join(f"{name}: {e.n_pairs:,} pairs, {e.n_cached:,} cached, {e.n_to_label:,} to label, "
                     f"~{e.est_tokens:,} tokens, ~${e.est_cost_usd:,.4f}" for name, e in parts)
    budget = budget_for(cfg)
    verdict = ""
    if budget is not None and (budget.max_tokens is not None or budget.max_cost_usd is not None):
        fits = budget.fits(sum(e.est_input_tokens for _, e in parts), sum(e.est_output_tokens for _, e in parts))
        verdict = "; fits the budget" if fits else f"; EXCEEDS the budget ({budget.message()})"
    return f"dry run with {lid or cfg.llm_model + ' (fine-tuned first)'}: {text}; total ~{total_tokens:,} tokens, ~${total_cost:,.4f}{verdict}"
