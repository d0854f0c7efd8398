"""openai_jobs.py: the resumable Batch API labeler and the fine-tune that runs once per training set."""

from __future__ import annotations

import dashclip_tests_openai_server as fake  # tests/labeling/openai_server.py, registered by tests/conftest.py
import pandas as pd

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
