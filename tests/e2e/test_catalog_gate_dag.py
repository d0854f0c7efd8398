"""A bad catalog stops the DAG at validate_catalog: no training runs, the quarantine names the rows."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def bad_catalog(tmp_path, dashclip_home):
    from dashclip_core.catalog.demo import generate_demo_catalog

    src = generate_demo_catalog(tmp_path / "src", num_products=40, seed=3)
    dst = tmp_path / "bad"
    shutil.copytree(src.parent, dst)
    db = dst / "catalog.db"
    with sqlite3.connect(db) as con:
        ids = [r[0] for r in con.execute("SELECT product_id FROM products WHERE title IS NOT NULL AND image_uri IS NOT NULL ORDER BY product_id")]
        # An upstream catalog DB need not enforce a primary key: copy the table without one.
        con.executescript("CREATE TABLE p2 AS SELECT * FROM products; DROP TABLE products; ALTER TABLE p2 RENAME TO products;")
        # 1. a duplicate id, 2. an empty title, 3. a corrupt image file
        con.execute("INSERT INTO products SELECT * FROM products WHERE product_id = ?", (ids[0],))
        con.execute("UPDATE products SET title = '' WHERE product_id = ?", (ids[1],))
        corrupt = con.execute("SELECT image_uri FROM products WHERE product_id = ?", (ids[2],)).fetchone()[0]
    (dst / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text((ROOT / "configs" / "tiny.yaml").read_text().replace("source: demo", f"source: sql\n  db_url: sqlite:///{db}"))
    return cfg, ids[:3]


def test_bad_catalog_stops_before_training(airflow_db, bad_catalog):
    import pandas as pd
    from airflow.dag_processing.dagbag import DagBag

    from dashclip_core.config import PipelineConfig
    from tasks.common import run_paths

    cfg_path, (dup, empty, corrupt) = bad_catalog
    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["dashclip_nightly"]
    dr = dag.test(run_conf={"config_path": str(cfg_path)})
    states = {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}
    assert states["extract_catalog"] == "success"
    assert states["validate_catalog"] == "failed"
    for task in ("label_pairs", "train_stage1", "train_stage2", "backfill_embeddings", "register_model"):
        assert states[task] in ("upstream_failed", "None", "none"), (task, states[task])

    paths = run_paths(PipelineConfig.from_file(cfg_path), dr.run_id)
    gate_dir = paths.local("validate_catalog")
    quarantine = pd.read_parquet(gate_dir / "quarantine.parquet")
    reasons = dict(zip(quarantine["product_id"], quarantine["reason"]))
    assert "duplicate" in reasons[dup] and (quarantine["product_id"] == dup).sum() == 2
    assert "title is empty" in reasons[empty]
    assert "image unreadable" in reasons[corrupt]
    clean = pd.read_parquet(gate_dir / "clean.parquet")
    assert not set(clean["product_id"]) & {dup, empty, corrupt}
    assert len(clean) == 40 - 3  # the rest of the snapshot is kept
    assert not paths.is_done("train_stage1")
    # The failed gate still published its Data Docs, and logged them to the run's MLflow run.
    assert (gate_dir / "data_docs" / "index.html").is_file()
    from dashclip_core.registry.mlflow_registry import client, pipeline_run

    cfg = PipelineConfig.from_file(cfg_path)
    logged = {a.path for a in client(cfg).list_artifacts(pipeline_run(cfg, dr.run_id, dag.dag_id), "data_docs/validate_catalog")}
    assert "data_docs/validate_catalog/index.html" in logged
