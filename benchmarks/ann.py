"""ANN index families against exact search: build seconds, recall@10 vs ``Flat`` and QPS ratio, same run.

Vectors are synthetic but clustered like product embeddings (unit vectors around ``--centres`` centres with
Gaussian noise); queries come from the same distribution and are not in the index. Each factory is built
through ``dashclip_core.index.faiss_index.build_index`` (the pipeline's code: sampled training, chunked adds,
``nprobe`` / ``efSearch``) and searched with one batch of ``--queries`` queries, as ``Flat`` is.

    .venv/bin/python benchmarks/ann.py --n 1000000 --dim 256 --factories HNSW32 "IVF4096,PQ64x4fs,RFlat"

The last line is one JSON object: ``{"n", "dim", "flat_qps", "results": [{"factory", "build_s", "recall_at_10",
"qps", "qps_ratio_vs_flat"}]}``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def clustered(n: int, dim: int, centres: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: bounded temporary memory
        stop = min(n, start + 100_000)
        x = c[rng.integers(0, centres, stop - start)] + noise * rng.standard_normal((stop - start, dim)).astype(np.float32)
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    _, positions = index.search(queries, k)
    return positions, len(queries) / (time.perf_counter() - t0)


def main() -> None:
    import faiss

    from dashclip_core.config import IndexConfig
    from dashclip_core.index.faiss_index import build_index

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--centres", type=int, default=2000)
    p.add_argument("--noise", type=float, default=0.6, help="per-dimension noise around a centre (before normalising)")
    p.add_argument("--factories", nargs="+", default=["HNSW32", "IVF4096,PQ64x4fs,RFlat"])
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=64)
    p.add_argument("--train-sample", type=int, default=200_000)
    args = p.parse_args()

    x = clustered(args.n, args.dim, args.centres, args.noise, seed=0)
    c = np.random.default_rng(0).standard_normal((args.centres, args.dim)).astype(np.float32)  # clustered()'s centres (seed 0)
    q = c[np.random.default_rng(1).integers(0, args.centres, args.queries)]
    q = q + args.noise * np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    ids = [str(i) for i in range(args.n)]

    flat = faiss.IndexFlatIP(args.dim)
    flat.add(x)
    truth, flat_qps = timed_search(flat, q, 10)
    print(f"n={args.n} dim={args.dim} queries={args.queries}: Flat {flat_qps:,.0f} queries/s", flush=True)
    del flat

    results = []
    for factory in args.factories:
        cfg = IndexConfig(factory=factory, nprobe=args.nprobe, ef_search=args.ef_search, train_sample=args.train_sample)
        t0 = time.perf_counter()
        index = build_index(x, ids, cfg)
        build_s = time.perf_counter() - t0
        found, qps = timed_search(index.index, q, 10)
        recall = float(np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)]))
        row = {"factory": factory, "build_s": round(build_s, 1), "recall_at_10": round(recall, 4), "qps": round(qps),
               "qps_ratio_vs_flat": round(qps / flat_qps, 1)}
        results.append(row)
        print(f"{factory:28s} build {build_s:7.1f} s  recall@10 {recall:.4f}  {qps:10,.0f} q/s  x{qps / flat_qps:6.1f} vs Flat",
              flush=True)
        del index
    print(json.dumps({"n": args.n, "dim": args.dim, "flat_qps": round(flat_qps), "results": results}))


if __name__ == "__main__":
    main()
