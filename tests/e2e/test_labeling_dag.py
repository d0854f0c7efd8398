"""label_pairs in a real Airflow DAG run with the OpenAI-compatible backend against a local HTTP peer.

The DAG runs extract → catalog gate → label_pairs → label gate (``partial_subset``: training is covered by
test_dag_run.py). The peer (tests/labeling/openai_server.py) speaks the OpenAI REST protocol and injects
429s with Retry-After, 500s, timeouts, malformed answers and refusals; the production client is unchanged.
Credentials come from an Airflow connection given as ``AIRFLOW_CONN_DASHCLIP_LLM``.
"""

from __future__ import annotations

import json
from pathlib import Path

import dashclip_tests_openai_server as fake  # tests/labeling/openai_server.py, registered by tests/conftest.py
import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-dag-test-key-4f2a"
LABEL_TASKS = ["extract_catalog", "validate_catalog", "label_pairs", "validate_labels"]


@pytest.fixture()
def llm_server(monkeypatch):
    with fake.FakeOpenAIServer(api_key=KEY) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_DASHCLIP_LLM", json.dumps({"conn_type": "http", "host": srv.base_url, "password": KEY}))
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        yield srv


def _config(tmp_path: Path, tiny_config: Path, **labeling) -> Path:
    raw = yaml.safe_load(tiny_config.read_text())
    raw["labeling"] = {**raw.get("labeling", {}), "labeler": "openai", "llm_model": "gpt-test", "llm_concurrency": 8,
                       "llm_timeout_s": 1.0, "llm_backoff_s": 0.01, "llm_backoff_max_s": 0.5, "llm_max_retries": 8,
                       "label_chunk_size": 200, "max_failed_fraction": 0.0, **labeling}
    raw["storage"] = {**raw.get("storage", {}), "cache_dir": str(tmp_path / "cache")}  # a cache of this test's own
    path = tmp_path / "llm.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(cfg_path: Path):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["dashclip_nightly"].partial_subset(LABEL_TASKS, include_upstream=True)
    dr = dag.test(run_conf={"config_path": str(cfg_path)})
    return dr, {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}


def _paths(cfg_path: Path, dr):
    from dashclip_core.config import PipelineConfig
    from tasks.common import run_paths

    return run_paths(PipelineConfig.from_file(cfg_path), dr.run_id)


def _label_pairs_by_hand(cfg_path: Path, dr):
    """Run the label_pairs task again as a cleared task would: with its upstreams' summaries (XComs) as inputs."""
    from dashclip_core.storage import read_json
    from tasks import steps

    paths = _paths(cfg_path, dr)
    catalog, clean = ({"uri": paths.uri(s), **read_json(paths.local(s) / "summary.json")} for s in ("extract_catalog", "validate_catalog"))
    return steps.label_pairs(catalog, clean, params={"config_path": str(cfg_path)}, run_id=dr.run_id)


def test_http_labeler_survives_faults_and_a_rerun_pays_nothing(airflow_db, tmp_path, tiny_config, llm_server):
    import pandas as pd

    from dashclip_core.storage import read_json

    Fault = fake.Fault
    # Given a flaky API: 15% of chat calls hit a fault (the client's timeout is 1 s; the slow answer takes 1.5 s)
    llm_server.fault_rate(0.15, seed=5, faults=[Fault.http(429, retry_after="0.05"), Fault.http(500), Fault.http(503),
                                                Fault.delay(1.5), Fault.malformed(), Fault.refusal()])
    cfg_path = _config(tmp_path, tiny_config)
    # When the DAG labels the demo pairs with the HTTP backend
    dr, states = _run(cfg_path)
    # Then every step succeeds
    assert states == dict.fromkeys(LABEL_TASKS, "success"), states
    paths = _paths(cfg_path, dr)
    summary = read_json(paths.local("label_pairs") / "summary.json")
    labels = pd.read_parquet(paths.local("label_pairs") / "labels.parquet")
    teacher = labels[labels["source"] == "teacher"]
    # nothing is lost: every candidate pair got a label, exactly the overlap rule's grade
    assert summary["n_failed"] == 0 and len(teacher) == summary["n_teacher_labels"] > 100
    assert summary["labeler_id"] == "openai:gpt-test:relevance-v1"
    faults_hit = [r for r in llm_server.requests if r.route == "chat"]
    assert len(faults_hit) > len(teacher)  # retries happened
    products = pd.read_parquet(paths.local("validate_catalog") / "clean.parquet").set_index("product_id")
    for row in teacher.sample(50, random_state=0).itertuples():
        p = products.loc[row.product_id]
        text = ". ".join(v for v in (p.get("title"), p.get("description"), p.get("category"), p.get("aisle")) if isinstance(v, str) and v)
        assert row.label == fake.overlap_grader(row.query, text), (row.query, row.product_id)
    # the teacher quality report is in the run folder and in MLflow
    quality = read_json(paths.local("label_pairs") / "teacher_quality.json")
    assert quality["labeler_id"] == "openai:gpt-test:relevance-v1" and quality["n"] > 0
    assert (paths.local("label_pairs") / "teacher_confusion.png").stat().st_size > 1000
    # the API key never reached the run folder
    for f in paths.local("label_pairs").iterdir():
        if f.suffix == ".json":
            assert KEY not in f.read_text()

    # When the DAG runs again (a new run id: a retried nightly)
    llm_server.fault_rate(0.0, seed=0, faults=[Fault.http(500)])
    n_calls, n_billed = llm_server.count("chat"), len(llm_server.billed)
    dr2, states2 = _run(cfg_path)
    # Then it pays nothing: 100% cache hits, no chat call at all
    assert states2 == dict.fromkeys(LABEL_TASKS, "success"), states2
    summary2 = read_json(_paths(cfg_path, dr2).local("label_pairs") / "summary.json")
    assert summary2["cache_hit_rate"] == 1.0 and summary2["tokens"] == 0
    assert llm_server.count("chat") == n_calls and len(llm_server.billed) == n_billed
    labels2 = pd.read_parquet(_paths(cfg_path, dr2).local("label_pairs") / "labels.parquet")
    pd.testing.assert_frame_equal(labels.sort_values(["query", "product_id", "source"]).reset_index(drop=True),
                                  labels2.sort_values(["query", "product_id", "source"]).reset_index(drop=True))


def test_budget_exhaustion_stops_the_step_and_keeps_what_was_labelled(airflow_db, tmp_path, tiny_config, llm_server):
    from dashclip_core.config import PipelineConfig
    from dashclip_core.labeling.cache import LabelCache
    from dashclip_core.labeling.store import LabelStore

    fake_pair = fake._pair_of
    # Given a token budget that covers the held-out scoring and a few chunks of candidates, not all of them
    cfg_path = _config(tmp_path, tiny_config, max_tokens=150_000, price_per_1k_input=0.00015, price_per_1k_output=0.0006)
    dr, states = _run(cfg_path)
    # Then label_pairs fails (no retry), nothing downstream runs, and the run folder has no half-made labels
    assert states["label_pairs"] == "failed" and states["validate_labels"] in ("upstream_failed", "None", "none"), states
    assert not _paths(cfg_path, dr).is_done("label_pairs")
    # and every pair paid for is kept: in the label store and in the cache (a re-run with a bigger budget reuses it)
    cfg = PipelineConfig.from_file(cfg_path)
    stored = LabelStore(cfg.cache_dir() / "labels" / "store").read("openai:gpt-test:relevance-v1")
    assert len(stored) > 0 and (stored["status"] == "ok").all()
    with LabelCache(cfg.cache_dir() / "labels" / "label_cache.sqlite") as cache:
        assert cache.stats().n_entries >= len(stored)
    # no pair was paid twice: every chat request (each one billed: no faults here) asked about a different pair
    prompts = [json.dumps(fake_pair(r.body), sort_keys=True) for r in llm_server.of("chat")]
    assert len(prompts) == len(llm_server.billed) and len(set(prompts)) == len(prompts)
    assert sum(b.prompt_tokens + b.completion_tokens for b in llm_server.billed) <= 150_000

    # When the step is run again by hand (a cleared task: the budget limits one attempt)
    from airflow.sdk.exceptions import AirflowFailException

    n_billed = len(llm_server.billed)
    with pytest.raises(AirflowFailException, match=r"stopped by budget after .* from cache.*raise labeling.max_tokens"):
        _label_pairs_by_hand(cfg_path, dr)
    # Then it goes on from the cache: nothing paid before is paid again, and more pairs are labelled
    again = [json.dumps(fake_pair(r.body), sort_keys=True) for r in llm_server.of("chat")][n_billed:]
    assert again and not set(again) & set(prompts)
    assert len(LabelStore(cfg.cache_dir() / "labels" / "store").read("openai:gpt-test:relevance-v1")) > len(stored)


def test_a_bad_teacher_stops_the_dag_before_training_with_the_report(airflow_db, tmp_path, tiny_config, monkeypatch):
    from mlflow.tracking import MlflowClient

    from dashclip_core.config import PipelineConfig
    from dashclip_core.storage import read_json

    # Given an LLM that calls everything highly relevant
    with fake.FakeOpenAIServer(api_key=KEY, grader=lambda query, text: 2) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_DASHCLIP_LLM", json.dumps({"conn_type": "http", "host": srv.base_url, "password": KEY}))
        cfg_path = _config(tmp_path, tiny_config)
        dr, states = _run(cfg_path)
        n_scored = len(srv.billed)
    # Then label_pairs fails its quality gate and the label gate never runs
    assert states["label_pairs"] == "failed" and states["validate_labels"] in ("upstream_failed", "None", "none"), states
    # with the report in the run folder
    step = _paths(cfg_path, dr).local("label_pairs")
    summary = read_json(step / "summary.json")
    assert summary["passed"] is False and "kappa" in summary["message"]
    quality = read_json(step / "teacher_quality.json")
    assert quality["kappa"] == pytest.approx(0.0, abs=1e-9) and quality["n"] > 0
    assert not (step / "labels.parquet").exists()
    # and in MLflow
    cfg = PipelineConfig.from_file(cfg_path)
    client = MlflowClient(cfg.tracking_uri())
    run = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id],
                             filter_string=f"tags.airflow_run_id = '{dr.run_id}'")[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "labeling")} >= {"labeling/teacher_quality.json", "labeling/teacher_confusion.png"}
    # and only held-out pairs were paid for (at most one call per held-out row): no candidate was sent
    assert 0 < n_scored <= quality["n"]


def test_dry_run_estimates_the_cost_and_sends_nothing(airflow_db, tmp_path, tiny_config, llm_server):
    from airflow.sdk.exceptions import AirflowFailException

    # Given a dry run with prices
    cfg_path = _config(tmp_path, tiny_config, dry_run=True, price_per_1k_input=0.15, price_per_1k_output=0.6, max_cost_usd=0.01)
    dr, states = _run(cfg_path)
    # Then label_pairs stops the DAG without a single API call (not even the teacher's held-out scoring)
    assert states["label_pairs"] == "failed" and states["validate_labels"] in ("upstream_failed", "None", "none"), states
    assert llm_server.requests == []
    # and says what the run would cost, against the budget
    with pytest.raises(AirflowFailException, match=r"dry run with openai:gpt-test:relevance-v1: teacher scoring \(held-out\): "
                                                   r"\d+ pairs, 0 cached.*candidates: \d[\d,]* pairs.*~\$\d+\.\d{4}; EXCEEDS the budget"):
        _label_pairs_by_hand(cfg_path, dr)
    assert llm_server.requests == []


def test_batch_api_with_a_fine_tuned_teacher_in_the_dag_and_a_rerun_reuses_both(airflow_db, tmp_path, tiny_config, llm_server):
    import pandas as pd

    from dashclip_core.storage import read_json

    # Given the DashCLIP recipe: fine-tune a base chat model on the human labels, then grade through the Batch API
    cfg_path = _config(tmp_path, tiny_config, llm_model="gpt-4o-mini", llm_fine_tune=True, llm_mode="batch",
                       llm_batch_poll_s=0.01, llm_batch_timeout_s=60.0, label_chunk_size=100_000)
    dr, states = _run(cfg_path)
    assert states == dict.fromkeys(LABEL_TASKS, "success"), states
    paths = _paths(cfg_path, dr)
    summary = read_json(paths.local("label_pairs") / "summary.json")
    # Then one fine-tuning job was trained on the human labels, and its model graded everything
    tuned = "ft:gpt-4o-mini:dashclip:abc"
    assert summary["labeler_id"] == f"openai:{tuned}:relevance-v1"
    (ft_upload,) = [r for r in llm_server.of("files_upload") if r.body["purpose"] == "fine-tune"]
    (ft_create,) = llm_server.of("ft_create")
    assert ft_create.body["model"] == "gpt-4o-mini" and ft_upload.body["file"][0].count(b"\n") > 10
    # through the Batch API only: held-out scoring and the candidates, nothing online
    assert llm_server.count("chat") == 0 and llm_server.count("batches_create") == 2
    assert {b.via for b in llm_server.billed} == {"batch"}
    labels = pd.read_parquet(paths.local("label_pairs") / "labels.parquet")
    teacher = labels[labels["source"] == "teacher"]
    assert summary["n_failed"] == 0 and len(teacher) == summary["n_teacher_labels"] > 100
    products = pd.read_parquet(paths.local("validate_catalog") / "clean.parquet").set_index("product_id")
    for row in teacher.sample(30, random_state=1).itertuples():
        p = products.loc[row.product_id]
        text = ". ".join(v for v in (p.get("title"), p.get("description"), p.get("category"), p.get("aisle")) if isinstance(v, str) and v)
        assert row.label == fake.overlap_grader(row.query, text), (row.query, row.product_id)
    # The job and batch ids were written down as soon as they existed (a retried task resumes them)
    from dashclip_core.config import PipelineConfig

    labels_dir = PipelineConfig.from_file(cfg_path).cache_dir() / "labels"  # beside the label cache: outlives a run
    (ft_record,) = [read_json(f) for f in (labels_dir / "fine_tunes").glob("fine-tune-*.json")]
    assert ft_record["model"] == tuned and ft_record["job_id"]
    assert len(list((labels_dir / "batches").glob("batch-*.json"))) == 2

    # When the nightly runs again on the same human labels
    n_billed, n_requests = len(llm_server.billed), len(llm_server.requests)
    dr2, states2 = _run(cfg_path)
    # Then it reuses the fine-tuned model (no new job) and the cache (no batch, nothing paid)
    assert states2 == dict.fromkeys(LABEL_TASKS, "success"), states2
    summary2 = read_json(_paths(cfg_path, dr2).local("label_pairs") / "summary.json")
    assert summary2["labeler_id"] == summary["labeler_id"] and summary2["cache_hit_rate"] == 1.0
    assert len(llm_server.billed) == n_billed and len(llm_server.requests) == n_requests
