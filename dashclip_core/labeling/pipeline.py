"""One run's labelling: build the configured labeler, gate it on held-out human labels, then stream the
candidate pairs through the label cache, the budget and the label store.

The order matters for money: the teacher is scored on held-out human labels *before* any candidate is
sent, so a bad teacher (a wrong model id, a broken prompt) costs the held-out pairs only. The held-out
pairs go through the cache too, so a retried run pays for neither twice.

The labeler that is gated is the labeler that labels: offline teachers are fitted once, on the human
'train' labels outside the held-out queries, and that fitted model both gets scored and grades the
candidates (no refit on all labels afterwards, whose quality nobody measured).

Kinds (``labeling.labeler``):
    softmax        MiniLM pair features + a softmax classifier (seconds; the tests' default).
    cross_encoder  MiniLM fine-tuned as a (query, product text) pair classifier: the offline stand-in for the
                   fine-tuned GPT teacher of DashCLIP (Sec. 3.3 of arXiv 2504.07110).
    openai         a chat model behind an OpenAI-compatible API (``llm_mode`` online or batch).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dashclip_core.config import LabelingConfig
from dashclip_core.labeling.base import LabelRequest, LabelResult
from dashclip_core.labeling.cache import LabelCache

logger = logging.getLogger(__name__)

LABELER_KINDS = ("softmax", "cross_encoder", "openai")
_PRODUCT_FIELDS = ("title", "description", "category", "aisle")


def _text_or_none(value) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def requests_for(pairs: pd.DataFrame, products: pd.DataFrame) -> Iterator[LabelRequest]:
    """One :class:`LabelRequest` per (query, product_id) row, with the product fields a prompt shows.

    Raises:
        ValueError: a pair names a product_id that is not in ``products``.
    """
    fields = {r["product_id"]: r for r in products.to_dict("records")}
    for i, (query, pid) in enumerate(zip(pairs["query"].tolist(), pairs["product_id"].tolist())):
        product = fields.get(pid)
        if product is None:
            raise ValueError(f"pair row {i}: product_id {pid!r} (query {query!r}) is not in the products table")
        yield LabelRequest(query=str(query), product_id=str(pid), **{f: _text_or_none(product.get(f)) for f in _PRODUCT_FIELDS})


def split_human_labels(human: pd.DataFrame, holdout_fraction: float, seed: int,
                       max_holdout: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(fit, held_out) from the human 'train' split, cut by query so no query is on both sides; ``held_out``
    is a seeded sample of at most ``max_holdout`` rows (scoring an LLM teacher costs a call per pair)."""
    from dashclip_core.labeling.teacher import holdout_mask

    train = human[human["split"] == "train"].reset_index(drop=True)
    held = holdout_mask(train["query"], holdout_fraction, seed)
    if held.all() or not held.any():
        raise ValueError(f"labeling.teacher_holdout_fraction={holdout_fraction} of {train['query'].nunique()} human-labelled "
                         "queries leaves no queries to fit or none to score the teacher on")
    held_out = train[held]
    if max_holdout is not None and len(held_out) > max_holdout:
        held_out = held_out.sample(n=max_holdout, random_state=seed)
    return train[~held].reset_index(drop=True), held_out.reset_index(drop=True)


# ---- offline teachers behind the Labeler interface --------------------------------------------------------


class SoftmaxLabeler:
    """:class:`~dashclip_core.baselines.softmax_regression.SoftmaxRegression` on MiniLM pair features, as a Labeler.

    ``labeler_id`` hashes the fit labels and hyperparameters: a teacher refitted on other labels gets
    another id, so the cache never serves the old teacher's grades for it.
    """

    def __init__(self, cfg: LabelingConfig, fit: pd.DataFrame, seed: int) -> None:
        from dashclip_core.baselines.softmax_regression import SoftmaxRegression
        from dashclip_core.labeling.teacher import (
            LABELER_VERSION,
            PairFeatures,
            SentenceEncoder,
            teacher_text,
        )

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
        requests = list(requests)
        texts = [self._text({f: getattr(r, f) for f in _PRODUCT_FIELDS}) for r in requests]
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
    """

    def __init__(self, labeler, cache: LabelCache, budget=None) -> None:
        self.inner = labeler
        self.cache = cache
        self.budget = budget
        self.labeler_id = labeler.labeler_id
        self.n_cached = 0

    def label(self, requests: Iterable[LabelRequest]) -> Iterator[LabelResult]:
        """Cache hits, then the misses from the inner labeler. With a budget, the misses' estimated cost must
        fit it (else :class:`~dashclip_core.labeling.budget.BudgetExhausted`, nothing sent) and what they
        really cost is charged to it."""
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


class BatchAPILabeler:
    """The OpenAI Batch API behind the Labeler interface, resumable across task retries.

    Each chunk the runner hands over becomes one batch. Its id is saved under ``state_dir`` (keyed by a
    hash of the chunk's pairs) as soon as it is created, so a retried task polls the batch it already
    paid for instead of submitting it again. Once its results have been read the record is marked read:
    the same pairs sent again later (they failed, so they were not cached) go out in a new batch.
    """

    def __init__(self, client, state_dir: Path, poll_interval: float, timeout: float) -> None:
        self.client = client
        self.labeler_id = client.labeler_id
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.poll_interval = poll_interval
        self.timeout = timeout

    def label(self, requests: Iterable[LabelRequest]) -> Iterator[LabelResult]:
        from dashclip_core.storage import write_json

        requests = list(requests)
        if not requests:
            return
        ids = sorted(self.client.custom_id(r) for r in requests)
        state = self.state_dir / f"batch-{hashlib.sha256(''.join(ids).encode()).hexdigest()[:16]}.json"
        record = json.loads(state.read_text()) if state.exists() else {}
        if record.get("batch_id") and not record.get("read"):
            batch_id = record["batch_id"]
            logger.info("resuming batch %s for %d pairs (%s)", batch_id, len(requests), state)
        else:  # new pairs, or the same pairs again after their batch was read (its failures are being retried)
            batch_id = self.client.submit_batch(requests)
            record = {"batch_id": batch_id, "n_pairs": len(requests), "labeler_id": self.labeler_id}
            write_json(state, record)
        self.client.poll_batch(batch_id, self.poll_interval, self.timeout)
        yield from self.client.batch_results(batch_id, requests)
        write_json(state, {**record, "read": True})


# ---- building and gating ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LLMEndpoint:
    """Where the OpenAI-compatible API is; the key is resolved by the caller (Airflow connection or env)."""

    base_url: str
    api_key: str | None = None


def build_labeler(cfg: LabelingConfig, fit: pd.DataFrame, products: pd.DataFrame, seed: int,
                  endpoint: LLMEndpoint | None = None, state_dir: Path | None = None):
    """The configured labeler, fitted on ``fit`` (human labels) when it is an offline teacher.

    Raises:
        ValueError: an unknown ``labeling.labeler``, or openai without an endpoint or model.
    """
    kind = cfg.labeler
    if kind == "softmax":
        return SoftmaxLabeler(cfg, fit.merge(products, on="product_id", how="left", suffixes=("", "_p")), seed)
    if kind == "cross_encoder":
        from dashclip_core.labeling.cross_encoder import CrossEncoderTeacher
        from dashclip_core.labeling.quality import pairs_with_product_text

        teacher = CrossEncoderTeacher(cfg.teacher_encoder, max_length=cfg.cross_encoder_max_length,
                                      batch_size=cfg.cross_encoder_batch_size)
        return teacher.fit(pairs_with_product_text(fit, products), epochs=cfg.cross_encoder_epochs, seed=seed,
                           max_train_examples=cfg.cross_encoder_max_train_examples or None)
    if kind == "openai":
        from dashclip_core.labeling.openai_backend import OpenAICompatibleLabeler

        if endpoint is None or not endpoint.base_url:
            raise ValueError("labeling.labeler=openai needs an API base URL: set the Airflow connection "
                             f"{cfg.llm_connection_id!r}, $DASHCLIP_LLM_BASE_URL or labeling.llm_base_url")
        if not cfg.llm_model:
            raise ValueError("labeling.labeler=openai needs labeling.llm_model (e.g. a fine-tuned ft:... model id)")
        if state_dir is None and (cfg.llm_mode == "batch" or cfg.llm_fine_tune):
            raise ValueError("labeling.llm_mode=batch and labeling.llm_fine_tune need a state folder for job ids")

        def client_for(model: str) -> OpenAICompatibleLabeler:
            return OpenAICompatibleLabeler(endpoint.base_url, model, endpoint.api_key, concurrency=cfg.llm_concurrency,
                                           max_retries=cfg.llm_max_retries, backoff_base=cfg.llm_backoff_s,
                                           backoff_max=cfg.llm_backoff_max_s, timeout=cfg.llm_timeout_s)

        model = cfg.llm_model
        if cfg.llm_fine_tune:
            model = fine_tuned_model(client_for(model), pd.merge(fit, products, on="product_id", how="left", suffixes=("", "_p")),
                                     Path(state_dir) / "fine_tunes", cfg)
        client = client_for(model)
        if cfg.llm_mode == "online":
            return client
        if cfg.llm_mode == "batch":
            return BatchAPILabeler(client, Path(state_dir) / "batches", cfg.llm_batch_poll_s, cfg.llm_batch_timeout_s)
        raise ValueError(f"labeling.llm_mode must be 'online' or 'batch', got {cfg.llm_mode!r}")
    raise ValueError(f"labeling.labeler must be one of {LABELER_KINDS}, got {kind!r}")


def fine_tuned_model(base_client, human: pd.DataFrame, state_dir: Path, cfg: LabelingConfig) -> str:
    """The ``ft:...`` model fine-tuned from ``base_client.model`` on ``human`` (DashCLIP's human labels → GPT teacher).

    Content-addressed and resumable: the job is keyed by a hash of (training file, base model, prompt version).
    Its id is saved as soon as the job exists and its model id when it succeeds, so a retried task waits for
    the job it already started, and a later run on the same human labels reuses the model without paying again.
    """
    from dashclip_core.storage import write_json

    training = base_client.fine_tuning_jsonl(human)
    digest = hashlib.sha256(training + f"|{base_client.model}|{base_client.prompt_version}".encode()).hexdigest()[:16]
    state_dir.mkdir(parents=True, exist_ok=True)
    state = state_dir / f"fine-tune-{digest}.json"
    record = json.loads(state.read_text()) if state.exists() else {}
    if record.get("model"):
        logger.info("reusing fine-tuned model %s (%s)", record["model"], state)
        return record["model"]
    if not record.get("job_id"):
        record = {"job_id": base_client.start_fine_tune(training, base_client.model, "dashclip"), "base_model": base_client.model,
                  "n_examples": training.count(b"\n")}
        write_json(state, record)
    record["model"] = base_client.wait_fine_tune(record["job_id"], cfg.llm_batch_poll_s, cfg.llm_batch_timeout_s)
    write_json(state, record)
    return record["model"]


def score_labeler(labeler, held_out: pd.DataFrame, products: pd.DataFrame, cache: LabelCache, budget=None) -> dict:
    """Quality of ``labeler`` on held-out human pairs (accuracy, macro-F1, kappa, confusion), through the cache;
    the pairs it pays for are charged to ``budget`` (the same budget then limits the candidates).

    Raises:
        BudgetExhausted: the held-out pairs alone would not fit the budget (nothing is sent).
    """
    from dashclip_core.labeling.quality import evaluate_teacher, pairs_with_product_text

    cached = CachedLabeler(labeler, cache, budget)
    report = evaluate_teacher(cached, pairs_with_product_text(held_out, products))
    report["n_cached"] = cached.n_cached
    return report


def expected_labeler_id(cfg: LabelingConfig) -> str | None:
    """The id the configured labeler will have, known without building it (so without paying): the LLM's
    ``openai:<model>:<prompt>``; None for offline teachers (their id hashes the fit) and for a model still to be
    fine-tuned (nothing of it can be cached yet)."""
    from dashclip_core.labeling.prompt import PROMPT_VERSION

    if cfg.labeler == "openai" and not cfg.llm_fine_tune:
        return f"openai:{cfg.llm_model}:{PROMPT_VERSION}"
    return None


def estimate_run(cfg: LabelingConfig, held_out: Iterable[LabelRequest], candidates: Iterable[LabelRequest],
                 cache: LabelCache) -> str:
    """The dry run: what scoring the teacher and labelling the candidates would cost, from the cache and the
    prices alone. Nothing is sent (no teacher is fitted or fine-tuned either)."""
    from dashclip_core.labeling.budget import estimate_cost

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


def gate_thresholds(cfg: LabelingConfig) -> dict:
    return {"min_accuracy": cfg.min_teacher_accuracy, "min_kappa": cfg.min_teacher_kappa,
            "min_macro_f1": cfg.min_teacher_macro_f1 or None}


def budget_for(cfg: LabelingConfig):
    """The run's :class:`~dashclip_core.labeling.budget.Budget` (limits None = unlimited), or None offline."""
    from dashclip_core.labeling.budget import Budget

    if cfg.labeler != "openai" and cfg.max_tokens is None and cfg.max_cost_usd is None:
        return None
    return Budget(max_tokens=cfg.max_tokens, max_cost_usd=cfg.max_cost_usd, price_per_1k_input=cfg.price_per_1k_input,
                  price_per_1k_output=cfg.price_per_1k_output)


def ok_labels(store, labeler_id: str) -> tuple[pd.DataFrame, int]:
    """(query, product_id, label) of the ok grades ``labeler_id`` gave in ``store``, and how many pairs only failed."""
    frame = store.read(labeler_id)  # one row per pair: its latest ok grade, else its latest failure
    ok = frame[frame["status"] == "ok"]
    labels = ok[["query", "product_id", "label"]].astype({"label": np.int8}).reset_index(drop=True)
    return labels, int((frame["status"] == "failed").sum())
