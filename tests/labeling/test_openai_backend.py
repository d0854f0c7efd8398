"""The OpenAI-compatible labeler against a real HTTP server on 127.0.0.1 (tests/labeling/openai_server.py).

The production client runs unchanged; only its backoff values are tiny. Faults are scripted per
request, so every retry, wait and failure below is deterministic.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time

import dashclip_tests_openai_server as fake  # tests/labeling/openai_server.py, registered by tests/conftest.py
import pandas as pd
import pytest

from dashclip_core.labeling.base import Labeler, LabelRequest
from dashclip_core.labeling.openai_backend import (
    AuthenticationError,
    FineTuneFailed,
    OpenAICompatibleLabeler,
    base_url_from_connection,
    parse_retry_after,
)
from dashclip_core.labeling.prompt import (
    PROMPT_VERSION,
    RESPONSE_SCHEMA,
    MalformedAnswer,
    build_messages,
    parse_answer,
    response_format,
)

Fault = fake.Fault
KEY = "sk-test-Zq81secret"

# Pairs with known overlap-rule labels: every query word in the product text -> 2, some -> 1, none -> 0.
PAIRS = [
    (LabelRequest("oat milk", "p1", title="Oatly Oat Milk", description="Creamy oat drink", category="Milk", aisle="Dairy"), 2),
    (LabelRequest("oat milk", "p2", title="Almond Milk", description=None, category="Milk", aisle="Dairy"), 1),
    (LabelRequest("oat milk", "p3", title="Dish Soap", description="Lemon scent", category="Cleaning", aisle="Household"), 0),
    (LabelRequest("red apples", "p4", title="Gala Apples", description="Sweet red apples", category="Apple", aisle="Fruit"), 2),
    (LabelRequest("red apples", "p5", title="Granny Smith", description="Green apples", category="Apple", aisle="Fruit"), 1),
    (LabelRequest("red apples", "p6", title="Ground Coffee", description="Dark roast", category="Coffee", aisle="Pantry"), 0),
]
REQUESTS = [r for r, _ in PAIRS]
EXPECTED = {(r.query, r.product_id): label for r, label in PAIRS}


@pytest.fixture
def server():
    with fake.FakeOpenAIServer(api_key=KEY) as srv:
        yield srv


def make_labeler(srv, model="gpt-test", **kw) -> OpenAICompatibleLabeler:
    options = {"api_key": KEY, "concurrency": 1, "max_retries": 3, "backoff_base": 0.001, "backoff_max": 0.05, "timeout": 5.0}
    options.update(kw)
    return OpenAICompatibleLabeler(srv.base_url, model, **options)


def label_one(srv, request=REQUESTS[0], **kw):
    with make_labeler(srv, **kw) as labeler:
        (result,) = list(labeler.label([request]))
    return result


def gaps(srv, route="chat"):
    times = [r.t for r in srv.of(route)]
    return [b - a for a, b in itertools.pairwise(times)]


# ---------------------------------------------------------------------- prompt


def test_messages_show_every_product_field_and_define_the_scale():
    messages = build_messages(LabelRequest("oat milk", "p1", title="Oatly Oat Milk", description="Creamy\n oat drink",
                                           category="Milk", aisle="Dairy"))
    assert [m["role"] for m in messages] == ["system", "user"]
    system, user = messages[0]["content"], messages[1]["content"]
    for definition in ("2 = highly relevant", "1 = moderately relevant", "0 = irrelevant", "substitute", "what the shopper asked for"):
        assert definition in system
    pair = json.loads(user[user.index("{"):])
    assert pair == {"query": "oat milk", "product": {"title": "Oatly Oat Milk", "description": "Creamy oat drink",
                                                     "category": "Milk", "aisle": "Dairy"}}
    missing = json.loads(build_messages(LabelRequest("q", "p", title="T", description=float("nan")))[1]["content"].split("\n", 1)[1])
    assert missing["product"] == {"title": "T", "description": None, "category": None, "aisle": None}
    with pytest.raises(ValueError, match="unknown prompt_version"):
        build_messages(REQUESTS[0], prompt_version="relevance-v0")


def test_response_format_is_the_strict_label_schema():
    assert RESPONSE_SCHEMA["properties"]["label"] == {"type": "integer", "enum": [0, 1, 2]}
    assert RESPONSE_SCHEMA["properties"]["reason"]["maxLength"] == 200
    assert RESPONSE_SCHEMA["required"] == ["label", "reason"] and RESPONSE_SCHEMA["additionalProperties"] is False
    fmt = response_format()
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"] == {"name": "relevance_label", "strict": True, "schema": RESPONSE_SCHEMA}


def test_parse_answer_accepts_the_schema_and_rejects_everything_else():
    assert parse_answer('{"label": 2, "reason": "exact match"}') == (2, "exact match")
    assert parse_answer('```json\n{"label": 0, "reason": "no"}\n```') == (0, "no")
    assert parse_answer(json.dumps({"label": 1, "reason": "x" * 500}))[1] == "x" * 200
    for bad in ['{"label": 2, "reason": "cut o', '[2]', '{"reason": "no label"}', '{"label": 3, "reason": ""}',
                '{"label": "2", "reason": ""}', '{"label": true, "reason": ""}', '{"label": 1.5, "reason": ""}',
                '{"label": 1, "reason": 7}', "", None]:
        with pytest.raises(MalformedAnswer):
            parse_answer(bad)


# ---------------------------------------------------------------------- online labelling


def test_labels_a_batch_of_pairs_exactly_and_reports_paid_tokens(server):
    labeler = make_labeler(server, concurrency=3)
    assert isinstance(labeler, Labeler)
    assert labeler.labeler_id == f"openai:gpt-test:{PROMPT_VERSION}"
    results = list(labeler.label(iter(REQUESTS)))
    labeler.close()
    assert {(r.query, r.product_id): r.label for r in results} == EXPECTED
    assert {r.status for r in results} == {"ok"} and {r.labeler_id for r in results} == {labeler.labeler_id}
    assert all(r.reason for r in results)
    # One billed completion per pair, and the results account for exactly what was billed.
    assert len(server.billed) == len(REQUESTS) == server.count("chat")
    assert sum(r.input_tokens for r in results) == sum(b.prompt_tokens for b in server.billed) > 0
    assert sum(r.output_tokens for r in results) == sum(b.completion_tokens for b in server.billed) > 0
    for rec in server.of("chat"):
        assert rec.headers["authorization"] == f"Bearer {KEY}"
        assert rec.body["temperature"] == 0 and rec.body["model"] == "gpt-test"
        assert rec.body["response_format"] == response_format()


def test_429_waits_for_retry_after_then_succeeds(server):
    server.script("chat", [Fault.http(429, retry_after="0.25")])
    # backoff_base is tiny: only honouring Retry-After explains a wait of >= 0.25 s.
    result = label_one(server, backoff_max=5.0)
    assert result.status == "ok" and result.label == 2
    assert server.count("chat") == 2 and len(server.billed) == 1
    assert gaps(server)[0] >= 0.25


def test_retry_after_as_http_date_is_honoured(server):
    server.script("chat", [Fault.http(503, retry_after_date_in=1.5)])
    result = label_one(server, backoff_max=5.0)
    assert result.status == "ok"
    # HTTP dates have 1 s resolution: the date lies 0.5-1.5 s ahead when sent.
    assert 0.45 <= gaps(server)[0] < 3.0


def test_parse_retry_after_forms():
    when = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=when - 3) == pytest.approx(3.0)
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=when + 10) == 0.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None


def test_retry_after_is_capped_at_backoff_max(server):
    server.script("chat", [Fault.http(429, retry_after="100")])
    result = label_one(server, backoff_max=0.2)
    assert result.status == "ok"
    assert 0.2 <= gaps(server)[0] < 2.0


def test_5xx_are_retried_then_succeed(server):
    server.script("chat", [Fault.http(500), Fault.http(503), Fault.http(502)])
    result = label_one(server, REQUESTS[1])
    assert (result.status, result.label) == ("ok", 1)
    assert server.count("chat") == 4 and len(server.billed) == 1


def test_5xx_beyond_max_retries_fails_the_pair(server):
    server.script("chat", [Fault.http(500)] * 3)
    result = label_one(server, max_retries=2)
    assert result.status == "failed" and result.label is None
    assert "HTTP 500" in result.reason and "3 attempts" in result.reason
    assert server.count("chat") == 3


def test_timeout_is_retried_then_succeeds(server):
    server.script("chat", [Fault.delay(1.5)])
    result = label_one(server, timeout=0.4)
    assert (result.status, result.label) == ("ok", 2)
    assert server.count("chat") == 2
    # The server finished the timed-out request too: that one is paid twice (documented limitation).
    assert len(server.billed) == 2


def test_malformed_answer_is_asked_again_then_succeeds(server):
    server.script("chat", [Fault.malformed()])
    result = label_one(server)
    assert (result.status, result.label) == ("ok", 2)
    assert server.count("chat") == 2 and len(server.billed) == 2
    # Both answers were paid, and both are counted.
    assert result.input_tokens == sum(b.prompt_tokens for b in server.billed)


def test_persistently_malformed_answer_fails_without_a_label(server):
    server.script("chat", [Fault.malformed()] * 3)
    result = label_one(server, max_retries=2)
    assert result.status == "failed" and result.label is None
    assert "not valid JSON" in result.reason
    assert server.count("chat") == 3 and result.output_tokens > 0


@pytest.mark.parametrize("fault, words", [(Fault.refusal(), "refused"), (Fault.content_filter(), "content filter")])
def test_refusals_fail_the_pair(server, fault, words):
    server.script("chat", [fault] * 3)
    result = label_one(server, max_retries=2)
    assert result.status == "failed" and result.label is None and words in result.reason
    assert server.count("chat") == 3


def test_400_fails_at_once_without_retry(server):
    server.script("chat", [Fault.http(400)])
    result = label_one(server, max_retries=5)
    assert result.status == "failed" and result.label is None
    assert "HTTP 400" in result.reason and "injected" in result.reason
    assert server.count("chat") == 1 and server.billed == []


def test_concurrency_caps_requests_in_flight():
    with fake.FakeOpenAIServer(api_key=KEY, latency=0.15) as srv:
        with make_labeler(srv, concurrency=4) as labeler:
            start = time.monotonic()
            results = list(labeler.label(REQUESTS * 2))
            elapsed = time.monotonic() - start
        assert len(results) == 12 and {r.status for r in results} == {"ok"}
        assert srv.max_in_flight == 4
        assert elapsed < 12 * 0.15  # really parallel: 3 waves, not 12 sequential requests


def test_wrong_key_fails_clearly_and_never_shows_the_key(server, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "sk-WRONG-do-not-leak-4242"
    labeler = make_labeler(server, api_key=secret, concurrency=2)
    assert secret not in repr(labeler) and "***" in repr(labeler)
    with pytest.raises(AuthenticationError) as info:
        list(labeler.label(REQUESTS))
    labeler.close()
    assert info.value.status_code == 401 and "HTTP 401" in str(info.value)
    # The key was sent, and the server echoed it in full in its error body; the client scrubbed it.
    assert any(r.headers.get("authorization") == f"Bearer {secret}" for r in server.requests)
    assert secret not in str(info.value) and secret not in repr(info.value) and secret not in caplog.text
    assert server.count("chat") <= 2 * 2  # no retries of a 401, queued pairs dropped


def test_api_key_from_environment(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    result = label_one(server, api_key=None)
    assert result.status == "ok"
    assert server.of("chat")[0].headers["authorization"] == f"Bearer {KEY}"


def test_seeded_random_faults_still_label_every_pair_exactly(server):
    server.fault_rate(0.3, seed=7, faults=[Fault.http(500), Fault.malformed(), Fault.http(429, retry_after="0.01")])
    with make_labeler(server, concurrency=3, max_retries=8) as labeler:
        results = list(labeler.label(REQUESTS * 3))
    assert len(results) == 18 and {r.status for r in results} == {"ok"}
    assert all(EXPECTED[(r.query, r.product_id)] == r.label for r in results)
    assert server.count("chat") > 18


# ---------------------------------------------------------------------- Batch API


def test_batch_path_end_to_end():
    with fake.FakeOpenAIServer(api_key=KEY, batch_polls=3, batch_drop_queries={"tea"}) as srv:
        err = LabelRequest("coffee beans", "p7", title="Arabica Coffee Beans")
        bad = LabelRequest("green tea", "p8", title="Green Tea Bags")
        dropped = LabelRequest("tea", "p9", title="Black Tea")
        srv.fault_by_query = {"coffee beans": [Fault.http(500)], "green tea": [Fault.malformed()]}
        requests = [*REQUESTS, err, bad, dropped, REQUESTS[0]]  # the last one is a duplicate pair
        labeler = make_labeler(srv)
        results = list(labeler.label_via_batch(requests, poll_interval=0.01, timeout=10))

        # Upload: one multipart file, purpose batch, one chat-completions request per distinct pair.
        (upload,) = srv.of("files_upload")
        assert upload.body["purpose"] == "batch"
        content = upload.body["file"][0]
        assert content == labeler.batch_input_jsonl(requests)
        lines = [json.loads(line) for line in content.decode().splitlines()]
        assert len(lines) == 9 and len({line["custom_id"] for line in lines}) == 9
        assert {line["custom_id"] for line in lines} == {labeler.custom_id(r) for r in requests}
        assert labeler.custom_id(REQUESTS[0]) == make_labeler(srv).custom_id(REQUESTS[0])  # stable across instances
        assert lines[0]["url"] == "/v1/chat/completions" and lines[0]["body"]["response_format"] == response_format()
        (create,) = srv.of("batches_create")
        assert create.body["endpoint"] == "/v1/chat/completions" and create.body["completion_window"] == "24h"
        assert srv.count("batches_get") == 3 + 1  # polled until completed, then read once for the file ids
        assert srv.count("chat") == 0  # nothing went through the online endpoint

    assert len(results) == len(requests)
    by_pair = {(r.query, r.product_id): r for r in results}
    assert {k: by_pair[k].label for k in EXPECTED} == EXPECTED
    assert all(by_pair[k].status == "ok" and by_pair[k].input_tokens > 0 for k in EXPECTED)
    assert by_pair[("coffee beans", "p7")].status == "failed" and "batch HTTP 500" in by_pair[("coffee beans", "p7")].reason
    assert by_pair[("green tea", "p8")].status == "failed" and "not valid JSON" in by_pair[("green tea", "p8")].reason
    assert by_pair[("tea", "p9")].status == "failed" and "not in the output" in by_pair[("tea", "p9")].reason
    assert [b.via for b in srv.billed].count("batch") == 7  # 6 good + 1 malformed; the 500 and the dropped one were not paid


def test_batch_creation_is_not_duplicated_when_its_response_is_lost(server):
    server.script("files_upload", [Fault.http(503)])
    server.script("batches_create", [Fault.delay(1.2)])  # created, but the answer comes after the client's timeout
    labeler = make_labeler(server, timeout=0.4)
    batch_id = labeler.submit_batch(REQUESTS)
    assert server.count("files_upload") == 2  # the upload is retried like any call
    assert server.count("batches_create") == 1 and server.count("batches_list") == 1
    assert list(server.state.batches) == [batch_id]  # found by its input file instead of paying twice
    batch = labeler.poll_batch(batch_id, poll_interval=0.01, timeout=5)
    assert batch["status"] == "completed"
    assert {(r.query, r.product_id): r.label for r in labeler.batch_results(batch_id, REQUESTS)} == EXPECTED
    labeler.close()


def test_batch_results_before_completion_and_poll_timeout(server):
    server.batch_polls = 1000
    labeler = make_labeler(server)
    batch_id = labeler.submit_batch(REQUESTS[:2])
    with pytest.raises(TimeoutError, match=batch_id):
        labeler.poll_batch(batch_id, poll_interval=0.01, timeout=0.1)
    with pytest.raises(ValueError, match="not finished"):
        list(labeler.batch_results(batch_id, REQUESTS[:2]))
    with pytest.raises(ValueError, match="no requests"):
        labeler.submit_batch([])


# ---------------------------------------------------------------------- fine-tuning


HUMAN = pd.DataFrame({
    "query": ["oat milk", "oat milk", "red apples", "red apples"],
    "product_id": ["p1", "p3", "p4", "p6"],
    "title": ["Oatly Oat Milk", "Dish Soap", "Gala Apples", "Ground Coffee"],
    "description": ["Creamy oat drink", float("nan"), "Sweet red apples", None],
    "category": ["Milk", "Cleaning", "Apple", "Coffee"],
    "aisle": ["Dairy", "Household", "Fruit", "Pantry"],
    "label": [2, 0, 2, 0],
})


def test_fine_tuning_jsonl_has_one_chat_example_per_human_label(server):
    labeler = make_labeler(server)
    data = labeler.fine_tuning_jsonl(HUMAN)
    examples = [json.loads(line) for line in data.decode().splitlines()]
    assert len(examples) == len(HUMAN)
    for example, row in zip(examples, HUMAN.to_dict("records")):
        messages = example["messages"]
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        request = LabelRequest(row["query"], row["product_id"], row["title"],
                               row["description"] if isinstance(row["description"], str) else None, row["category"], row["aisle"])
        assert messages[:2] == build_messages(request)  # exactly the prompt used for labelling
        assert parse_answer(messages[2]["content"])[0] == row["label"]
    with pytest.raises(ValueError, match="row 1 .*label 3"):
        labeler.fine_tuning_jsonl(HUMAN.assign(label=[2, 3, 2, 0]))
    with pytest.raises(ValueError, match="column 'label'"):
        labeler.fine_tuning_jsonl(HUMAN.drop(columns="label"))


def test_fine_tune_path_end_to_end(server):
    labeler = make_labeler(server)
    data = labeler.fine_tuning_jsonl(HUMAN)
    job_id = labeler.start_fine_tune(data, "gpt-4o-mini", "dashclip")
    (upload,) = server.of("files_upload")
    assert upload.body["purpose"] == "fine-tune" and upload.body["file"][0] == data
    (create,) = server.of("ft_create")
    assert create.body == {"training_file": server.state.jobs[job_id]["training_file"], "model": "gpt-4o-mini", "suffix": "dashclip"}
    model = labeler.wait_fine_tune(job_id, poll_interval=0.01, timeout=5)
    assert model == "ft:gpt-4o-mini:dashclip:abc"
    assert server.count("ft_get") == server.fine_tune_polls
    # The fine-tuned model id becomes the model of the labeler that grades the candidates.
    tuned = make_labeler(server, model=model)
    assert tuned.labeler_id == f"openai:{model}:{PROMPT_VERSION}"
    assert next(tuned.label(REQUESTS[:1])).label == 2


def test_failed_fine_tune_raises_with_the_job_error():
    error = {"code": "invalid_training_file", "message": "too few examples: 4 < 10"}
    with fake.FakeOpenAIServer(api_key=KEY, fine_tune_error=error) as srv:
        labeler = make_labeler(srv)
        job_id = labeler.start_fine_tune(labeler.fine_tuning_jsonl(HUMAN), "gpt-4o-mini", "dashclip")
        with pytest.raises(FineTuneFailed, match="failed: invalid_training_file: too few examples"):
            labeler.wait_fine_tune(job_id, poll_interval=0.01, timeout=5)


# ---------------------------------------------------------------------- credentials


def test_base_url_from_connection_fields():
    assert base_url_from_connection("api.openai.com") == "https://api.openai.com/v1"
    assert base_url_from_connection("https://api.openai.com/v1/") == "https://api.openai.com/v1"
    assert base_url_from_connection("vllm", "http", 8000) == "http://vllm:8000/v1"
    assert base_url_from_connection("gw.example.com", extra={"base_path": "/openai/v1"}) == "https://gw.example.com/openai/v1"
    with pytest.raises(ValueError, match="no host"):
        base_url_from_connection(None)


def test_constructor_validates_arguments():
    with pytest.raises(ValueError, match="concurrency"):
        OpenAICompatibleLabeler("http://127.0.0.1:1/v1", "m", "k", concurrency=0)
    with pytest.raises(ValueError, match="unknown prompt_version"):
        OpenAICompatibleLabeler("http://127.0.0.1:1/v1", "m", "k", prompt_version="nope")
    labeler = OpenAICompatibleLabeler("http://127.0.0.1:1/v1/", "m", "k")
    assert labeler.base_url == "http://127.0.0.1:1/v1" and math.isclose(labeler.timeout, 30.0)
