"""Labelling pipeline figures: memory and speed of streaming pairs through cache + store, teacher and HTTP throughput.

    .venv/bin/python benchmarks/labeling.py                      # all three, 1M pairs in the memory run
    .venv/bin/python benchmarks/labeling.py --only memory --pairs 1000000
    .venv/bin/python benchmarks/labeling.py --only teacher --teacher-batch-sizes 16 64 256
    .venv/bin/python benchmarks/labeling.py --only http --concurrency 1 8 32

memory: ``label_pairs_streaming`` over synthetic pairs generated lazily, with an in-process word-overlap
labeler, the SQLite label cache and the parquet label store. Pass 1 labels everything (all cache misses),
pass 2 re-runs the same pairs (all hits, labeler never called). RSS is sampled after every chunk and
printed at 10 %, 50 % and 100 % of each pass: flat RSS means memory does not grow with the number of pairs.
Then the store is scanned with ``iter_batches`` (bounded) and, with --read-dedupe, read whole and deduplicated
(that one materialises the label set by design).

teacher / http: throughput of the cross-encoder teacher per batch size and of the OpenAI-compatible labeler
against the local fake server per concurrency level, both through ``label_pairs_streaming``. Each is skipped
with a message when its module is not there yet.

Prints figures only; no asserts.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import re
import resource
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import psutil

from dashclip_core.labeling.base import LabelRequest, LabelResult
from dashclip_core.labeling.budget import estimate_tokens
from dashclip_core.labeling.cache import LabelCache
from dashclip_core.labeling.runner import LabelingSummary, label_pairs_streaming
from dashclip_core.labeling.store import LabelStore

ROOT = Path(__file__).resolve().parent.parent
_WORD = re.compile(r"[a-z0-9]+")
WORDS = ["milk", "bread", "apple", "oat", "cheese", "organic", "whole", "snack", "banana", "yogurt", "pasta", "rice",
         "tomato", "coffee", "tea", "juice"]


class OverlapLabeler:
    """Deterministic in-process labeler: share of query words in the title -> 0/1/2; reports LLM-like token counts."""

    labeler_id = "bench:word-overlap:v1"

    def __init__(self) -> None:
        self.calls = 0

    def label(self, requests: Iterable[LabelRequest]) -> Iterator[LabelResult]:
        self.calls += 1
        for r in requests:
            q = set(_WORD.findall(r.query))
            share = len(q & set(_WORD.findall(r.title or ""))) / max(1, len(q))
            label = 2 if share >= 0.5 else 1 if share > 0 else 0
            yield LabelResult(r.query, r.product_id, label, "ok", self.labeler_id, None, estimate_tokens(r), 12)


def synthetic_pairs(n: int, products_per_query: int = 50) -> Iterator[LabelRequest]:
    """n distinct pairs, generated lazily: n / 50 queries x 50 products each, from a catalog of 50k products."""
    n_products = 50_000
    for i in range(n):
        qi, k = divmod(i, products_per_query)
        q = f"{WORDS[qi % 16]} {WORDS[(qi // 16) % 16]} {qi}"
        p = (k * 1009 + qi) % n_products
        yield LabelRequest(q, f"p{p}", title=f"{WORDS[p % 16]} {WORDS[(p * 7) % 16]} item {p}",
                           description=f"pack of {p % 12}, {WORDS[(p // 16) % 16]} flavour", category="grocery",
                           aisle=WORDS[p % 5])


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _pass(name: str, n: int, labeler, cache: LabelCache, store: LabelStore, chunk_size: int) -> LabelingSummary:
    samples: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    s = label_pairs_streaming(synthetic_pairs(n), labeler, cache, store, chunk_size=chunk_size,
                              progress=lambda s: samples.append((s.n_requested, rss_mib())))
    wall = time.perf_counter() - t0
    at = {pct: next(r for done, r in samples if done >= pct / 100 * n) for pct in (10, 50, 100)}
    rss = [r for _, r in samples]
    print(f"  {name}: {s.n_requested:,} pairs in {wall:.1f} s ({s.n_requested / wall:,.0f} pairs/s); "
          f"labelled {s.n_labelled:,}, cached {s.n_cached:,} (hit rate {s.cache_hit_rate:.1%}), "
          f"labeler calls {labeler.calls}")
    print(f"  {name}: RSS MiB at 10% {at[10]:.0f} | 50% {at[50]:.0f} | 100% {at[100]:.0f}; "
          f"min/max over {len(rss)} chunks {min(rss):.0f}/{max(rss):.0f}; growth 10%->100% {at[100] - at[10]:+.0f} MiB")
    return s


def bench_memory(n: int, chunk_size: int, workdir: Path, read_dedupe: bool) -> None:
    print(f"== memory: {n:,} synthetic pairs, chunk_size {chunk_size:,}, work dir {workdir}")
    base = rss_mib()
    print(f"  RSS before: {base:.0f} MiB")
    cache = LabelCache(workdir / "cache" / "labels.sqlite")
    store = LabelStore(workdir / "labels")
    _pass("pass 1 (cold cache)", n, OverlapLabeler(), cache, store, chunk_size)
    _pass("pass 2 (warm cache)", n, OverlapLabeler(), cache, store, chunk_size)
    stats = cache.stats()
    store_mib = sum(p.stat().st_size for p in store.parts()) / 2**20
    print(f"  cache: {stats.n_entries:,} entries, {stats.size_bytes / 2**20:.0f} MiB on disk; "
          f"store: {len(store.parts())} parts, {store_mib:.0f} MiB")

    t0, rows, top = time.perf_counter(), 0, 0.0
    for batch in store.iter_batches(batch_size=65_536):
        rows += batch.num_rows
        top = max(top, rss_mib())
    print(f"  iter_batches: {rows:,} rows in {time.perf_counter() - t0:.1f} s, max RSS {top:.0f} MiB")
    print(f"  peak RSS of the process so far: {peak_rss_mib():.0f} MiB")
    if read_dedupe:
        t0 = time.perf_counter()
        df = store.read()
        print(f"  read(dedupe=True): {len(df):,} rows in {time.perf_counter() - t0:.1f} s, "
              f"RSS {rss_mib():.0f} MiB (materialised), peak {peak_rss_mib():.0f} MiB")
    cache.close()


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return None
        raise


def _bench_pairs(n: int) -> list[LabelRequest]:
    return list(synthetic_pairs(n, products_per_query=20))


def bench_offline_teacher(batch_sizes: list[int], n_pairs: int = 2000, workdir: Path | None = None) -> None:
    """Cross-encoder teacher throughput per labelling batch size (fresh cache: every pair is labelled)."""
    print(f"== teacher: CrossEncoderTeacher, {n_pairs:,} pairs per batch size")
    mod = _optional("dashclip_core.labeling.cross_encoder")
    if mod is None:
        print("  skipped: dashclip_core.labeling.cross_encoder is not there yet")
        return
    import pandas as pd
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # A tiny fine-tune (32 human pairs, 1 epoch) stands in for the real one: throughput does not depend on the weights.
    pairs = _bench_pairs(32)
    human = pd.DataFrame({"query": [r.query for r in pairs], "title": [r.title for r in pairs],
                          "description": [r.description for r in pairs], "category": [r.category for r in pairs],
                          "aisle": [r.aisle for r in pairs], "label": [i % 3 for i in range(32)]})
    t0 = time.perf_counter()
    teacher = mod.CrossEncoderTeacher(device=device).fit(human, epochs=1, batch_size=16)
    print(f"  device {device}; tiny fit in {time.perf_counter() - t0:.1f} s; labeler_id {teacher.labeler_id}")
    requests = _bench_pairs(n_pairs)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for bs in batch_sizes:
            teacher.batch_size = bs
            cache = LabelCache(Path(tmp) / f"bs{bs}" / "labels.sqlite")
            t0 = time.perf_counter()
            s = label_pairs_streaming(requests, teacher, cache, LabelStore(Path(tmp) / f"bs{bs}" / "labels"), chunk_size=1000)
            wall = time.perf_counter() - t0
            cache.close()
            print(f"  batch_size {bs:>4}: {s.n_labelled:,} labelled ({s.n_failed} failed) in {wall:.1f} s = "
                  f"{s.n_labelled / wall:,.0f} pairs/s")


def _load_fake_server():
    path = ROOT / "tests" / "labeling" / "openai_server.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("dashclip_bench_openai_server", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def bench_http(concurrency_levels: list[int], n_pairs: int = 400, latency_s: float = 0.05, workdir: Path | None = None) -> None:
    """OpenAI-compatible labeler against the local fake server (fixed latency per completion), per concurrency."""
    print(f"== http: OpenAICompatibleLabeler vs the local fake server, {n_pairs:,} pairs, {latency_s * 1000:.0f} ms per completion")
    backend = _optional("dashclip_core.labeling.openai_backend")
    if backend is None:
        print("  skipped: dashclip_core.labeling.openai_backend is not there yet")
        return
    server_mod = _load_fake_server()
    if server_mod is None:
        print("  skipped: tests/labeling/openai_server.py is not there yet")
        return
    requests = _bench_pairs(n_pairs)
    with server_mod.FakeOpenAIServer(api_key="sk-bench", latency=latency_s) as server, \
            tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for c in concurrency_levels:
            labeler = backend.OpenAICompatibleLabeler(server.base_url, f"gpt-bench-c{c}", api_key="sk-bench", concurrency=c)
            cache = LabelCache(Path(tmp) / f"c{c}" / "labels.sqlite")
            server.max_in_flight = 0
            t0 = time.perf_counter()
            s = label_pairs_streaming(requests, labeler, cache, LabelStore(Path(tmp) / f"c{c}" / "labels"), chunk_size=1000)
            wall = time.perf_counter() - t0
            labeler.close()
            cache.close()
            print(f"  concurrency {c:>3}: {s.n_labelled:,} labelled ({s.n_failed} failed) in {wall:.1f} s = "
                  f"{s.n_labelled / wall:,.0f} pairs/s; max in flight {server.max_in_flight}; {s.tokens:,} tokens reported")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1_000_000, help="pairs in the memory run")
    ap.add_argument("--only", choices=["memory", "teacher", "http"], help="run one benchmark")
    ap.add_argument("--chunk-size", type=int, default=1000, help="label_pairs_streaming chunk size (memory run)")
    ap.add_argument("--workdir", type=Path, default=None, help="where cache and store go (default: a temp folder)")
    ap.add_argument("--read-dedupe", action="store_true", help="also time store.read() (materialises every row)")
    ap.add_argument("--teacher-batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--teacher-pairs", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--http-pairs", type=int, default=400)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.only in (None, "memory"):
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-labeling-") as tmp:
            bench_memory(args.pairs, args.chunk_size, Path(tmp), args.read_dedupe)
    if args.only in (None, "teacher"):
        bench_offline_teacher(args.teacher_batch_sizes, args.teacher_pairs, args.workdir)
    if args.only in (None, "http"):
        bench_http(args.concurrency, args.http_pairs, workdir=args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
