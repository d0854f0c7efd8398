"""The catalog DB URL can come from an Airflow connection (here an AIRFLOW_CONN_* env var)."""

from __future__ import annotations

from tasks import steps
from tasks.connections import sqlalchemy_url


def test_extract_reads_catalog_through_airflow_connection(tiny_config, tmp_path, monkeypatch):
    from dashclip_core.catalog.demo import generate_demo_catalog

    db = generate_demo_catalog(tmp_path / "cat", num_products=24, seed=5)
    monkeypatch.setenv("AIRFLOW_CONN_SHOP_CATALOG", f"sqlite:///{db}")
    cfg = tmp_path / "conn.yaml"
    cfg.write_text(tiny_config.read_text().replace("source: demo", "source: sql\n  airflow_conn_id: shop_catalog"))
    out = steps.extract_catalog(params={"config_path": str(cfg)}, run_id="manual__conn")
    assert out["n_products"] == 24


def test_sqlalchemy_url_from_postgres_connection(monkeypatch):
    from airflow.sdk import Connection

    monkeypatch.setenv("AIRFLOW_CONN_PG", "postgres://user:p%40ss@db.internal:5432/catalog")
    assert sqlalchemy_url(Connection.get("pg")) == "postgresql://user:p%40ss@db.internal:5432/catalog"
