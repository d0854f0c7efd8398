"""The one redaction rule (dashclip_core/redaction.py) and every place a config, URL or error leaves the process
through it: MLflow params, step summaries (XComs), catalog errors, connections, logs, the CLI; and the
``config_path`` allow-list of a run's params."""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from dashclip_core import redaction
from dashclip_core.redaction import MASK, is_secret_name, redact_text, redact_url, redacted_config, secrets_in_config

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "p@ss/w:rd%1"  # needs percent-encoding in a URL: the raw and the encoded form must both vanish


def _leaks(text: str, secret: str = PASSWORD) -> list[str]:
    return [form for form in {secret, quote(secret, safe=""), quote_plus(secret), quote(secret)} if form in text]


# ---- the rule ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    f"postgresql+psycopg://dashclip:{quote(PASSWORD, safe='')}@127.0.0.1:5432/catalog",
    f"postgresql+psycopg://dashclip:{PASSWORD}@127.0.0.1:5432/catalog",  # raw, as a ${VAR} expands into a config
    f"mysql://u:{quote_plus(PASSWORD)}@db/x?charset=utf8",
    f"s3://AKIAXX:{quote(PASSWORD, safe='')}@bucket/prefix",
])
def test_url_passwords_are_masked_raw_and_percent_encoded(url):
    out = redact_url(url)
    assert _leaks(out) == [], out
    assert f":{MASK}@" in out and out.split("://")[0] == url.split("://")[0]


def test_url_without_password_and_plain_text_stay():
    for text in ("sqlite:////tmp/x/catalog.db", "https://api.openai.com/v1", "s3://bucket/a/b", "user@example.com wrote",
                 "postgresql://dashclip@127.0.0.1/catalog", "max_tokens: 100, tokens=5, passed=True"):
        assert redact_text(text) == text


@pytest.mark.parametrize(("name", "secret"), [
    ("password", True), ("db_password", True), ("PGPASS", True), ("api_key", True), ("llmApiKey", True),
    ("OPENAI_API_KEY", True), ("AWS_SECRET_ACCESS_KEY", True), ("access_token", True), ("credentials", True),
    ("max_tokens", False), ("input_tokens", False), ("TOKENIZERS_PARALLELISM", False), ("passed", False),
    ("llm_connection_id", False), ("PWD", True),
])
def test_secret_names(name, secret):
    assert is_secret_name(name) is secret


def test_redacted_config_masks_keys_and_urls_and_keeps_the_rest():
    cfg = {"catalog": {"db_url": f"postgresql://u:{quote(PASSWORD, safe='')}@h/db", "seed": 3},
           "labeling": {"api_key": "sk-live-123456", "max_tokens": 7, "llm_model": "gpt-x"},
           "list": ["password=hunter2x", "ok"]}
    out = redacted_config(cfg)
    assert out["catalog"] == {"db_url": f"postgresql://u:{MASK}@h/db", "seed": 3}
    assert out["labeling"] == {"api_key": MASK, "max_tokens": 7, "llm_model": "gpt-x"}
    assert out["list"] == [f"password={MASK}", "ok"]


def test_text_pairs_in_json_and_reprs():
    text = """{"password": "hunter2x", "n": 1} kwargs={'api_key': 'sk-abcdef'} DSN host=h password=hunter2x dbname=c"""
    out = redact_text(text)
    assert "hunter2x" not in out and "sk-abcdef" not in out and '"n": 1' in out and "dbname=c" in out


def test_known_secrets_are_masked_in_every_form(monkeypatch):
    secret = "Zq9!s3cr@t/val%ue"
    monkeypatch.setenv("MY_DB_PASS", secret)
    found = redaction.register_config_secrets({"catalog": {"note": f"pw is {secret} here"}})
    assert secret in found
    lower_hex = re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), quote(secret, safe=""))
    for form in (secret, quote(secret, safe=""), lower_hex, quote_plus(secret), repr(secret)[1:-1]):
        assert redact_text(f"error: {form} !") == f"error: {MASK} !", form


def test_secrets_in_config_finds_expanded_env_and_url_passwords(monkeypatch):
    monkeypatch.setenv("PGPASS", PASSWORD)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # not a secret, even where "false" appears
    cfg = {"catalog": {"db_url": f"postgresql+psycopg://dashclip:{PASSWORD}@127.0.0.1:1/catalog", "source": "false"}}
    found = secrets_in_config(cfg)
    assert PASSWORD in found and "false" not in found


def test_log_filter_masks_message_args_and_traceback():
    redaction.register_secret("tr4ceback-s3cret")
    log = logging.getLogger("dashclip.test.redaction")
    handler = logging.StreamHandler(stream := io.StringIO())
    handler.addFilter(redaction.RedactingFilter())
    log.addHandler(handler)
    try:
        try:
            raise RuntimeError("connect to postgresql://u:tr4ceback-s3cret@h/db failed")
        except RuntimeError:
            log.exception("opening %s", "postgresql://u:an0ther-pw@h/db")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "tr4ceback-s3cret" not in text and "an0ther-pw" not in text and "RuntimeError" in text


# ---- where it is used -------------------------------------------------------------------------------


def _secret_config(tmp_path: Path, monkeypatch, tiny_config: Path) -> Path:
    monkeypatch.setenv("PGPASS", PASSWORD)
    cfg = tmp_path / "secret.yaml"
    cfg.write_text(tiny_config.read_text().replace(
        "source: demo", "source: sql\n  db_url: postgresql+psycopg://dashclip:${PGPASS}@127.0.0.1:1/catalog"))
    return cfg


def test_mlflow_params_hold_no_password(tmp_path, monkeypatch, tiny_config):
    """Issue 11 row 2: the whole expanded config went to MLflow params (db_url with ${PGPASS} in the UI)."""
    from mlflow.tracking import MlflowClient

    from dashclip_core.config import PipelineConfig
    from dashclip_core.registry.mlflow_registry import pipeline_run

    cfg = PipelineConfig.from_file(_secret_config(tmp_path, monkeypatch, tiny_config))
    cfg = cfg.with_overrides(**{"registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                "registry.artifact_root": (tmp_path / "artifacts").as_uri()})
    run = MlflowClient(cfg.tracking_uri()).get_run(pipeline_run(cfg, "manual__secret", "dashclip_nightly"))
    assert run.data.params["catalog.db_url"] == f"postgresql+psycopg://dashclip:{MASK}@127.0.0.1:1/catalog"
    assert _leaks(repr(run.data.params)) == []
    assert _leaks((tmp_path / "mlflow.db").read_bytes().decode("latin-1")) == []


def test_catalog_connection_error_names_the_db_without_its_password():
    """The catalog DB URL went into the exception (percent-encoded, so Airflow's masker missed it)."""
    pytest.importorskip("psycopg")
    from dashclip_core.catalog.snapshot import read_catalog

    with pytest.raises(ConnectionError) as info:
        read_catalog(f"postgresql+psycopg://dashclip:{quote(PASSWORD, safe='')}@127.0.0.1:1/catalog?connect_timeout=5")
    message = str(info.value)
    assert "127.0.0.1:1/catalog" in message and _leaks(message) == [], message


def test_missing_column_error_masks_the_url(tmp_path):
    import sqlalchemy as sa

    from dashclip_core.catalog.snapshot import read_catalog

    db = tmp_path / "bad.db"
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE products (product_id TEXT)"))
    engine.dispose()
    with pytest.raises(ValueError, match="lacks column"):
        read_catalog(f"sqlite:///{db}")


def test_step_summary_and_xcom_are_redacted(tmp_path):
    from dashclip_core.storage import RunPaths, read_json
    from tasks.common import run_step

    redaction.register_secret("summ4ry-secret")
    paths = RunPaths(str(tmp_path / "runs"), "dashclip_nightly", "manual__s", cache_dir=tmp_path / "cache")
    xcom = run_step(paths, "extract_catalog", lambda out: {"source": "postgresql://u:summ4ry-secret@h/c", "token": "abcd1234",
                                                          "n_products": 3})
    assert xcom["source"] == f"postgresql://u:{MASK}@h/c" and xcom["token"] == MASK and xcom["n_products"] == 3
    stored = read_json(paths.local("extract_catalog") / "summary.json")
    assert "summ4ry-secret" not in repr(stored) and "abcd1234" not in repr(stored)


def test_connection_password_is_masked_in_its_encoded_url_form(monkeypatch):
    """A password read from an Airflow connection lands percent-encoded in the SQLAlchemy URL: both forms are masked,
    by the library rule and by Airflow's masker."""
    from airflow.sdk.log import mask_secret  # noqa: F401 (the API tasks/masking.py registers with)

    from dashclip_core.config import PipelineConfig
    from tasks.connections import catalog_url

    secret = "c0nn/p@ss:%9"
    monkeypatch.setenv("AIRFLOW_CONN_SECRET_CATALOG", f"postgres://dashclip:{quote(secret, safe='')}@db.internal:5432/catalog")
    cfg = PipelineConfig.from_dict({"catalog": {"source": "sql", "airflow_conn_id": "secret_catalog"}})
    url = catalog_url(cfg)
    assert quote(secret, safe="") in url  # the URL itself must work
    assert _leaks(redact_text(f"failed: {url} / {secret}"), secret) == []
    from airflow.sdk._shared.secrets_masker import redact as airflow_redact

    assert quote(secret, safe="") not in str(airflow_redact(f"failed: {url}"))


# ---- config_path allow-list -------------------------------------------------------------------------


def test_config_path_outside_the_allowed_folders_is_refused(tmp_path, monkeypatch):
    """Issue 11 row 3: the config_path param accepted any YAML the worker could read."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.common import allowed_config_path, resolve_config

    monkeypatch.setenv("DASHCLIP_CONFIG_DIRS", str(tmp_path / "allowed"))
    (tmp_path / "allowed").mkdir()
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("name: evil\nstorage:\n  root: /tmp/evil\n")
    (tmp_path / "allowed" / "link.yaml").symlink_to(outside)
    for path in (str(outside), str(tmp_path / "allowed" / ".." / "elsewhere.yaml"), str(tmp_path / "allowed" / "link.yaml"),
                 "configs/../README.md", "/etc/passwd"):
        with pytest.raises(ValueError, match="not a YAML file under an allowed config folder") as info:
            allowed_config_path(path)
        assert str(tmp_path / "allowed") in str(info.value) and str(ROOT / "configs") in str(info.value)
    with pytest.raises(AirflowFailException, match="elsewhere.yaml"):
        resolve_config({"config_path": str(outside)})


def test_config_paths_inside_the_allowed_folders_work(tmp_path, monkeypatch):
    from tasks.common import resolve_config

    monkeypatch.setenv("DASHCLIP_CONFIG_DIRS", os.pathsep.join(["/nonexistent", str(tmp_path)]))
    mine = tmp_path / "sub" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text((ROOT / "configs" / "tiny.yaml").read_text())
    assert resolve_config({"config_path": str(mine)}).name == "tiny"
    assert resolve_config({"config_path": "configs/tiny.yaml"}).name == "tiny"
    assert resolve_config({}).name == "demo"  # the default config
    assert resolve_config({"config_path": str(ROOT / "configs" / "tiny.yaml")}).name == "tiny"


def test_dashclip_run_allows_the_folder_of_its_own_config(tmp_path):
    from orchestration.cli import allow_config_folder

    cfg = tmp_path / "ops" / "prod.yaml"
    assert allow_config_folder(cfg, "") == str(tmp_path / "ops")
    assert allow_config_folder(cfg, os.pathsep.join(["/a", str(tmp_path / "ops")])) == os.pathsep.join(["/a", str(tmp_path / "ops")])
