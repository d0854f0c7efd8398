"""Paid, long-running OpenAI jobs made resumable: Batch API grading and fine-tuning the teacher.

Both write the job's id to a small JSON record under a state folder as soon as the job exists, keyed by
a hash of what the job is for. A retried Airflow task therefore waits for the job it already paid
for instead of starting (and paying for) it again, and a later run with the same inputs reuses the
result. The state folder lives beside the label cache (``<cache>/labels``), so it outlives a run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from dashclip_core.config import LabelingConfig
from dashclip_core.labeling.base import LabelRequest, LabelResult
from dashclip_core.storage import write_json

if TYPE_CHECKING:
    from dashclip_core.labeling.openai_backend import OpenAICompatibleLabeler

logger = logging.getLogger(__name__)


class BatchAPILabeler:
    """The OpenAI Batch API behind the Labeler interface, resumable across task retries.

    Each chunk the runner hands over becomes one batch. Its id is saved under ``state_dir`` (keyed by a
    hash of the chunk's pairs) as soon as it is created, so a retried task polls the batch it already
    paid for instead of submitting it again. Once its results have been read the record is marked read:
    the same pairs sent again later (they failed, so they were not cached) go out in a new batch.

    Args:
        client: the API client that submits, polls and reads batches; its ``labeler_id`` is this labeler's.
        state_dir: where the batch records are kept (created if needed).
        poll_interval: seconds between status polls.
        timeout: seconds to wait for one batch.
    """

    def __init__(self, client: OpenAICompatibleLabeler, state_dir: Path, poll_interval: float, timeout: float) -> None:
        self.client = client
        self.labeler_id = client.labeler_id
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.poll_interval = poll_interval
        self.timeout = timeout

    def label(self, requests: Iterable[LabelRequest]) -> Iterator[LabelResult]:
        """Submits the requests as one batch (or resumes it), waits for it and yields its results."""
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


def fine_tuned_model(base_client: OpenAICompatibleLabeler, human: pd.DataFrame, state_dir: Path, cfg: LabelingConfig) -> str:
    """The ``ft:...`` model fine-tuned from ``base_client.model`` on ``human`` (DashCLIP's human labels → GPT teacher).

    Content-addressed and resumable: the job is keyed by a hash of (training file, base model, prompt version).
    Its id is saved as soon as the job exists and its model id when it succeeds, so a retried task waits for
    the job it already started, and a later run on the same human labels reuses the model without paying again.

    Args:
        base_client: the client of the base model to fine-tune.
        human: human labels joined with the product fields (the training examples).
        state_dir: where the job records are kept (created if needed).
        cfg: ``llm_batch_poll_s`` and ``llm_batch_timeout_s`` bound the wait.
    """
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
