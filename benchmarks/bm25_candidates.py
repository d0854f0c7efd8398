"""BM25 candidate generation at catalog scale: index build and top-k for many queries, wall seconds and peak RSS.

Product texts are synthetic grocery-style titles + descriptions drawn from a fixed vocabulary (brands, products,
attributes, sizes); queries are 1–3 of the same words. The code measured is the pipeline's
``dashclip_core.baselines.bm25.BM25Index`` (sparse term-document matrix, one sparse product per chunk of queries).

    .venv/bin/python benchmarks/bm25_candidates.py --products 1000000 --queries 5000 --k 20

The last line is one JSON object: ``{"products", "queries", "k", "build_s", "rank_s", "peak_rss_gib"}``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

BRANDS = [f"brand{i}" for i in range(400)]
PRODUCTS = ["milk", "oat", "granola", "bar", "bread", "banana", "apple", "yogurt", "cheese", "coffee", "tea", "rice",
            "pasta", "sauce", "chips", "cookies", "cereal", "juice", "water", "soda", "butter", "eggs", "honey", "jam",
            "muffins", "salad", "tofu", "beans", "soup", "nuts"]
ATTRIBUTES = ["organic", "fairtrade", "chocolate", "vanilla", "lowfat", "glutenfree", "vegan", "spicy", "salted",
              "sweet", "fresh", "frozen", "family", "mini", "classic", "crunchy", "creamy", "wholegrain"]
SIZES = ["250g", "500g", "1kg", "1l", "2l", "6pack", "12pack", "bunch"]


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    b, p, a, s = (rng.integers(0, len(x), n) for x in (BRANDS, PRODUCTS, ATTRIBUTES, SIZES))
    a2 = rng.integers(0, len(ATTRIBUTES), n)
    return [f"{BRANDS[i]} {ATTRIBUTES[j]} {PRODUCTS[k]} {SIZES[m]} {ATTRIBUTES[o]} {PRODUCTS[k]} made with care"
            for i, j, k, m, o in zip(b, a, p, s, a2)]


def main() -> None:
    from dashclip_core.baselines.bm25 import BM25Index

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--products", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--k", type=int, default=20)
    args = ap.parse_args()

    texts = synthetic_texts(args.products)
    rng = np.random.default_rng(1)
    words = PRODUCTS + ATTRIBUTES + BRANDS[:50]
    queries = [" ".join(rng.choice(words, size=rng.integers(1, 4), replace=False)) for _ in range(args.queries)]
    t0 = time.perf_counter()
    index = BM25Index(texts, [f"p{i}" for i in range(args.products)])
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ranked = index.rank_many(queries, args.k)
    rank_s = time.perf_counter() - t0
    assert len(ranked) == len(queries) and all(len(r) <= args.k for r in ranked)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB (Linux)
    print(f"{args.products:,} products, {args.queries:,} queries, top {args.k}: build {build_s:.1f} s, "
          f"rank {rank_s:.1f} s ({args.queries / rank_s:,.0f} queries/s), peak RSS {peak:.2f} GiB")
    print(json.dumps({"products": args.products, "queries": args.queries, "k": args.k, "build_s": round(build_s, 1),
                      "rank_s": round(rank_s, 1), "peak_rss_gib": round(peak, 2)}))


if __name__ == "__main__":
    main()
