"""Token and dollar budget for paid labelers, and the pre-run cost estimate (dry run).

A :class:`Budget` records what results actually cost (``charge``) and tells the runner whether the
next batch of requests still fits (``fits``), using an *estimate* of their tokens because the real
count is known only after the call. Estimates (``estimate_tokens``):

- input: ``ceil(chars / 4)`` of the text the prompt shows (query, title, description, category,
  aisle) plus ``PROMPT_OVERHEAD_TOKENS`` for the fixed instructions; ~4 characters per token is
  OpenAI's rule of thumb for English text. Pass ``count_prompt_tokens`` (e.g. the backend's own
  prompt renderer + tokenizer) to count precisely instead.
- output: a fixed ``output_tokens_per_pair`` (a grade and a one-line reason).

Cache hits are free: :func:`estimate_cost` looks every pair up in the cache first.
:func:`budget_for` builds a run's one budget (held-out scoring and candidates) from the config.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from dashclip_core.labeling.base import LabelRequest, LabelResult

if TYPE_CHECKING:
    from dashclip_core.config import LabelingConfig
    from dashclip_core.labeling.cache import LabelCache

CHARS_PER_TOKEN = 4  # rule of thumb for English text with BPE tokenizers
# Prompt relevance-v1: a 1,034-char system prompt + ~140 chars of JSON scaffolding around the fields -> ~295
# tokens at 4 chars/token, plus ~4 tokens of chat framing per message.
PROMPT_OVERHEAD_TOKENS = 300
OUTPUT_TOKENS_PER_PAIR = 40  # {"label": 2, "reason": "<one short sentence, at most 200 characters>"}

TokenCounter = Callable[[LabelRequest], int]


class BudgetExhausted(RuntimeError):
    """The next requests would exceed (or the spend has reached) a token or dollar limit."""


def estimate_tokens(request: LabelRequest, count_prompt_tokens: TokenCounter | None = None,
                    overhead_tokens: int = PROMPT_OVERHEAD_TOKENS) -> int:
    """Estimated input (prompt) tokens of one request.

    Args:
        request: the pair.
        count_prompt_tokens: exact counter of the rendered prompt; when given, it is used as is.
        overhead_tokens: fixed prompt tokens around the pair's fields (heuristic only).

    Returns:
        ``count_prompt_tokens(request)``, or ``ceil(chars / 4) + overhead_tokens`` over the shown fields.
    """
    if count_prompt_tokens is not None:
        return int(count_prompt_tokens(request))
    chars = sum(len(v) for v in (request.query, request.title, request.description, request.category, request.aisle) if v)
    return math.ceil(chars / CHARS_PER_TOKEN) + overhead_tokens


@dataclass(frozen=True)
class BudgetRemaining:
    tokens: int | None  # None: no token limit
    cost_usd: float | None  # None: no dollar limit


@dataclass
class Budget:
    """Spend limits for one labelling run; None means no limit of that kind.

    Args:
        max_tokens: limit on input + output tokens actually charged.
        max_cost_usd: limit on dollars actually charged.
        price_per_1k_input: USD per 1000 input tokens.
        price_per_1k_output: USD per 1000 output tokens.
        output_tokens_per_pair: estimated output tokens of one answer.
        count_prompt_tokens: exact prompt-token counter for estimates (default: the chars/4 heuristic).
    """

    max_tokens: int | None = None
    max_cost_usd: float | None = None
    price_per_1k_input: float = 0.0
    price_per_1k_output: float = 0.0
    output_tokens_per_pair: int = OUTPUT_TOKENS_PER_PAIR
    count_prompt_tokens: TokenCounter | None = field(default=None, repr=False)
    spent_input_tokens: int = field(default=0, init=False)
    spent_output_tokens: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_cost_usd"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"Budget.{name} must be >= 0 or None (no limit), got {value}")
        for name in ("price_per_1k_input", "price_per_1k_output", "output_tokens_per_pair"):
            if getattr(self, name) < 0:
                raise ValueError(f"Budget.{name} must be >= 0, got {getattr(self, name)}")

    # ---- spend ----------------------------------------------------------------------------------

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return input_tokens / 1000 * self.price_per_1k_input + output_tokens / 1000 * self.price_per_1k_output

    @property
    def spent_tokens(self) -> int:
        return self.spent_input_tokens + self.spent_output_tokens

    @property
    def spent_cost_usd(self) -> float:
        return self.cost(self.spent_input_tokens, self.spent_output_tokens)

    def charge(self, result: LabelResult) -> None:
        """Record what a result cost. Cached results were paid for by an earlier run and cost nothing."""
        if not result.cached:
            self.spent_input_tokens += result.input_tokens
            self.spent_output_tokens += result.output_tokens

    @property
    def remaining(self) -> BudgetRemaining:
        tokens = None if self.max_tokens is None else max(0, self.max_tokens - self.spent_tokens)
        cost = None if self.max_cost_usd is None else max(0.0, self.max_cost_usd - self.spent_cost_usd)
        return BudgetRemaining(tokens, cost)

    @property
    def exhausted(self) -> bool:
        """True once the spend has reached a limit (a limit of 0 is exhausted from the start)."""
        rem = self.remaining
        return (rem.tokens is not None and rem.tokens <= 0) or (rem.cost_usd is not None and rem.cost_usd <= 0)

    # ---- estimates ------------------------------------------------------------------------------

    def estimate(self, request: LabelRequest) -> tuple[int, int]:
        """(input, output) tokens one request is expected to cost."""
        return estimate_tokens(request, self.count_prompt_tokens), self.output_tokens_per_pair

    def fits(self, input_tokens: int, output_tokens: int) -> bool:
        """Whether spending this much more stays within every limit."""
        rem = self.remaining
        if rem.tokens is not None and input_tokens + output_tokens > rem.tokens:
            return False
        return rem.cost_usd is None or self.cost(input_tokens, output_tokens) <= rem.cost_usd + 1e-12

    def message(self, next_input_tokens: int = 0, next_output_tokens: int = 0) -> str:
        """Human-readable state: which limit is hit, what was spent, what the next requests need."""
        parts = []
        if self.max_tokens is not None:
            parts.append(f"token limit {self.max_tokens:,} (spent {self.spent_tokens:,}, "
                         f"remaining {self.remaining.tokens:,})")
        if self.max_cost_usd is not None:
            parts.append(f"cost limit ${self.max_cost_usd:,.4f} (spent ${self.spent_cost_usd:,.4f}, "
                         f"remaining ${self.remaining.cost_usd:,.4f})")
        text = "; ".join(parts) or "no limit"
        if next_input_tokens or next_output_tokens:
            text += (f"; the next requests need ~{next_input_tokens + next_output_tokens:,} tokens "
                     f"(~${self.cost(next_input_tokens, next_output_tokens):,.4f})")
        return text

    def require(self, input_tokens: int, output_tokens: int) -> None:
        """Raise :class:`BudgetExhausted` unless ``fits(input_tokens, output_tokens)``."""
        if not self.fits(input_tokens, output_tokens):
            raise BudgetExhausted(f"labelling budget exhausted: {self.message(input_tokens, output_tokens)}; "
                                  "raise labeling.max_tokens / labeling.max_cost_usd to label the rest")

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "count_prompt_tokens"}
        out.update(spent_tokens=self.spent_tokens, spent_cost_usd=self.spent_cost_usd)
        return out


@dataclass(frozen=True)
class CostEstimate:
    """What labelling a set of pairs would cost (cache hits are free)."""

    n_pairs: int
    n_cached: int
    n_to_label: int
    est_input_tokens: int
    est_output_tokens: int
    est_cost_usd: float

    @property
    def est_tokens(self) -> int:
        return self.est_input_tokens + self.est_output_tokens


def budget_for(cfg: LabelingConfig) -> Budget | None:
    """The run's :class:`Budget` from ``labeling.max_tokens`` / ``max_cost_usd`` and the prices (a limit left at None is
    unlimited); None for an offline teacher without limits (it costs nothing to price)."""
    if cfg.labeler != "openai" and cfg.max_tokens is None and cfg.max_cost_usd is None:
        return None
    return Budget(max_tokens=cfg.max_tokens, max_cost_usd=cfg.max_cost_usd, price_per_1k_input=cfg.price_per_1k_input,
                  price_per_1k_output=cfg.price_per_1k_output)


def estimate_cost(requests: Iterable[LabelRequest], cache: LabelCache | None, labeler_id: str, *,
                  price_per_1k_input: float = 0.0, price_per_1k_output: float = 0.0,
                  output_tokens_per_pair: int = OUTPUT_TOKENS_PER_PAIR, count_prompt_tokens: TokenCounter | None = None,
                  chunk_size: int = 10_000) -> CostEstimate:
    """Estimate the cost of labelling ``requests`` with ``labeler_id``, streaming in chunks.

    Pairs already in ``cache`` are free. Pairs with the same key in one chunk are counted once (the
    runner sends them once); repeats across chunks are counted again, so the estimate errs high.

    Args:
        requests: the pairs (any iterable; read once).
        cache: the label cache, or None to assume nothing is cached.
        labeler_id: the labeler whose cache entries count.
        price_per_1k_input: USD per 1000 input tokens.
        price_per_1k_output: USD per 1000 output tokens.
        output_tokens_per_pair: estimated output tokens of one answer.
        count_prompt_tokens: exact prompt-token counter (default: chars/4 + overhead).
        chunk_size: requests looked up per cache query batch.
    """
    from dashclip_core.labeling.cache import LabelCache

    n_pairs = n_cached = n_to_label = est_in = 0
    it = iter(requests)
    while chunk := list(itertools.islice(it, chunk_size)):
        keys = [LabelCache.key(r, labeler_id) for r in chunk]
        hits = cache.get_many(chunk, labeler_id, keys) if cache is not None else {}
        misses = _unique_misses(chunk, keys, hits)
        n_pairs += len(chunk)
        n_cached += sum(1 for k in keys if k in hits)
        n_to_label += len(misses)
        est_in += sum(estimate_tokens(r, count_prompt_tokens) for r in misses)
    est_out = n_to_label * output_tokens_per_pair
    cost = est_in / 1000 * price_per_1k_input + est_out / 1000 * price_per_1k_output
    return CostEstimate(n_pairs, n_cached, n_to_label, est_in, est_out, cost)


def _unique_misses(chunk: Sequence[LabelRequest], keys: Sequence[str], hits: dict) -> list[LabelRequest]:
    seen: set[str] = set()
    out = []
    for k, r in zip(keys, chunk):
        if k not in hits and k not in seen:
            seen.add(k)
            out.append(r)
    return out
