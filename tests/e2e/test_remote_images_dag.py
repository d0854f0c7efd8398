"""A catalog whose images are all remote runs through the whole DAG (issue 12).

Every ``image_uri`` is an ``s3://`` object on moto's S3 server or an ``http://`` URL on a local HTTP server; the
demo's local PNGs are deleted before the run, so nothing can be read from disk. Three bad rows (a missing S3 key,
an HTTP 404, corrupt bytes over HTTP) must be quarantined by the catalog gate with their reason codes, and every
other product must come out of training, backfill and evaluation with an embedding, not crash a Ray worker.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import threading
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "dashclip-remote-img"
ALL_TASKS = {
    "extract_catalog", "validate_catalog", "label_pairs", "validate_labels", "train_stage1", "train_stage2",
    "backfill_embeddings", "validate_embeddings", "build_index", "evaluate", "register_model",
}
BAD = {  # product id -> (image location, expected reason code); the location is filled in by the catalog fixture
    "bad-s3-missing": "image_not_found",
    "bad-http-404": "image_not_found",
    "bad-http-corrupt": "image_unreadable",
}


class _ImageServer:
    """A ThreadingHTTPServer on 127.0.0.1 serving ``files`` (path -> bytes) from memory, 404 otherwise; counts GETs."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.gets: dict[str, int] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, with_body: bool) -> None:
                body = outer.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    if with_body:
                        self.wfile.write(b"no")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"' + hashlib.sha256(body).hexdigest()[:16] + '"')
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_GET(self):
                with outer.lock:
                    outer.gets[self.path] = outer.gets.get(self.path, 0) + 1
                self._answer(with_body=True)

            def do_HEAD(self):
                self._answer(with_body=False)

            def log_message(self, format: str, *args: typing.Any) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="image-server", daemon=True)

    def __enter__(self) -> typing.Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def image_server():
    with _ImageServer() as srv:
        yield srv


@pytest.fixture()
def remote_catalog(tmp_path, s3_endpoint, image_server, tiny_config):
    """The tiny demo catalog as a SQLite catalog with every image moved to S3 (even rows) or HTTP (odd rows)."""
    import boto3

    from dashclip_core.catalog.demo import generate_demo_catalog

    raw = yaml.safe_load(tiny_config.read_text())
    db = generate_demo_catalog(tmp_path / "catalog", num_products=raw["catalog"]["demo_num_products"], seed=0)
    folder = db.parent
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    s3_keys, http_paths = {}, {}  # product id -> key / path
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT product_id, image_uri FROM products WHERE image_uri IS NOT NULL ORDER BY product_id").fetchall()
        for i, (pid, uri) in enumerate(rows):
            name = Path(uri).name
            data = (folder / uri).read_bytes()
            if i % 2 == 0:
                key = f"img/{name}"
                s3.put_object(Bucket=BUCKET, Key=key, Body=data)
                s3_keys[pid] = key
                new = f"s3://{BUCKET}/{key}"
            else:
                path = f"/img/{name}"
                image_server.files[path] = data
                http_paths[pid] = path
                new = image_server.base + path
            con.execute("UPDATE products SET image_uri = ? WHERE product_id = ?", (new, pid))
        # The bad rows: copies of a titled product with another id and an image that cannot be read.
        template = con.execute("SELECT * FROM products WHERE title IS NOT NULL AND image_uri IS NOT NULL "
                               "ORDER BY product_id LIMIT 1").fetchone()
        cols = [d[1] for d in con.execute("PRAGMA table_info(products)")]
        image_server.files["/img/corrupt.png"] = b"not a png"
        bad_uris = {"bad-s3-missing": f"s3://{BUCKET}/img/missing.png",
                    "bad-http-404": image_server.base + "/img/missing.png",
                    "bad-http-corrupt": image_server.base + "/img/corrupt.png"}
        for pid, uri in bad_uris.items():
            row = dict(zip(cols, template))
            row.update(product_id=pid, image_uri=uri)
            con.execute(f"INSERT INTO products ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                        [row[c] for c in cols])
        image_only = {pid for (pid,) in con.execute("SELECT product_id FROM products WHERE title IS NULL AND image_uri IS NOT NULL")}
        all_ids = {pid for (pid,) in con.execute("SELECT product_id FROM products")}
    shutil.rmtree(folder / "images")  # nothing can be read from local disk any more
    assert not [p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    # Both schemes carry image-only products (embedded from the remote image alone).
    assert image_only & set(s3_keys) and image_only & set(http_paths), (image_only, len(s3_keys), len(http_paths))

    raw["catalog"] = {"source": "sql", "db_url": f"sqlite:///{db}", "image_roots": [f"s3://{BUCKET}/img", f"{image_server.base}/img"]}
    raw["validation"] = {**raw.get("validation", {}), "max_bad_product_fraction": 0.05}  # 3 of 99 rows are bad on purpose
    raw["storage"] = {**raw.get("storage", {}), "s3_endpoint_url": s3_endpoint, "cache_dir": str(tmp_path / "cache")}
    raw["registry"] = {**raw.get("registry", {}), "model_name": "dashclip-remote-images"}
    cfg = tmp_path / "remote_images.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return {"config": cfg, "s3_keys": s3_keys, "http_paths": http_paths, "bad_uris": bad_uris, "image_only": image_only,
            "all_ids": all_ids, "s3": s3}


def test_remote_image_catalog_runs_through_the_dag_and_quarantines_bad_images(airflow_db, remote_catalog, image_server):
    import numpy as np
    import pandas as pd
    import ray
    from airflow.dag_processing.dagbag import DagBag

    from dashclip_core.config import PipelineConfig
    from dashclip_core.storage import read_json
    from tasks.common import run_paths

    # Ray's workers read the photos from S3 with the credentials of the process that started Ray. An earlier test of
    # this pytest process may have started Ray before the s3_endpoint fixture set the test credentials, so this run
    # starts its own (as an Airflow worker does, with its credentials in its environment from the start).
    ray.shutdown()
    cfg_path = remote_catalog["config"]
    s3_keys, http_paths, bad_uris = remote_catalog["s3_keys"], remote_catalog["http_paths"], remote_catalog["bad_uris"]
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    dr = bag.dags["dashclip_nightly"].test(run_conf={"config_path": str(cfg_path)})

    # Every task succeeded: no image read crashed a step or a Ray worker.
    states = {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}
    assert set(states) == ALL_TASKS
    assert all(s == "success" for s in states.values()), states

    paths = run_paths(PipelineConfig.from_file(cfg_path), dr.run_id)
    gate_dir = paths.local("validate_catalog")

    # The quarantine holds exactly the three bad rows, each with its image reason code, product and URI.
    quarantine = pd.read_parquet(gate_dir / "quarantine.parquet")
    assert sorted(quarantine["product_id"]) == sorted(BAD), quarantine
    reasons = dict(zip(quarantine["product_id"], quarantine["reason"]))
    for pid, code in BAD.items():
        reason = reasons[pid]
        assert f"({code})" in reason, (pid, reason)
        assert f"product {pid!r}" in reason and bad_uris[pid] in reason, (pid, reason)
    report = read_json(gate_dir / "report.json")
    assert report["passed"] is True
    assert report["n_images_rejected_by_reason"] == {"image_not_found": 2, "image_unreadable": 1}, report
    assert report["n_images_checked"] == len(s3_keys) + len(http_paths) + len(BAD)

    # Every good product is clean, with its remote URI as given.
    clean = pd.read_parquet(gate_dir / "clean.parquet")
    good_ids = remote_catalog["all_ids"] - set(BAD)
    assert set(clean["product_id"]) == good_ids and len(clean) == len(good_ids)
    uris = clean.set_index("product_id")["image_uri"]
    assert {pid: uris[pid] for pid in s3_keys} == {pid: f"s3://{BUCKET}/{key}" for pid, key in s3_keys.items()}
    assert {pid: uris[pid] for pid in http_paths} == {pid: image_server.base + path for pid, path in http_paths.items()}
    assert uris.dropna().str.match(r"^(s3|http)://").all()

    # One finite unit-norm embedding per clean product, the remote-image (and image-only) products included.
    emb = pd.read_parquet(paths.local("backfill_embeddings") / "embeddings.parquet")
    assert emb["product_id"].is_unique and set(emb["product_id"]) == good_ids
    assert set(s3_keys) | set(http_paths) | remote_catalog["image_only"] <= set(emb["product_id"])
    vectors = np.stack(emb["embedding"].to_numpy())
    dim = PipelineConfig.from_file(cfg_path).model.embed_dim
    assert vectors.shape == (len(good_ids), dim)
    assert np.isfinite(vectors).all()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)

    # Evaluation read the held-out photos from the remote stores too.
    evaluation = read_json(paths.local("evaluate") / "report.json")
    assert evaluation["n_image_only_products"] > 0
    assert evaluation["systems"]["dashclip"]["zero_shot_n_photos"] > 0

    # The servers really served the images: every HTTP image was fetched by the gate and again by a later step
    # (backfill embeds every clean product), and the bad URLs were tried.
    served = image_server.gets
    assert {p: served.get(p, 0) for p in http_paths.values() if served.get(p, 0) < 2} == {}, served
    assert served.get("/img/missing.png", 0) >= 1 and served.get("/img/corrupt.png", 0) >= 1, served
    assert set(served) <= set(image_server.files) | {"/img/missing.png"}, set(served)
    listed = {o["Key"] for page in remote_catalog["s3"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
              for o in page.get("Contents", [])}
    assert listed == set(s3_keys.values()) and "img/missing.png" not in listed
