"""The configured labeler, built from ``labeling.labeler`` (and, for offline teachers, fitted on human labels).

Kinds (``labeling.labeler``):
    softmax        MiniLM pair features + a softmax classifier (seconds; the tests' default).
    cross_encoder  MiniLM fine-tuned as a (query, product text) pair classifier: the offline stand-in for the
                   fine-tuned GPT teacher of DashCLIP (Sec. 3.3 of arXiv 2504.07110).
    openai         a chat model behind an OpenAI-compatible API (``llm_mode`` online or batch), optionally
                   fine-tuned on the human labels first (``llm_fine_tune``).

Each kind's heavy dependencies (torch, transformers, the HTTP client) are imported only when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dashclip_core.config import LabelingConfig
from dashclip_core.labeling.base import Labeler

LABELER_KINDS = ("softmax", "cross_encoder", "openai")


@dataclass(frozen=True)
class LLMEndpoint:
    """Where the OpenAI-compatible API is; the key is resolved by the caller (Airflow connection or env)."""

    base_url: str
    api_key: str | None = None


def build_labeler(cfg: LabelingConfig, fit: pd.DataFrame, products: pd.DataFrame, seed: int,
                  endpoint: LLMEndpoint | None = None, state_dir: Path | None = None) -> Labeler:
    """The configured labeler, fitted on ``fit`` (human labels) when it is an offline teacher.

    Args:
        cfg: ``labeler`` picks the kind; the other fields of that kind configure it.
        fit: human labels (query, product_id, label) the teacher learns from (offline fit, LLM fine-tune).
        products: the product fields joined onto ``fit`` by product_id.
        seed: seeds offline fits.
        endpoint: the API of an ``openai`` labeler.
        state_dir: where ``openai_jobs`` keeps batch and fine-tune records (needed by batch mode and fine-tuning).

    Raises:
        ValueError: an unknown ``labeling.labeler``, or openai without an endpoint, a model or a state folder.
    """
    kind = cfg.labeler
    if kind == "softmax":
        from dashclip_core.labeling.labelers import SoftmaxLabeler

        return SoftmaxLabeler(cfg, fit.merge(products, on="product_id", how="left", suffixes=("", "_p")), seed)
    if kind == "cross_encoder":
        from dashclip_core.labeling.cross_encoder import CrossEncoderTeacher
        from dashclip_core.labeling.quality import pairs_with_product_text

        teacher = CrossEncoderTeacher(cfg.teacher_encoder, max_length=cfg.cross_encoder_max_length,
                                      batch_size=cfg.cross_encoder_batch_size)
        return teacher.fit(pairs_with_product_text(fit, products), epochs=cfg.cross_encoder_epochs, seed=seed,
                           max_train_examples=cfg.cross_encoder_max_train_examples or None)
    if kind == "openai":
        return _openai_labeler(cfg, fit, products, endpoint, state_dir)
    raise ValueError(f"labeling.labeler must be one of {LABELER_KINDS}, got {kind!r}")


def _openai_labeler(cfg: LabelingConfig, fit: pd.DataFrame, products: pd.DataFrame, endpoint: LLMEndpoint | None,
                    state_dir: Path | None) -> Labeler:
    from dashclip_core.labeling.openai_backend import OpenAICompatibleLabeler
    from dashclip_core.labeling.openai_jobs import BatchAPILabeler, fine_tuned_model

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
