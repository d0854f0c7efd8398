"""Paid, long-running OpenAI jobs made resumable: Batch API grading and fine-tuning the teacher.

Both write the job's id to a small JSON record under a state folder as soon as the job exists, keyed by
a hash of what the job is for. A retried Airflow task therefore waits for the job it already paid
for instead of starting (and paying for) it again, and a later run with the same inputs reuses the
result. The state folder lives beside the label cache (``<cache>/labels``), so it outlives a run.

A record is the only link to a paid job, so it is never left half-written: :func:`write_state` writes a
temp file in the same folder, fsyncs it and renames it over the record (``os.replace``), so a crash or a
full disk leaves the previous record whole. A record that is unreadable anyway (truncated by an older
version, edited by hand) is reported with its path, moved aside to ``<name>.corrupt-<time>`` and treated as
absent by :func:`read_state`, so one bad file does not fail every retry. A fine-tuning job that ended
failed or cancelled has its id cleared from the record (kept as ``failed_job_id`` with the error): the
next attempt starts a new job instead of waiting on the dead one forever.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from dashclip_core.config import LabelingConfig
from dashclip_core.labeling.base import LabelRequest, LabelResult

if TYPE_CHECKING:
    from dashclip_core.labeling.openai_backend import OpenAICompatibleLabeler

logger = logging.getLogger(__name__)


def write_state(path: Path, record: dict) -> None:
    """Replace the JSON record at ``path`` atomically: temp file in the same folder, fsync, ``os.replace``."""
    path = Path(path)
    data = json.dumps(record, indent=2, sort_keys=True, default=str).encode()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_state(path: Path) -> dict:
    """The JSON record at ``path``; {} when there is none, or when it is unreadable (then it is moved aside).

    An unreadable record lost the id of its job: the job cannot be resumed from it, and failing on it would
    fail every retry. The file is kept (renamed ``<name>.corrupt-<unix time>``) for whoever wants to look.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")  # noqa: TRY004 (a bad file, handled below)
        return record
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        os.replace(path, aside)
        logger.warning("job record %s is unreadable (%s: %s; %d bytes); moved it to %s and starting as if it were absent",
                       path, type(exc).__name__, exc, len(raw), aside)
        return {}


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
        record = read_state(state)
        if record.get("batch_id") and not record.get("read"):
            batch_id = record["batch_id"]
            logger.info("resuming batch %s for %d pairs (%s)", batch_id, len(requests), state)
        else:  # new pairs, or the same pairs again after their batch was read (its failures are being retried)
            batch_id = self.client.submit_batch(requests)
            record = {"batch_id": batch_id, "n_pairs": len(requests), "labeler_id": self.labeler_id}
            write_state(state, record)
        self.client.poll_batch(batch_id, self.poll_interval, self.timeout)
        yield from self.client.batch_results(batch_id, requests)
        write_state(state, {**record, "read": True})


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

    Raises:
        FineTuneFailed: the job failed or was cancelled; its id is cleared from the record first, so the
            next call starts a new job.
    """
    from dashclip_core.labeling.openai_backend import FineTuneFailed  # openai is imported only by LLM labelers

    training = base_client.fine_tuning_jsonl(human)
    digest = hashlib.sha256(training + f"|{base_client.model}|{base_client.prompt_version}".encode()).hexdigest()[:16]
    state_dir.mkdir(parents=True, exist_ok=True)
    state = state_dir / f"fine-tune-{digest}.json"
    record = read_state(state)
    if record.get("model"):
        logger.info("reusing fine-tuned model %s (%s)", record["model"], state)
        return record["model"]
    if not record.get("job_id"):
        record = {**record, "job_id": base_client.start_fine_tune(training, base_client.model, "dashclip"),
                  "base_model": base_client.model, "n_examples": training.count(b"\n")}
        write_state(state, record)
    try:
        record["model"] = base_client.wait_fine_tune(record["job_id"], cfg.llm_batch_poll_s, cfg.llm_batch_timeout_s)
    except FineTuneFailed as exc:  # a dead job never succeeds: forget it, so the retry starts a new one
        failed = {k: v for k, v in record.items() if k != "job_id"}
        write_state(state, {**failed, "failed_job_id": record["job_id"], "failed_error": str(exc)})
        raise
    write_state(state, record)
    return record["model"]
