"""The whole nightly DAG at catalog scale: wall seconds and peak RSS per step and size, incremental re-runs,
real-tower backfill against a plain torch loop, and the ANN index against Flat.

For each size a synthetic catalog is generated (SQLite; text for every product from the demo's product
types, brands and attributes; a ``--image-share`` of products with a small PNG stored locally, or on S3
through a moto server with ``--s3``; the search log and human labels cover a demo-sized subset, as a real
catalog's judged pairs do). Then the DAG's task functions (``tasks/steps.py``, the functions each Airflow
task calls, in DAG order) run in a child process with ``configs/tiny.yaml``-size towers; a sampler thread
records the peak RSS of the child's process tree (Ray's GCS, raylet and workers included) per step. Then,
on the same run: the backfill again under an unchanged catalog and model (``rerun_embedded``), and after
changing 1% of the titles (``changed_1pct_embedded``).

    .venv/bin/python benchmarks/scale.py --sizes 10000,100000,1000000

The last line is one JSON object: ``{"sizes": {"<n>": {"wall_s", "peak_rss_gib", "rerun_embedded",
"changed_1pct_embedded", "steps": {step: {"wall_s", "peak_rss_gib"}}}}, "growth", "backfill_ratio_vs_plain",
"backfill", "ann": {"factory", "recall_at_10", "qps_ratio_vs_flat", "build_s"}}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = ("extract_catalog", "validate_catalog", "label_pairs", "validate_labels", "train_stage1", "train_stage2",
         "backfill_embeddings", "validate_embeddings", "build_index", "evaluate", "register_model")
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GX_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0",
       "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
JUDGED_PRODUCTS = 3000  # the search log and the human labels cover this many products (the demo's size)


# ---- synthetic catalog --------------------------------------------------------------------------------------------


def generate_catalog(n: int, folder: Path, image_share: float, seed: int = 0, s3_endpoint: str = "") -> Path:
    """SQLite catalog of ``n`` products (see the module docstring); returns the DB path."""
    import random

    from PIL import ImageFont

    from dashclip_core.catalog import demo
    from dashclip_core.catalog.schema import write_catalog_db

    folder.mkdir(parents=True, exist_ok=True)
    products = demo._make_products(n, image_only_fraction=0.0, text_only_fraction=0.0, seed=seed)
    rng = random.Random(seed)
    with_image = {i for i in range(n) if rng.random() < image_share}
    images = folder / "images"
    images.mkdir(exist_ok=True)
    s3 = None
    if s3_endpoint:
        import boto3

        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="scale-images")
    fonts: dict[int, ImageFont.ImageFont] = {}
    rows = []
    for i, p in enumerate(products):
        row = p.row()
        row["image_uri"] = None
        if i in with_image:
            path = images / f"{p.product_id}.png"
            demo._render_image(p, 32, seed, fonts).save(path, optimize=False)
            if s3 is not None:
                s3.upload_file(str(path), "scale-images", f"img/{p.product_id}.png")
                path.unlink()
                row["image_uri"] = f"s3://scale-images/img/{p.product_id}.png"
            else:
                row["image_uri"] = f"images/{p.product_id}.png"
        rows.append(row)
    queries = demo.demo_queries()
    split = demo.query_split(queries)
    judged = products[:JUDGED_PRODUCTS]
    db = folder / "catalog.db"
    write_catalog_db(db, rows, demo._simulate_search_log(queries, split, judged, seed), demo._human_labels(queries, split, judged, seed),
                     {"generator": "benchmarks/scale.py", "n": str(n)})
    return db


def change_titles(db: Path, share: float) -> int:
    """Change the title of every ``round(1/share)``-th product; returns how many changed."""
    every = max(1, round(1 / share))
    with sqlite3.connect(db) as conn:
        cur = conn.execute(f"UPDATE products SET title = title || ' (new recipe)' WHERE rowid % {every} = 0 AND title IS NOT NULL")
        return cur.rowcount


# ---- the DAG in a child process --------------------------------------------------------------------------------


class TreeSampler:
    """Peak RSS of this process and its descendants, sampled every ``interval`` s; ``mark()`` starts a new window."""

    def __init__(self, interval: float = 0.25) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.window = self.total = 0
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def rss(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.rss()
            self.window, self.total = max(self.window, now), max(self.total, now)
            time.sleep(self.interval)

    def mark(self) -> int:
        peak, self.window = max(self.window, self.rss()), 0
        return peak


def run_dag_child(cfg_path: str, db: str) -> dict:
    """Every DAG step in order, then the incremental re-runs; per-step wall s and peak tree RSS."""
    from tasks import steps

    params = {"config_path": cfg_path}
    sampler = TreeSampler()
    figures: dict[str, dict] = {}
    out: dict[str, dict] = {}

    def step(name: str, fn, *args, run_id: str = "scale-1"):
        sampler.mark()
        t0 = time.perf_counter()
        summary = fn(*args, params=params, run_id=run_id)
        figures.setdefault(name, {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(sampler.mark() / 2**30, 2)})
        print(f"  {name:22s} {figures[name]['wall_s']:8.1f} s  peak {figures[name]['peak_rss_gib']:5.2f} GiB", flush=True)
        return summary

    t0 = time.perf_counter()
    out["snap"] = snap = step("extract_catalog", steps.extract_catalog)
    gate = step("validate_catalog", steps.validate_catalog, snap)
    labels = step("label_pairs", steps.label_pairs, snap, gate)
    lgate = step("validate_labels", steps.validate_labels, labels)
    s1 = step("train_stage1", steps.train_stage1, gate, lgate)
    s2 = step("train_stage2", steps.train_stage2, gate, labels, s1)
    emb = step("backfill_embeddings", steps.backfill_embeddings, gate, s1)
    egate = step("validate_embeddings", steps.validate_embeddings, gate, emb)
    index = step("build_index", steps.build_index, emb, egate, labels, s2)
    ev = step("evaluate", steps.evaluate, gate, labels, emb, s1, s2, index)
    step("register_model", steps.register_model, snap, gate, labels, s1, s2, index, ev)
    wall = time.perf_counter() - t0
    # Nightly re-run, same catalog and model: a new run's backfill.
    rerun = steps.backfill_embeddings(gate, s1, params=params, run_id="scale-rerun")
    # 1% of the products changed: a new snapshot and gate, the same model.
    n_changed = change_titles(Path(db), 0.01)
    snap2 = steps.extract_catalog(params=params, run_id="scale-changed")
    gate2 = steps.validate_catalog(snap2, params=params, run_id="scale-changed")
    changed = steps.backfill_embeddings(gate2, s1, params=params, run_id="scale-changed")
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(sampler.total / 2**30, 2), "steps": figures,
            "rerun_embedded": rerun["n_embedded"], "changed_1pct_embedded": changed["n_embedded"], "n_changed": n_changed,
            "n_products": snap["n_products"], "index": {k: index.get(k) for k in ("factory", "recall@10_vs_exact")},
            "ndcg@10": ev["systems"]["dashclip"].get("ndcg@10")}


def run_size(n: int, work: Path, image_share: float, samples_per_epoch: int, s3_endpoint: str) -> dict:
    folder = work / f"n{n}"
    t0 = time.perf_counter()
    db = generate_catalog(n, folder / "catalog", image_share, s3_endpoint=s3_endpoint)
    print(f"n={n}: catalog generated in {time.perf_counter() - t0:.0f} s", flush=True)
    tiny = (ROOT / "configs" / "tiny.yaml").read_text()
    roots = ["s3://scale-images/img"] if s3_endpoint else []
    cfg_path = folder / "scale.yaml"
    cfg_path.write_text(tiny.replace("name: tiny", f"name: scale{n}").replace("  source: demo\n  demo_num_products: 96\n", (
        f"  source: sql\n  db_url: sqlite:///{db}\n  image_roots: {json.dumps(roots)}\n"))
        .replace("train:\n", f"train:\n  stage1_samples_per_epoch: {samples_per_epoch}\n")
        .replace("model_name: dashclip-tiny", f"model_name: dashclip-scale{n}")
        + (f"storage:\n  s3_endpoint_url: {s3_endpoint}\n" if s3_endpoint else ""))
    env = {**os.environ, **ENV, "DASHCLIP_HOME": str(folder / "home"), "DASHCLIP_CONFIG_DIRS": str(folder),
           "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'home' / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    if s3_endpoint:
        env.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"})
    (folder / "home").mkdir(parents=True, exist_ok=True)
    result_file = folder / "result.json"
    cmd = [sys.executable, __file__, "--child", str(cfg_path), "--db", str(db), "--result", str(result_file)]
    proc = subprocess.run(cmd, check=False, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("  ") and " s  peak " in line]
    print("\n".join(lines), flush=True)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], file=sys.stderr)
        raise SystemExit(f"n={n}: the DAG failed (exit {proc.returncode})")
    return json.loads(result_file.read_text())


# ---- real-tower backfill against a plain loop ---------------------------------------------------------------------


def backfill_bench(work: Path, n_items: int) -> dict:
    """Items/s of the real towers (MiniLM + EfficientNet-Lite0, the default model config): the pipeline's Ray Data
    backfill with 1 and 2 actors against a plain batched torch loop in one process (torch on both cores)."""
    import torch

    from dashclip_core.backfill.embed import backfill_embeddings
    from dashclip_core.catalog.demo import generate_demo_catalog
    from dashclip_core.catalog.snapshot import read_catalog, resolve_image_uris
    from dashclip_core.config import PipelineConfig
    from dashclip_core.models.encoders import load_product_encoder, save_encoder
    from dashclip_core.models.inputs import InputBuilder, embed_products
    from dashclip_core.storage.images import ImagePolicy
    from dashclip_core.training.stage1 import build_stage1

    os.environ.update(ENV)
    os.environ["DASHCLIP_HOME"] = str(work / "backfill-home")
    db = generate_demo_catalog(work / "backfill-catalog", num_products=n_items, image_only_fraction=0.0, text_only_fraction=0.0)
    products = resolve_image_uris(read_catalog(f"sqlite:///{db}")[0], db.parent)
    base = PipelineConfig().with_overrides(**{"catalog.image_roots": (str(db.parent),), "ray.backfill_incremental": False,
                                              "ray.backfill_batch_size": 64})
    model_dir = save_encoder(build_stage1(base).encoder, base.model, work / "backfill-model")
    t_load = time.perf_counter()
    encoder = load_product_encoder(model_dir)
    builder = InputBuilder(encoder.cfg, images=ImagePolicy.for_pipeline(base))
    torch.set_num_threads(os.cpu_count() or 1)
    embed_products(encoder, builder, products.iloc[:64], batch_size=64)  # warm-up (first-call allocations)
    load_s = time.perf_counter() - t_load
    t0 = time.perf_counter()
    with torch.no_grad():
        embed_products(encoder, builder, products, batch_size=64)
    plain = n_items / (time.perf_counter() - t0)
    # The ratio is against the plain loop's steady rate (model loaded and warm, not timed); the Ray figures include
    # starting the actors and loading one encoder in each, a fixed cost that a larger n amortises.
    figures = {"plain_items_per_s": round(plain, 1), "plain_load_s": round(load_s, 1)}
    for actors in (1, 2):
        cfg = base.with_overrides(**{"ray.backfill_actors": actors, "ray.num_cpus": os.cpu_count() or 2})
        t0 = time.perf_counter()
        backfill_embeddings(cfg, products, model_dir, work / f"backfill-{actors}.parquet")
        figures[f"ray_{actors}_actors_items_per_s"] = round(n_items / (time.perf_counter() - t0), 1)
    figures["ratio_vs_plain"] = round(max(figures["ray_1_actors_items_per_s"], figures["ray_2_actors_items_per_s"]) / plain, 2)
    figures["n_items"] = n_items
    return figures


# ---- ANN at 1M x 256 ----------------------------------------------------------------------------------------------


def ann_bench(n: int, dim: int) -> dict:
    """The ``index.factory: auto`` choice at ``n`` x ``dim`` against Flat (benchmarks/ann.py's data and timing)."""
    import faiss
    import numpy as np

    from benchmarks.ann import clustered, timed_search
    from dashclip_core.config import IndexConfig
    from dashclip_core.index.faiss_index import build_index, resolve_factory

    cfg = IndexConfig()
    factory = resolve_factory(cfg, n)
    x = clustered(n, dim, 2000, 0.6, seed=0)
    c = np.random.default_rng(0).standard_normal((2000, dim)).astype(np.float32)
    q = c[np.random.default_rng(1).integers(0, 2000, 1000)] + 0.6 * np.random.default_rng(2).standard_normal((1000, dim)).astype(np.float32)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    flat = faiss.IndexFlatIP(dim)
    flat.add(x)
    truth, flat_qps = timed_search(flat, q, 10)
    del flat
    t0 = time.perf_counter()
    index = build_index(x, [str(i) for i in range(n)], cfg)
    build_s = time.perf_counter() - t0
    found, qps = timed_search(index.index, q, 10)
    recall = float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))
    return {"factory": factory, "nprobe": cfg.nprobe, "recall_at_10": round(recall, 4), "qps_ratio_vs_flat": round(qps / flat_qps, 1),
            "build_s": round(build_s, 1), "n": n, "dim": dim}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated catalog sizes")
    p.add_argument("--image-share", type=float, default=0.1, help="share of products with a photo")
    p.add_argument("--samples-per-epoch", type=int, default=4096, help="train.stage1_samples_per_epoch of the scale config")
    p.add_argument("--s3", action="store_true", help="photos on S3 (a moto server on 127.0.0.1) instead of local files")
    p.add_argument("--backfill-items", type=int, default=8192, help="products in the real-tower backfill comparison (0 = skip)")
    p.add_argument("--ann-n", type=int, default=1_000_000, help="vectors in the ANN comparison (0 = skip)")
    p.add_argument("--work", default="", help="working folder (default: a temporary folder, removed afterwards)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--db", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        Path(args.result).write_text(json.dumps(run_dag_child(args.child, args.db)))
        return

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="dashclip-scale-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        s3_endpoint = ""
        server = None
        if args.s3:
            from drills.s3_faults import moto_s3

            server = moto_s3()
            s3_endpoint = server.__enter__()
            os.environ.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"})
        try:
            results = {str(n): run_size(n, work, args.image_share, args.samples_per_epoch, s3_endpoint) for n in sizes}
        finally:
            if server is not None:
                server.__exit__(None, None, None)
        growth = {}
        for a, b in itertools.pairwise(sizes):
            ra, rb = results[str(a)], results[str(b)]
            growth[f"{a}->{b}"] = {"wall": round(rb["wall_s"] / ra["wall_s"], 2), "peak_rss": round(rb["peak_rss_gib"] / ra["peak_rss_gib"], 2)}
        print("\nsize        wall s   peak GiB   rerun embedded   1% changed: embedded / changed")
        for n in sizes:
            r = results[str(n)]
            print(f"{n:>9,d} {r['wall_s']:9.1f} {r['peak_rss_gib']:9.2f} {r['rerun_embedded']:14d} {r['changed_1pct_embedded']:12d} / {r['n_changed']}")
        for k, g in growth.items():
            print(f"growth {k}: wall x{g['wall']}, peak RSS x{g['peak_rss']}")
        backfill = backfill_bench(work, args.backfill_items) if args.backfill_items else None
        if backfill:
            print(f"real-tower backfill: {backfill}")
        ann = ann_bench(args.ann_n, 256) if args.ann_n else None
        if ann:
            print(f"ANN at {args.ann_n:,d} x 256: {ann}")
    print(json.dumps({"sizes": results, "growth": growth, "backfill_ratio_vs_plain": backfill and backfill["ratio_vs_plain"],
                      "backfill": backfill, "ann": ann}))


if __name__ == "__main__":
    main()
