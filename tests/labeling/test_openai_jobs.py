"""openai_jobs.py: the resumable Batch API labeler and the fine-tune that runs once per training set."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import dashclip_tests_openai_server as fake  # tests/labeling/openai_server.py, registered by tests/conftest.py
import pandas as pd
import pytest

from dashclip_core.config import LabelingConfig
from dashclip_core.labeling.build import LLMEndpoint, build_labeler
from dashclip_core.labeling.label_requests import requests_for
from dashclip_core.labeling.openai_jobs import BatchAPILabeler


def test_batch_labeler_resumes_the_batch_it_already_submitted(tmp_path, three_products):
    from dashclip_core.labeling.openai_backend import OpenAICompatibleLabeler

    requests = list(requests_for(pd.DataFrame({"query": ["oat milk", "apples"], "product_id": ["p1", "p2"]}), three_products))
    with fake.FakeOpenAIServer(api_key="sk-b", batch_polls=1) as srv:
        client = OpenAICompatibleLabeler(srv.base_url, "gpt-test", "sk-b", backoff_base=0.0)
        # Given a task that submitted a batch and died before reading all of its results
        interrupted = BatchAPILabeler(client, tmp_path, 0.01, 10.0).label(requests)
        next(interrupted)
        interrupted.close()
        # When the retried task labels the same pairs (in another order, with a fresh labeler object)
        resumed = {(r.query, r.product_id): r.label for r in BatchAPILabeler(client, tmp_path, 0.01, 10.0).label(reversed(requests))}
        # Then it polls the batch it already paid for instead of submitting it again
        assert srv.count("batches_create") == 1 and srv.count("files_upload") == 1
        assert resumed == {("oat milk", "p1"): 2, ("apples", "p2"): 2}
        # and once that batch was read, the same pairs sent again (as failed pairs would be) go out in a new batch
        list(BatchAPILabeler(client, tmp_path, 0.01, 10.0).label(requests))
        assert srv.count("batches_create") == 2
    assert len(list(tmp_path.glob("batch-*.json"))) == 1


def test_fine_tune_runs_once_per_training_set_and_its_model_grades(tmp_path, three_products):
    human = pd.DataFrame({"query": ["oat milk", "apples", "soap"], "product_id": ["p1", "p2", "p3"], "label": [2, 2, 0]})
    cfg = LabelingConfig(labeler="openai", llm_model="gpt-base", llm_fine_tune=True, llm_batch_poll_s=0.01, llm_backoff_s=0.0)
    with fake.FakeOpenAIServer(api_key="sk-f", fine_tune_polls=1) as srv:
        endpoint = LLMEndpoint(srv.base_url, "sk-f")
        first = build_labeler(cfg, human, three_products, seed=0, endpoint=endpoint, state_dir=tmp_path)
        again = build_labeler(cfg, human, three_products, seed=0, endpoint=endpoint, state_dir=tmp_path)
        assert srv.count("ft_create") == 1  # the second build reuses the fine-tuned model
        other = build_labeler(cfg, human.assign(label=[2, 1, 0]), three_products, seed=0, endpoint=endpoint, state_dir=tmp_path)
        assert srv.count("ft_create") == 2  # other human labels: another fine-tune
        upload = srv.of("files_upload")[0].body
    assert first.model == again.model == other.model and first.model.startswith("ft:")  # the fake names every job alike
    assert first.labeler_id == f"openai:{first.model}:relevance-v1"
    assert "oat milk" in str(upload)  # the training file holds the human labels


def fine_tune_setup(three_products):
    human = pd.DataFrame({"query": ["oat milk", "apples", "soap"], "product_id": ["p1", "p2", "p3"], "label": [2, 2, 0]})
    cfg = LabelingConfig(labeler="openai", llm_model="gpt-base", llm_fine_tune=True, llm_batch_poll_s=0.01, llm_backoff_s=0.0)
    return human, cfg


def test_a_failed_fine_tune_is_forgotten_and_the_retry_starts_a_new_job(tmp_path, three_products):
    from dashclip_core.labeling.openai_backend import FineTuneFailed

    human, cfg = fine_tune_setup(three_products)
    with fake.FakeOpenAIServer(api_key="sk-f", fine_tune_polls=1, fine_tune_error={"code": "invalid_file", "message": "bad"}) as srv:
        endpoint = LLMEndpoint(srv.base_url, "sk-f")
        # Given a fine-tuning job that ends failed
        with pytest.raises(FineTuneFailed, match="invalid_file"):
            build_labeler(cfg, human, three_products, seed=0, endpoint=endpoint, state_dir=tmp_path)
        (record_path,) = tmp_path.glob("fine_tunes/fine-tune-*.json")
        record = json.loads(record_path.read_text())
        # Then its id is cleared from the record (kept for inspection as failed_job_id)
        assert "job_id" not in record and record["failed_job_id"] and "invalid_file" in record["failed_error"]
        # and when the cause is fixed, the retry starts a new job instead of waiting on the dead one (HEAD failed again)
        srv.fine_tune_error = None
        labeler = build_labeler(cfg, human, three_products, seed=0, endpoint=endpoint, state_dir=tmp_path)
        assert srv.count("ft_create") == 2 and labeler.model.startswith("ft:")
        assert json.loads(record_path.read_text())["model"] == labeler.model


def test_a_truncated_fine_tune_record_is_moved_aside_not_fatal(tmp_path, three_products, caplog):
    human, cfg = fine_tune_setup(three_products)
    with fake.FakeOpenAIServer(api_key="sk-f", fine_tune_polls=1) as srv:
        endpoint = LLMEndpoint(srv.base_url, "sk-f")
        build_labeler(cfg, human, three_products, seed=0, endpoint=endpoint, state_dir=tmp_path)
        (record_path,) = tmp_path.glob("fine_tunes/fine-tune-*.json")
        # Given a record cut in half (a crash of an older writer, a full disk)
        text = record_path.read_text()
        record_path.write_text(text[: len(text) // 2])
        # When the step runs again, it reports the file, moves it aside and goes on (HEAD raised JSONDecodeError)
        labeler = build_labeler(cfg, human, three_products, seed=0, endpoint=endpoint, state_dir=tmp_path)
        assert labeler.model.startswith("ft:") and srv.count("ft_create") == 2
    assert f"job record {record_path} is unreadable" in caplog.text
    aside = list(record_path.parent.glob(f"{record_path.name}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == text[: len(text) // 2]
    assert json.loads(record_path.read_text())["model"] == labeler.model


def test_a_full_disk_while_updating_a_batch_record_keeps_the_previous_record(tmp_path, three_products, monkeypatch):
    from dashclip_core.labeling.openai_backend import OpenAICompatibleLabeler

    requests = list(requests_for(pd.DataFrame({"query": ["oat milk", "apples"], "product_id": ["p1", "p2"]}), three_products))
    with fake.FakeOpenAIServer(api_key="sk-b", batch_polls=1) as srv:
        client = OpenAICompatibleLabeler(srv.base_url, "gpt-test", "sk-b", backoff_base=0.0)
        # Given a disk that fills up while the "read" mark is written over the batch record (half the bytes land)
        real_open = open

        class FullDisk:
            def __init__(self, fh):
                self.fh = fh

            def write(self, data):
                self.fh.write(data[: len(data) // 2])
                self.fh.flush()
                raise OSError(errno.ENOSPC, "No space left on device")

            def __getattr__(self, name):
                return getattr(self.fh, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

        def full_write_text(path, data, *a, **k):  # HEAD wrote the record with Path.write_text
            with real_open(path, "w") as fh:
                FullDisk(fh).write(data)

        def full_open(file, mode="r", *a, **k):
            fh = real_open(file, mode, *a, **k)
            return FullDisk(fh) if "w" in mode and "batch-" in str(file) else fh

        labeler = BatchAPILabeler(client, tmp_path, 0.01, 10.0)
        results = labeler.label(requests)
        first = next(results)
        monkeypatch.setattr(Path, "write_text", lambda self, data, *a, **k: full_write_text(self, data))
        monkeypatch.setattr("builtins.open", full_open)
        with pytest.raises(OSError, match="No space left"):
            list(results)
        monkeypatch.undo()
        # Then the record still names the batch, unread: the retry resumes it without paying again
        (record_path,) = tmp_path.glob("batch-*.json")
        assert json.loads(record_path.read_text())["batch_id"] and not list(tmp_path.glob(".*.tmp"))
        again = {(r.query, r.product_id): r.label for r in BatchAPILabeler(client, tmp_path, 0.01, 10.0).label(requests)}
        assert again == {("oat milk", "p1"): 2, ("apples", "p2"): 2} and first.label == 2
        assert srv.count("batches_create") == 1
