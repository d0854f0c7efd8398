"""Embedding backfill: product embeddings for a whole snapshot with Ray Data.

A pool of actors each loads the product encoder once (``ProductEmbedder.__init__``) and embeds
batches of rows (``__call__``); the result is written as one parquet table
(product_id, embedding list<float32>, unit norm).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dashclip_core.config import PipelineConfig

logger = logging.getLogger(__name__)

COLUMNS = ["product_id", "title", "description", "image_uri"]


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

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from dashclip_core.models.image_stem import embeddings_from_pooled
        from dashclip_core.models.inputs import embed_products

        batch = batch.reset_index(drop=True)
        with_image = batch.loc[batch["image_uri"].notna(), "product_id"]
        if self.stem is not None and self.stem.covers(with_image):
            emb = embeddings_from_pooled(self.encoder, self.builder, batch, self.stem.pooled(self.encoder.image_tower, with_image))[0]
        else:
            emb = embed_products(self.encoder, self.builder, batch, batch_size=len(batch))
        return pd.DataFrame({"product_id": batch["product_id"].to_numpy(), "embedding": list(emb.astype(np.float32))})


def backfill_embeddings(cfg: PipelineConfig, products: pd.DataFrame, model_dir: Path, out_path: Path, stem_path: Path | None = None,
                        store_dir: Path | None = None) -> dict:
    """Embed the snapshot's products with Ray Data and write ``out_path`` (parquet, snapshot order).

    ``stem_path``: the run's frozen-stem store (``models/image_stem.py``), when stage 1 left one; photos it
    covers skip the frozen part of the image tower (same function, computed once), others are decoded.

    With ``ray.backfill_incremental`` (default), products whose content key is in the model's
    :class:`~dashclip_core.backfill.incremental.EmbeddingStore` (``store_dir``, default
    ``<cache_dir>/embeddings``) are read back instead of embedded, and the new embeddings are added to it.
    Returns ``n_products``, ``dim``, ``n_embedded`` and ``n_reused``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dashclip_core.backfill.incremental import EmbeddingStore, content_keys, model_digest
    from dashclip_core.storage.images import ImagePolicy

    policy = ImagePolicy.for_pipeline(cfg)
    products = products.reset_index(drop=True)
    store = keys = None
    reused: dict[str, np.ndarray] = {}
    if cfg.ray.backfill_incremental:
        store = EmbeddingStore(Path(store_dir or cfg.cache_dir() / "embeddings") / model_digest(Path(model_dir)))
        keys = content_keys(products, policy)
        reused = store.lookup(keys)
    todo = [i for i in range(len(products)) if keys is None or keys[i] not in reused]  # rows to embed
    fresh = _embed_with_ray(cfg, products.iloc[todo], model_dir, stem_path, policy) if todo else {}
    ids = products["product_id"].astype(str).tolist()
    if store is not None:
        if todo:
            store.add([keys[i] for i in todo], np.stack([fresh[ids[i]] for i in todo]))
        store.touch()
        store.prune_others(cfg.ray.backfill_keep_models)
    rows = [reused[keys[i]] if keys is not None and keys[i] in reused else fresh[pid] for i, pid in enumerate(ids)]
    matrix = np.stack(rows).astype(np.float32) if rows else np.zeros((0, cfg.model.embed_dim), np.float32)
    table = pa.table({
        "product_id": pa.array(ids),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1]).cast(pa.list_(pa.float32())),
    })
    pq.write_table(table, out_path)
    logger.info("backfill: %d products, %d embedded, %d reused from the embedding store", len(products), len(todo),
                len(products) - len(todo))
    return {"n_products": len(products), "dim": int(matrix.shape[1]), "n_embedded": len(todo), "n_reused": len(products) - len(todo)}


def _embed_with_ray(cfg: PipelineConfig, products: pd.DataFrame, model_dir: Path, stem_path: Path | None, policy) -> dict[str, np.ndarray]:
    """product_id -> embedding for ``products``, by a Ray Data actor pool (one encoder per actor)."""
    import ray.data

    from dashclip_core.training.ray_launcher import ensure_ray

    ensure_ray(cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_pandas(products[COLUMNS].reset_index(drop=True))
    out = ds.map_batches(
        ProductEmbedder,
        fn_constructor_kwargs={"model_dir": str(model_dir), "stem_path": str(stem_path) if stem_path else "",
                               "image_policy": policy},
        batch_size=cfg.ray.backfill_batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=cfg.ray.backfill_actors),
        num_cpus=1,
    ).to_pandas()
    return {str(p): np.asarray(e, np.float32) for p, e in zip(out["product_id"], out["embedding"])}


def read_embeddings(path: Path) -> tuple[list[str], np.ndarray]:
    """(product_ids, (N, D) float32) from an embeddings parquet."""
    df = pd.read_parquet(path)
    matrix = np.stack([np.asarray(e, np.float32) for e in df["embedding"]]) if len(df) else np.zeros((0, 0), np.float32)
    return df["product_id"].astype(str).tolist(), matrix
