"""FAISS product index: build, search, save/load, and recall against exact search.

Product embeddings are L2-normalised, so inner product equals cosine similarity; every index is
built with ``faiss.METRIC_INNER_PRODUCT`` from an ``index_factory`` string (``IndexConfig.factory``,
e.g. ``"Flat"``, ``"HNSW32"``, ``"IVF256,Flat"``). FAISS positions (0..N-1) map to product ids
through a list kept beside the index, so no ``IDMap`` wrapper is needed (and none is accepted:
``IndexIDMap.add`` refuses plain ``add``).

On disk (:meth:`ProductIndex.save`)::

    index.faiss   faiss.write_index output
    ids.parquet   position (int64) -> product_id (str)
    meta.json     {"factory", "dim", "ntotal", "metric", "nprobe", "ef_search"}
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from dashclip_core.config import IndexConfig
from dashclip_core.layout import Index as IndexFolder

logger = logging.getLogger(__name__)

NORM_WARN_TOL = 1e-3  # vectors further than this from unit norm make inner product differ from cosine


def _as_matrix(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """Check a (N, D) array of finite values and return it as contiguous float32.

    Raises:
        ValueError: not 2-D, empty, wrong D, or non-finite values (the message names the first bad row).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (N, D), got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: empty array of shape {x.shape}; need at least one vector of dimension >= 1")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: dimension {x.shape[1]} does not match the index dimension {dim}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{name}: {rows.size} row(s) hold NaN or inf values, first at row {int(rows[0])}")
    return x


def _apply_search_params(index: faiss.Index, factory: str, nprobe: int, ef_search: int) -> None:
    """Set ``nprobe`` on IVF indexes (capped at nlist) and ``efSearch`` on HNSW indexes; no-op otherwise."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(min(nprobe, ivf.nlist))
    if "HNSW" in factory.upper():
        # ParameterSpace walks wrappers (PreTransform, Refine) down to the HNSW index.
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", int(ef_search))


@dataclass
class ProductIndex:
    """A FAISS inner-product index plus the product id of each position.

    Attributes:
        index: the FAISS index (metric inner product).
        product_ids: ``product_ids[i]`` is the product stored at FAISS position ``i``.
        factory: the ``index_factory`` string it was built from.
        nprobe: IVF probes used at search time (ignored by non-IVF indexes).
        ef_search: HNSW search breadth (ignored by non-HNSW indexes).
    """

    index: faiss.Index
    product_ids: list[str]
    factory: str
    nprobe: int = 16
    ef_search: int = 64

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k products by inner product for each query.

        Args:
            query_emb: (Q, D) query embeddings, L2-normalised.
            k: results per query; capped at the number of indexed products.

        Returns:
            ``(scores, product_ids)``: scores is (Q, min(k, ntotal)) float32, best first;
            ``product_ids[q]`` lists the ids in the same order. Approximate indexes may find fewer
            than k results for a query: those slots are dropped from the id list and their scores
            are ``-inf``.

        Raises:
            ValueError: ``k < 1``, or ``query_emb`` is not a finite (Q, D) array with this index's D.
        """
        if k < 1:
            raise ValueError(f"search: k must be >= 1, got {k}")
        query_emb = _as_matrix(query_emb, "query_emb", dim=self.dim)  # (Q, D)
        scores, positions = self.index.search(query_emb, min(k, self.ntotal))  # (Q, k), (Q, k); -1 = no result
        scores = np.where(positions < 0, -np.inf, scores).astype(np.float32)
        ids = [[self.product_ids[p] for p in row if p >= 0] for row in positions]
        return scores, ids

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``index.faiss``, ``ids.parquet`` and ``meta.json`` into ``out_dir`` (created if needed).

        Returns:
            The folder written.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(IndexFolder(out).index))
        pd.DataFrame(
            {
                "position": np.arange(self.ntotal, dtype=np.int64),
                "product_id": pd.Series(self.product_ids, dtype="string"),
            }
        ).to_parquet(IndexFolder(out).ids, index=False)
        meta = {
            "factory": self.factory,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "metric": "inner_product",
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
        }
        IndexFolder(out).meta.write_text(json.dumps(meta, indent=2))
        return out

    @classmethod
    def load(cls, in_dir: str | os.PathLike) -> ProductIndex:
        """Read an index written by :meth:`save` and re-apply its search parameters.

        Raises:
            FileNotFoundError: one of the three files is missing.
            ValueError: the files disagree (dimension, count, or id positions).
        """
        folder = Path(in_dir)
        files = IndexFolder(folder)
        for path in (files.index, files.ids, files.meta):
            if not path.exists():
                raise FileNotFoundError(
                    f"{path} does not exist; expected a folder written by ProductIndex.save"
                )
        meta = json.loads(files.meta.read_text())
        index = faiss.read_index(str(files.index))
        ids = pd.read_parquet(files.ids)
        if not (ids["position"].to_numpy() == np.arange(len(ids))).all():
            raise ValueError(f"{files.ids}: column 'position' is not 0..{len(ids) - 1} in order")
        if index.ntotal != len(ids) or index.ntotal != meta["ntotal"]:
            raise ValueError(
                f"{folder}: index holds {index.ntotal} vectors, {files.ids.name} {len(ids)} ids, "
                f"{files.meta.name} says ntotal={meta['ntotal']}; the folder is inconsistent, rebuild the index"
            )
        if index.d != meta["dim"]:
            raise ValueError(f"{folder}: index dimension {index.d} != {files.meta.name} dim {meta['dim']}")
        loaded = cls(
            index=index,
            product_ids=ids["product_id"].astype(str).tolist(),
            factory=meta["factory"],
            nprobe=int(meta["nprobe"]),
            ef_search=int(meta["ef_search"]),
        )
        _apply_search_params(index, loaded.factory, loaded.nprobe, loaded.ef_search)
        return loaded


def resolve_factory(cfg: IndexConfig, n: int) -> str:
    """The ``index_factory`` string for ``n`` products: ``cfg.factory``, or for ``"auto"`` exact ``Flat`` up to
    ``cfg.flat_max_products`` and ``cfg.ann_factory`` above (exact search costs O(N) per query)."""
    if cfg.factory.strip().lower() != "auto":
        return cfg.factory
    return "Flat" if n <= cfg.flat_max_products else cfg.ann_factory


def build_index(embeddings: np.ndarray, product_ids: Sequence[str], cfg: IndexConfig) -> ProductIndex:
    """Build a FAISS inner-product index over product embeddings held in memory.

    Steps: (1) check the inputs; (2) ``faiss.index_factory(D, resolve_factory(cfg, N), METRIC_INNER_PRODUCT)``;
    (3) train when the index needs training (IVF, PQ), on at most ``cfg.train_sample`` vectors (a seeded
    random sample: k-means cost grows with the training set, not with the catalog); (4) add the
    embeddings in chunks of ``cfg.add_chunk``; (5) set ``nprobe`` / ``efSearch`` where they apply.
    :func:`build_index_from_table` does the same from a partitioned embeddings table, chunk by chunk.

    Args:
        embeddings: (N, D) L2-normalised product embeddings (cast to float32).
        product_ids: N distinct ids; ``product_ids[i]`` belongs to ``embeddings[i]``.
        cfg: ``factory`` (or ``auto`` with ``flat_max_products`` / ``ann_factory``), ``train_sample``,
            ``add_chunk``, ``nprobe`` and ``ef_search``.

    Returns:
        A :class:`ProductIndex`.

    Raises:
        ValueError: empty or non-finite embeddings, an id count that differs from N, duplicate ids,
            an ``IDMap`` factory, an unparsable factory string, or too few vectors to train it.
    """
    embeddings = _as_matrix(embeddings, "embeddings")  # (N, D)
    if cfg.add_chunk < 1:
        raise ValueError(f"index.add_chunk ({cfg.add_chunk}) must be >= 1")
    n = embeddings.shape[0]
    return _build(lambda: (embeddings[s:s + cfg.add_chunk] for s in range(0, n, cfg.add_chunk)), product_ids, embeddings.shape[1], cfg)


def build_index_from_table(path: str | os.PathLike, cfg: IndexConfig, chunk_rows: int) -> ProductIndex:
    """:func:`build_index` over an embeddings table (``product_id``, ``embedding``; a parquet file or a folder of
    parts), read ``chunk_rows`` rows at a time: the ids are read first, the training sample is gathered in one pass
    and the vectors are added in a second, so memory holds the index, the ids and one chunk, never a second
    (N, D) copy. Same sample, same order, same index as :func:`build_index` on the whole matrix."""
    from dashclip_core.storage.partitions import read_column

    product_ids = [str(p) for p in read_column(path, "product_id")]
    dim = next((m.shape[1] for m in _table_chunks(path, chunk_rows) if m.shape[0]), 0)
    return _build(lambda: _table_chunks(path, chunk_rows), product_ids, dim, cfg)


def _table_chunks(path, chunk_rows: int):
    """(n, D) float32 blocks of an embeddings table, checked like :func:`_as_matrix` (the error names the row)."""
    from dashclip_core.storage import partitions

    seen = 0
    for batch in partitions.iter_arrow(path, chunk_rows, columns=["embedding"]):
        matrix = partitions.list_matrix(batch.column(0))
        if matrix.shape[0]:
            try:
                matrix = _as_matrix(matrix, "embeddings")
            except ValueError as exc:
                raise ValueError(f"{path}: rows {seen}..{seen + len(matrix) - 1}: {exc}") from exc
        seen += len(matrix)
        yield matrix


def _build(chunks, product_ids: Sequence[str], d: int, cfg: IndexConfig) -> ProductIndex:
    """The steps of :func:`build_index`; ``chunks()`` yields the (n_i, D) float32 blocks in order, afresh per call."""
    # Step 1
    product_ids = [str(p) for p in product_ids]
    n = len(product_ids)
    if n == 0 or d == 0:
        raise ValueError(f"embeddings: empty ({n} products, dimension {d}); need at least one vector of dimension >= 1")
    if len(set(product_ids)) != n:
        dup = pd.Series(product_ids)[pd.Series(product_ids).duplicated()].iloc[0]
        raise ValueError(f"build_index: product_ids are not unique (e.g. {dup!r}); an index holds each product once")
    factory = resolve_factory(cfg, n)
    if "IDMAP" in factory.upper():
        raise ValueError(
            f"index.factory {factory!r}: IDMap indexes are not supported; product ids are kept beside the index"
        )
    if cfg.add_chunk < 1 or cfg.train_sample < 1:
        raise ValueError(f"index.add_chunk ({cfg.add_chunk}) and index.train_sample ({cfg.train_sample}) must be >= 1")

    # Step 2
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"index.factory {factory!r} is not a valid faiss index_factory string: {exc}") from exc

    # Step 3: the sample is the rows at seeded positions (so the same catalog trains the same index)
    if not index.is_trained:
        rows = np.arange(n) if n <= cfg.train_sample else np.sort(np.random.default_rng(0).choice(n, cfg.train_sample, replace=False))
        sample, start = [], 0
        for block in chunks():
            lo, hi = np.searchsorted(rows, [start, start + len(block)])
            sample.append(block[rows[lo:hi] - start])
            start += len(block)
        sample = np.concatenate(sample)
        try:
            index.train(sample)
        except RuntimeError as exc:
            raise ValueError(
                f"index.factory {factory!r}: training on {len(sample)} vectors failed (too few for the number of "
                f"centroids?); use a smaller factory such as 'Flat' or 'HNSW32': {exc}"
            ) from exc
        del sample

    # Step 4 and 5
    lo_norm, hi_norm = np.inf, -np.inf
    for block in chunks():
        if block.shape[1] != d:
            raise ValueError(f"embeddings: a block of dimension {block.shape[1]}, expected {d}")
        norms = np.linalg.norm(block, axis=1)
        lo_norm, hi_norm = min(lo_norm, float(norms.min())), max(hi_norm, float(norms.max()))
        for start in range(0, len(block), cfg.add_chunk):
            index.add(block[start : start + cfg.add_chunk])
    if index.ntotal != n:
        raise ValueError(f"build_index: {n} product_ids for {index.ntotal} embeddings; they must match one to one")
    if max(abs(lo_norm - 1.0), abs(hi_norm - 1.0)) > NORM_WARN_TOL:
        logger.warning("build_index: embeddings are not unit norm (norms in [%.4f, %.4f]); inner product is not cosine",
                       lo_norm, hi_norm)
    _apply_search_params(index, factory, cfg.nprobe, cfg.ef_search)
    logger.info("built faiss index %r: %d vectors of dimension %d", factory, n, d)
    return ProductIndex(index=index, product_ids=product_ids, factory=factory, nprobe=cfg.nprobe, ef_search=cfg.ef_search)


def recall_at_k_vs_exact(index: ProductIndex, embeddings: np.ndarray, queries: np.ndarray, k: int = 10,
                         block_rows: int = 100_000) -> float:
    """Mean share of the exact top-k that ``index`` also returns in its top-k.

    The exact answer is every inner product (``faiss.knn``, as ``IndexFlatIP``), block by block with the best k
    kept per query, so a ``Flat`` index scores 1.0 and no second index of the vectors is built.

    Args:
        index: the index to measure.
        embeddings: (N, D) the vectors the index was built from, in the same order.
        queries: (Q, D) query vectors.
        k: cut-off; capped at N.
        block_rows: vectors per exact-search block (bounds the (Q, block) score matrix).

    Returns:
        recall@k in [0, 1], averaged over queries.

    Raises:
        ValueError: shapes disagree with the index, or inputs are empty / non-finite.
    """
    embeddings = _as_matrix(embeddings, "embeddings", dim=index.dim)  # (N, D)
    queries = _as_matrix(queries, "queries", dim=index.dim)  # (Q, D)
    if embeddings.shape[0] != index.ntotal:
        raise ValueError(
            f"recall_at_k_vs_exact: {embeddings.shape[0]} embeddings but the index holds {index.ntotal}; "
            "pass the vectors the index was built from"
        )
    return _recall(index, lambda: (embeddings[s:s + block_rows] for s in range(0, len(embeddings), block_rows)), queries, k)


def recall_at_k_vs_exact_table(index: ProductIndex, path: str | os.PathLike, queries: np.ndarray, k: int = 10,
                               chunk_rows: int = 100_000) -> float:
    """:func:`recall_at_k_vs_exact` with the index's vectors read from its embeddings table ``chunk_rows`` at a time
    (the exact top-k is kept per query across blocks: no second copy of the vectors)."""
    queries = _as_matrix(queries, "queries", dim=index.dim)
    return _recall(index, lambda: _table_chunks(path, chunk_rows), queries, k)


def _recall(index: ProductIndex, blocks, queries: np.ndarray, k: int) -> float:
    k = min(k, index.ntotal)
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_pos = np.zeros((len(queries), 0), np.int64)
    start = 0
    for block in blocks():  # exact top-k per block (faiss.knn, as IndexFlatIP), merged keeping the best k so far
        scores, pos = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        scores = np.concatenate([best_scores, scores], axis=1)
        pos = np.concatenate([best_pos, pos.astype(np.int64) + start], axis=1)
        order = np.lexsort((pos, -scores), axis=1)[:, :k]  # ties: the earlier product, as one exact search over all
        best_scores, best_pos = np.take_along_axis(scores, order, 1), np.take_along_axis(pos, order, 1)
        start += len(block)
    if start != index.ntotal:
        raise ValueError(f"recall_at_k_vs_exact: {start} embeddings but the index holds {index.ntotal}; "
                         "pass the vectors the index was built from")
    _, approx_ids = index.search(queries, k)
    hits = [len({index.product_ids[p] for p in truth} & set(found)) / k for truth, found in zip(best_pos, approx_ids)]
    return float(np.mean(hits))
