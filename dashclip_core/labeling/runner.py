"""Stream (query, product) pairs through a labeler, chunk by chunk, with a cache, a store and a budget.

For every chunk of ``chunk_size`` requests:

1. look the chunk up in the label cache; hits are served as ``cached=True`` results (free);
2. send the misses to the labeler, once per cache key (two products with the same text are asked
   about once), and only as many as the budget's estimate still allows;
3. put the new ok results in the cache (failed ones are not cached, so the next run retries them);
4. append the chunk's results (cache hits, new labels, failures) to the label store as one part, each
   with its cache key (``text_key``: which product text it was graded on);
5. charge the budget with what the labeler reported; stop if a limit is reached or step 2 had to
   leave misses out.

Step 3 comes before step 4 on purpose: if the process dies between them, the labels are in the cache
and a re-run stores them for free; the other order would pay for that chunk again. Every finished
chunk is kept, whether the run ends normally, by budget, or by a crash.

Budget control uses *estimated* tokens before a request is sent (``Budget.estimate``), scaled by
the ratio of reported to estimated tokens observed so far in the run (never below 1), and the
*reported* tokens after. The actual spend can therefore overshoot a limit only by the estimation
error of the chunk in flight (in practice the first one, before the ratio is known).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace

from dashclip_core.labeling.base import Labeler, LabelRequest, LabelResult
from dashclip_core.labeling.budget import Budget, CostEstimate, estimate_cost
from dashclip_core.labeling.cache import LabelCache
from dashclip_core.labeling.store import LabelStore

logger = logging.getLogger(__name__)

_LOG_EVERY_CHUNKS = 50


@dataclass
class LabelingSummary:
    """What one :func:`label_pairs_streaming` call did (small; fits in XCom via :meth:`as_dict`)."""

    labeler_id: str
    n_requested: int = 0  # pairs read from the input (the rest is unread when the budget stops the run)
    n_cached: int = 0  # served from the label cache
    n_labelled: int = 0  # ok labels produced by the labeler in this run
    n_failed: int = 0  # failed pairs (stored as failed, not cached, retried by the next run)
    n_skipped: int = 0  # read but not sent because the budget ran out
    n_sent: int = 0  # requests actually sent to the labeler (one per distinct cache key in a chunk)
    n_chunks: int = 0
    input_tokens: int = 0  # reported by the labeler for this run's requests (cache hits cost nothing)
    output_tokens: int = 0
    cost_usd: float = 0.0  # at the budget's prices (0 without a budget)
    stopped_by_budget: bool = False
    dry_run: bool = False
    message: str = ""
    estimate: CostEstimate | None = None  # dry run only

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def cache_hit_rate(self) -> float:
        return self.n_cached / self.n_requested if self.n_requested else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens": self.tokens, "cache_hit_rate": self.cache_hit_rate}


def label_pairs_streaming(requests: Iterable[LabelRequest], labeler: Labeler, cache: LabelCache, store: LabelStore,
                          budget: Budget | None = None, chunk_size: int = 1000, dry_run: bool = False,
                          progress: Callable[[LabelingSummary], None] | None = None) -> LabelingSummary:
    """Label ``requests`` with ``labeler`` in chunks; every finished chunk is kept in ``store`` and ``cache``.

    Args:
        requests: the pairs, any iterable (read once, ``chunk_size`` at a time: memory stays flat).
        labeler: grades the cache misses; its ``labeler_id`` keys the cache and partitions the store.
        cache: the label cache (hits are free; new ok labels are added).
        store: the label store (one part per chunk: hits, new labels and failures with provenance).
        budget: spend limits and prices; None labels everything. A budget without limits only prices the run.
        chunk_size: requests per chunk (one cache lookup, one labeler call, one store part).
        dry_run: only estimate (cache hits free) and return; nothing is labelled or written.
        progress: called with the running summary after every chunk.

    Returns:
        The summary; ``stopped_by_budget`` and ``message`` say whether and why the run stopped early.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lid = labeler.labeler_id
    summary = LabelingSummary(lid, dry_run=dry_run)
    if dry_run:
        return _dry_run(requests, cache, lid, budget, chunk_size, summary)

    est_sent = actual_sent = 0  # tokens of the sent requests, estimated (unscaled) vs reported: the correction ratio
    it = iter(requests)
    while chunk := list(itertools.islice(it, chunk_size)):
        summary.n_chunks += 1
        summary.n_requested += len(chunk)
        # Step 1: cache lookup.
        keys = cache.keys(chunk, lid)
        hits = cache.get_many(chunk, lid, keys)
        served = [_as_request(hits[k], r) for k, r in zip(keys, chunk) if k in hits]
        groups: dict[str, list[LabelRequest]] = {}  # cache key -> the chunk's requests that share it
        for k, r in zip(keys, chunk):
            if k not in hits:
                groups.setdefault(k, []).append(r)
        to_send = [(k, rs[0]) for k, rs in groups.items()]

        # Step 2: as many misses as the budget allows, then the labeler.
        n_skipped = 0
        need = (0, 0)
        if budget is not None and to_send:
            raw = [budget.estimate(r) for _, r in to_send]  # (input, output) tokens per request, unscaled
            scale = max(1.0, actual_sent / est_sent) if est_sent else 1.0
            n_fit, need = _affordable(raw, budget, scale)
            n_skipped = sum(len(groups[k]) for k, _ in to_send[n_fit:])
            to_send = to_send[:n_fit]
            est_sent += sum(i + o for i, o in raw[:n_fit])
        sent_results = _call(labeler, to_send)

        # Steps 3 and 4: cache first, then the store (see the module docstring for why).
        cache.put_many(sent_results, [r for _, r in to_send])
        new = _fan_out(sent_results, to_send, groups)
        key_of = {(r.query, r.product_id): k for k, r in zip(keys, chunk)}  # the text each grade belongs to
        stored = [*served, *new]
        store.append(stored, partition=lid, text_keys=[key_of[(r.query, r.product_id)] for r in stored])

        # Step 5: charge and account.
        for res in sent_results:
            summary.input_tokens += res.input_tokens
            summary.output_tokens += res.output_tokens
            actual_sent += res.input_tokens + res.output_tokens
            if budget is not None:
                budget.charge(res)
        summary.n_sent += len(to_send)
        summary.n_cached += len(served)
        summary.n_labelled += sum(1 for r in new if r.status == "ok")
        summary.n_failed += sum(1 for r in new if r.status == "failed")
        summary.n_skipped += n_skipped
        summary.cost_usd = budget.cost(summary.input_tokens, summary.output_tokens) if budget is not None else 0.0
        if summary.n_chunks % _LOG_EVERY_CHUNKS == 0:
            logger.info("labelling %s: %d pairs read, %d cached, %d labelled, %d failed, %d tokens", lid,
                        summary.n_requested, summary.n_cached, summary.n_labelled, summary.n_failed, summary.tokens)
        if progress is not None:
            progress(summary)

        stop_message = ""
        if n_skipped:
            stop_message = f"{n_skipped:,} pairs of the last chunk did not fit (the chunk's misses need ~{sum(need):,} tokens): {budget.message()}"
        elif budget is not None and budget.exhausted and not _at_end(it):
            stop_message = f"limit reached: {budget.message()}"
        if stop_message:
            summary.stopped_by_budget = True
            summary.message = (f"stopped by budget after {summary.n_requested - summary.n_skipped:,} pairs "
                               f"({summary.n_labelled:,} labelled, {summary.n_cached:,} from cache); {stop_message}. "
                               "Labels so far are stored and cached; raise labeling.max_tokens / labeling.max_cost_usd "
                               "and re-run to label the rest")
            logger.warning("labelling %s: %s", lid, stop_message)
            return summary

    summary.message = (f"{summary.n_requested:,} pairs: {summary.n_cached:,} from cache ({summary.cache_hit_rate:.1%}), "
                       f"{summary.n_labelled:,} labelled, {summary.n_failed:,} failed; "
                       f"{summary.tokens:,} tokens, ${summary.cost_usd:,.4f}")
    logger.info("labelling %s: %s", lid, summary.message)
    return summary


def _dry_run(requests: Iterable[LabelRequest], cache: LabelCache, lid: str, budget: Budget | None, chunk_size: int,
             summary: LabelingSummary) -> LabelingSummary:
    b = budget if budget is not None else Budget()
    est = estimate_cost(requests, cache, lid, price_per_1k_input=b.price_per_1k_input,
                        price_per_1k_output=b.price_per_1k_output, output_tokens_per_pair=b.output_tokens_per_pair,
                        count_prompt_tokens=b.count_prompt_tokens, chunk_size=chunk_size)
    summary.estimate = est
    summary.n_requested, summary.n_cached = est.n_pairs, est.n_cached
    summary.message = (f"dry run: {est.n_pairs:,} pairs, {est.n_cached:,} cached (free), {est.n_to_label:,} to label: "
                       f"~{est.est_input_tokens:,} input + ~{est.est_output_tokens:,} output tokens, ~${est.est_cost_usd:,.4f}")
    if budget is not None:
        fits = b.fits(est.est_input_tokens, est.est_output_tokens)
        summary.message += "; fits the budget" if fits else f"; EXCEEDS the budget ({b.message()})"
    logger.info("labelling %s: %s", lid, summary.message)
    return summary


def _affordable(raw: list[tuple[int, int]], budget: Budget, scale: float) -> tuple[int, tuple[int, int]]:
    """How many requests, in order, fit the budget when each (input, output) estimate is multiplied by ``scale``.

    Returns:
        (n that fit, scaled (input, output) tokens of all of them).
    """
    est_in = [math.ceil(i * scale) for i, _ in raw]
    est_out = [math.ceil(o * scale) for _, o in raw]
    need = (sum(est_in), sum(est_out))
    if budget.fits(*need):
        return len(raw), need
    run_in = run_out = 0
    for n, (i, o) in enumerate(zip(est_in, est_out)):
        run_in, run_out = run_in + i, run_out + o
        if not budget.fits(run_in, run_out):
            return n, need
    return len(raw), need


def _call(labeler: Labeler, to_send: list[tuple[str, LabelRequest]]) -> list[LabelResult]:
    """Run the labeler; one result per sent request (a missing answer becomes a failed result)."""
    if not to_send:
        return []
    wanted = {(r.query, r.product_id) for _, r in to_send}
    got: dict[tuple[str, str], LabelResult] = {}
    for res in labeler.label([r for _, r in to_send]):
        pair = (res.query, res.product_id)
        if pair not in wanted:
            raise ValueError(f"labeler {labeler.labeler_id!r} returned a result for ({res.query!r}, {res.product_id!r}), "
                             "which it was not asked to label")
        if res.labeler_id != labeler.labeler_id:
            raise ValueError(f"labeler {labeler.labeler_id!r} returned a result with labeler_id {res.labeler_id!r}; "
                             "results must carry the labeler's own id (it keys the cache)")
        got.setdefault(pair, res)
    out = []
    for _, r in to_send:
        res = got.get((r.query, r.product_id))
        if res is None:
            res = LabelResult(r.query, r.product_id, None, "failed", labeler.labeler_id, reason="labeler returned no result for this pair")
        out.append(res)
    return out


def _fan_out(results: list[LabelResult], to_send: list[tuple[str, LabelRequest]], groups: dict[str, list[LabelRequest]]) -> list[LabelResult]:
    """One result per request of the chunk: requests sharing a key get a copy (tokens are counted once)."""
    out = []
    for res, (k, _) in zip(results, to_send):
        out.append(res)
        for other in groups[k][1:]:
            out.append(replace(res, query=other.query, product_id=other.product_id, input_tokens=0, output_tokens=0))
    return out


def _as_request(hit: LabelResult, request: LabelRequest) -> LabelResult:
    """The cached result addressed to ``request`` (a hit may come from another product with the same text)."""
    if hit.query == request.query and hit.product_id == request.product_id:
        return hit
    return replace(hit, query=request.query, product_id=request.product_id)


def _at_end(it) -> bool:
    """Whether the input iterator is exhausted (consumes one item otherwise; the caller is stopping anyway)."""
    return next(it, _END) is _END


_END = object()
