"""Embedding backfill: product embeddings for a whole snapshot with Ray Data, streamed in bounded chunks.

1. The clean catalog is read ``catalog.chunk_rows`` rows at a time; each chunk's content keys are looked up in
   the model's embedding store (``backfill/incremental.py``): stored embeddings are written straight to the
   output, the rows to embed go to a scratch parquet folder.
2. Those rows stream through a Ray Data actor pool: read tasks load the scratch parts, each actor loads the
   product encoder once (``ProductEmbedder.__init__``) and embeds batches of rows (``__call__``), fetching and
   decoding their photos (local, ``s3://``, ``http(s)://``) inside the actor. The driver consumes the stream in
   batches of at most ``catalog.chunk_rows`` rows (``iter_batches``; nothing is collected whole), so with an
   unchanged model a nightly run embeds only new and changed products, in bounded memory.
3. Each streamed batch is written as one output part and one embedding-store part.

The output is a partitioned table (``embeddings.parquet/part-*.parquet``: product_id, embedding
list<float32>, unit norm), one row per product, in no particular order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dashclip_core.config import PipelineConfig

logger = logging.getLogger(__name__)

COLUMNS = ["product_id", "title", "description", "image_uri"]
TODO_PART_BATCHES = 8  # rows to embed are handed to the actor pool in blocks of this many batches


class ProductEmbedder:
    """Ray Data callable class: one encoder per actor."""

    def __init__(self, model_dir: str, threads: int = 1, stem_path: str = "", image_policy=None) -> None:
        import torch

        from dashclip_core.models.encoders import load_product_encoder
        from dashclip_core.models.image_stem import StemStore
        from dashclip_core.models.inputs import InputBuilder

        torch.set_num_threads(threads)  # one thread per actor on a small box; actors give the parallelism
        self.encoder = load_product_encoder(Path(model_dir))
        self.builder = InputBuilder(self.encoder.cfg, images=image_policy)  # the run's image roots and limits
        # The run's frozen image stem (stage 1 computed it for every photo): covered photos run the tail only.
        self.stem = StemStore.open(Path(stem_path), self.encoder.cfg) if stem_path else None

    def __call__(self, batch: pd.DataFrame):
        import pyarrow as pa

        from dashclip_core.models.image_stem import embeddings_from_pooled
        from dashclip_core.models.inputs import embed_products

        batch = batch.reset_index(drop=True)
        with_image = batch.loc[batch["image_uri"].notna(), "product_id"]
        if self.stem is not None and self.stem.covers(with_image):
            emb = embeddings_from_pooled(self.encoder, self.builder, batch, self.stem.pooled(self.encoder.image_tower, with_image))[0]
        else:
            emb = embed_products(self.encoder, self.builder, batch, batch_size=len(batch))
        # An Arrow table with a list<float32> column: a frame of numpy rows would become Ray's tensor extension type.
        emb = np.ascontiguousarray(emb, np.float32)
        columns = {"product_id": pa.array(batch["product_id"].astype(str).tolist(), pa.string())}
        if "key" in batch.columns:  # the content key travels with the row into the embedding store
            columns["key"] = pa.array(batch["key"].tolist(), pa.string())
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]).cast(pa.list_(pa.float32()))
        return pa.table(columns)


def backfill_embeddings(cfg: PipelineConfig, products: pd.DataFrame | str | Path, model_dir: Path, out_path: Path,
                        stem_path: Path | None = None, store_dir: Path | None = None) -> dict:
    """Embed the snapshot's products (a frame, or a parquet file / folder of parts read in chunks) with Ray Data
    into the partitioned table ``out_path``.

    ``stem_path``: the run's frozen-stem store (``models/image_stem.py``), when stage 1 left one; photos it
    covers skip the frozen part of the image tower (same function, computed once), others are decoded.

    With ``ray.backfill_incremental`` (default), products whose content key is in the model's
    :class:`~dashclip_core.backfill.incremental.EmbeddingStore` (``store_dir``, default
    ``<cache_dir>/embeddings``) are read back instead of embedded, and the new embeddings are added to it.
    Returns ``n_products``, ``dim``, ``n_embedded``, ``n_reused`` and ``n_parts``."""
    import tempfile

    from dashclip_core.backfill.incremental import EmbeddingStore, content_keys, model_digest
    from dashclip_core.storage.images import ImagePolicy
    from dashclip_core.storage.partitions import PartWriter, frame_chunks, part_files

    policy = ImagePolicy.for_pipeline(cfg)
    store = None
    if cfg.ray.backfill_incremental:
        store = EmbeddingStore(Path(store_dir or cfg.cache_dir() / "embeddings") / model_digest(Path(model_dir)))
    scratch_root = cfg.cache_dir() / "backfill"
    scratch_root.mkdir(parents=True, exist_ok=True)
    n_products = n_reused = n_embedded = 0
    dim = cfg.model.embed_dim
    out = PartWriter(out_path, _embedding_frame([], np.zeros((0, dim), np.float32)))
    with tempfile.TemporaryDirectory(dir=scratch_root, prefix="run-") as scratch:
        todo = PartWriter(Path(scratch) / "todo")
        for chunk in frame_chunks(products, cfg.catalog.chunk_rows, columns=COLUMNS):
            chunk = chunk.reset_index(drop=True)
            n_products += len(chunk)
            keys = content_keys(chunk, policy) if store is not None else [""] * len(chunk)
            found = store.lookup(keys) if store is not None else {}
            hit = [i for i, key in enumerate(keys) if key in found]
            if hit:
                out.write(_embedding_frame(chunk["product_id"].iloc[hit].astype(str).tolist(), np.stack([found[keys[i]] for i in hit])))
                n_reused += len(hit)
            miss = [i for i, key in enumerate(keys) if key not in found]
            misses = chunk.iloc[miss].assign(key=[keys[i] for i in miss])
            # Small parts: each is one read task and one Ray Data block, and a block goes to one actor at a time,
            # so a chunk written as one part would keep every actor but one idle.
            for start in range(0, len(misses), TODO_PART_BATCHES * cfg.ray.backfill_batch_size):
                todo.write(misses.iloc[start:start + TODO_PART_BATCHES * cfg.ray.backfill_batch_size])
        if todo.n_rows:
            todo.close()
            for ids, keys, matrix in _embed_with_ray(cfg, part_files(Path(scratch) / "todo"), model_dir, stem_path, policy):
                out.write(_embedding_frame(ids, matrix))
                if store is not None:
                    store.add(keys, matrix)
                n_embedded, dim = n_embedded + len(ids), int(matrix.shape[1])
    out.close()
    if store is not None:
        store.touch()
        store.prune_others(cfg.ray.backfill_keep_models)
    if n_embedded + n_reused != n_products:
        raise RuntimeError(f"backfill: {n_products} products in, {n_embedded} embedded + {n_reused} reused out")
    logger.info("backfill: %d products, %d embedded, %d reused from the embedding store, %d parts", n_products, n_embedded,
                n_reused, out.n_parts)
    return {"n_products": n_products, "dim": dim, "n_embedded": n_embedded, "n_reused": n_reused, "n_parts": out.n_parts}


def _embedding_frame(ids: list[str], matrix: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"product_id": pd.Series(ids, dtype=object),
                         "embedding": pd.Series(list(np.asarray(matrix, np.float32)), dtype=object)})


def _embed_with_ray(cfg: PipelineConfig, parts: list[Path], model_dir: Path, stem_path: Path | None, policy):
    """Yields (ids, content keys, (n, D) embeddings) for the rows of the parquet ``parts``, at most
    ``catalog.chunk_rows`` rows at a time, streamed through a Ray Data actor pool (one encoder per actor)."""
    import pyarrow as pa
    import ray.data

    from dashclip_core.storage.partitions import list_matrix
    from dashclip_core.training.ray_launcher import ensure_ray

    ensure_ray(cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # The parts are read by our own zero-CPU tasks rather than ray.data.read_parquet: its file-listing task needs a
    # whole CPU, and a pool holding every CPU (ray.backfill_actors == ray.num_cpus, the demo's 2 of 2) leaves it
    # none, so the dataset never starts (ray-project/ray#44687). Reading a part is I/O, not compute.
    rows = ray.data.from_items([{"path": str(p)} for p in parts], override_num_blocks=max(len(parts), 1)).map_batches(
        _read_parts, batch_size=1, batch_format="pyarrow", num_cpus=0)
    embedded = rows.map_batches(
        ProductEmbedder,
        fn_constructor_kwargs={"model_dir": str(model_dir), "stem_path": str(stem_path) if stem_path else "",
                               "image_policy": policy},
        batch_size=cfg.ray.backfill_batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.backfill_actors),
        num_cpus=1,
    )
    for batch in embedded.iter_batches(batch_size=cfg.catalog.chunk_rows, batch_format="pyarrow"):
        batch = pa.table(batch) if not isinstance(batch, pa.Table) else batch
        yield ([str(p) for p in batch["product_id"].to_pylist()], batch["key"].to_pylist(), list_matrix(batch["embedding"]))


def _read_parts(batch):
    """Ray Data task: the rows of each parquet part named in ``batch['path']``."""
    import pyarrow.parquet as pq

    for path in batch["path"].to_pylist():
        yield pq.read_table(str(path))


def read_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    """(product_ids, (N, D) float32) from an embeddings table (a parquet file or a folder of parts)."""
    import pyarrow.parquet as pq

    from dashclip_core.storage.partitions import list_matrix

    table = pq.read_table(path, columns=["product_id", "embedding"])
    return [str(p) for p in table["product_id"].to_pylist()], list_matrix(table["embedding"])
