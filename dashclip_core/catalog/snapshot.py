"""Catalog extraction: SQL (through SQLAlchemy) -> a parquet snapshot of products, search log and human labels.

The snapshot is the named input of every later step (never "the latest catalog"): image URIs are
made absolute (relative ones against the database's folder), and an optional deterministic sample
keeps the run small. Nothing is opened here: the catalog gate reads every image under the run's
:class:`~dashclip_core.storage.images.ImagePolicy` and quarantines the ones outside its roots.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pandas as pd

from dashclip_core.config import PipelineConfig
from dashclip_core.redaction import redact_text, redact_url

logger = logging.getLogger(__name__)

PRODUCT_COLUMNS = ["product_id", "title", "description", "brand", "category", "aisle", "image_uri", "updated_at"]
LOG_COLUMNS = ["query", "product_id", "impressions", "clicks", "purchases"]
LABEL_COLUMNS = ["query", "product_id", "label", "annotator", "split"]


def ensure_source_catalog(cfg: PipelineConfig) -> str:
    """Create the embedded catalog DB when the config asks for one; return the SQLAlchemy URL to read."""
    if cfg.catalog.source == "demo" and not cfg.catalog.db_url:
        from dashclip_core.catalog.demo import generate_demo_catalog

        generate_demo_catalog(
            cfg.catalog_dir(), num_products=cfg.catalog.demo_num_products,
            image_only_fraction=cfg.catalog.demo_image_only_fraction,
            text_only_fraction=cfg.catalog.demo_text_only_fraction, seed=cfg.catalog.seed,
        )
    elif cfg.catalog.source == "grocery" and not cfg.catalog.db_url:
        from dashclip_core.catalog.grocery import import_grocery

        root = cfg.grocery_root()
        if not (root / "dataset" / "classes.csv").exists():
            raise FileNotFoundError(
                f"catalog.grocery_root={root}: no dataset/classes.csv there; point it (or $DASHCLIP_GROCERY_ROOT) "
                f"at a GroceryStoreDataset checkout"
            )
        import_grocery(root, cfg.catalog_dir(), products_per_class=cfg.catalog.grocery_products_per_class, seed=cfg.catalog.seed)
    elif cfg.catalog.source not in ("demo", "grocery", "sql"):
        raise ValueError(f"catalog.source {cfg.catalog.source!r} is unknown; use demo, grocery or sql")
    return cfg.catalog_db_url()


def _db_folder(db_url: str) -> Path | None:
    """Folder of a SQLite database file (relative image URIs resolve against it)."""
    from dashclip_core.storage.images import sqlite_folder

    return sqlite_folder(db_url)


def read_catalog(db_url: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Read the three tables whole (small catalogs, tools); missing required columns raise naming the table and column."""
    tables = {table: pd.concat(list(iter_table(db_url, table, 1_000_000)), ignore_index=True) for table in TABLES}
    return tables["products"], tables["search_log"], tables["human_labels"]


TABLES = {"products": PRODUCT_COLUMNS, "search_log": LOG_COLUMNS, "human_labels": LABEL_COLUMNS}


def iter_table(db_url: str, table: str, chunk_rows: int, columns: list[str] | None = None):
    """A catalog table's rows as frames of at most ``chunk_rows`` rows, fetched through a server-side cursor
    (``stream_results``: PostgreSQL and MySQL send rows as they are read instead of the whole result), so a
    table of any size passes through a bounded buffer. Always yields at least one (possibly empty) frame with
    the contract's columns. Missing required columns raise naming the table and column."""
    import sqlalchemy as sa

    wanted = TABLES[table]
    engine = sa.create_engine(db_url)
    try:
        try:
            conn = engine.connect()
        except sa.exc.OperationalError as err:  # name the DB, never its password (the URL leaves the process in errors)
            raise ConnectionError(f"catalog DB {redact_url(db_url)} is unreachable: {redact_text(str(err.orig))}") from err
        with conn:
            streaming = conn.execution_options(stream_results=True, max_row_buffer=chunk_rows)
            yielded = False
            for chunk in pd.read_sql(sa.text(f"SELECT * FROM {table}"), streaming, chunksize=chunk_rows):
                missing = [c for c in wanted if c not in chunk.columns]
                if missing:
                    raise ValueError(f"{redact_url(db_url)}: table '{table}' lacks column(s) {missing}; expected {wanted}")
                yielded = True
                yield chunk[columns or wanted].reset_index(drop=True)
            if not yielded:  # an empty table: still check its columns
                head = pd.read_sql(sa.text(f"SELECT * FROM {table} LIMIT 0"), conn)
                missing = [c for c in wanted if c not in head.columns]
                if missing:
                    raise ValueError(f"{redact_url(db_url)}: table '{table}' lacks column(s) {missing}; expected {wanted}")
                yield head[columns or wanted]
    finally:
        engine.dispose()


def resolve_image_uris(products: pd.DataFrame, base: Path | None) -> pd.DataFrame:
    """``image_uri`` made absolute: relative paths join the catalog's folder ``base``; blanks become null.

    Symlinks are not followed and a ``..`` that leaves ``base`` is kept as written (``<base>/../../x.png``),
    so the gate's quarantine reason shows the URI the catalog gave and what it resolves to. A relative
    URI without a ``base`` (a non-SQLite catalog) stays relative, and the gate refuses it rather than
    resolve it against whatever folder a worker runs in.
    """
    def resolve(uri):
        if not isinstance(uri, str) or not uri.strip():
            return None
        uri = uri.strip()
        if uri.startswith(("s3://", "file://", "/")) or "://" in uri or base is None:
            return uri
        joined = os.path.join(str(base), uri)
        tidy = os.path.normpath(joined)
        return tidy if tidy.startswith(str(base).rstrip(os.sep) + os.sep) else joined

    return products.assign(image_uri=products["image_uri"].map(resolve))


def sample_key(seed: int, product_id) -> str:
    return hashlib.sha256(f"{seed}:{product_id}".encode()).hexdigest()


def sample_products(products: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A deterministic sample: the ``n`` products with the smallest hash(seed, product_id); stable as the catalog grows."""
    if n <= 0 or n >= len(products):
        return products
    key = products["product_id"].astype(str).map(lambda p: sample_key(seed, p))
    return products.loc[key.sort_values().index[:n]].sort_index()


def sampled_ids(db_url: str, n: int, seed: int, chunk_rows: int) -> tuple[set[str], set[str]]:
    """(ids kept, every id) of :func:`sample_products` over the whole table, reading only ``product_id`` in chunks
    and keeping the ``n`` smallest keys in a heap (memory: the ids, never the rows)."""
    import heapq

    heap: list[tuple[str, str]] = []  # (inverted key, id): heap[0] holds the largest key kept so far
    every: set[str] = set()
    for chunk in iter_table(db_url, "products", chunk_rows, columns=["product_id"]):
        for pid in chunk["product_id"].astype(str):
            every.add(pid)
            item = (_invert(sample_key(seed, pid)), pid)
            if len(heap) < n:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    return {pid for _, pid in heap}, every


def _invert(hex_key: str) -> str:
    """A hex string that sorts in the opposite order (so ``heapq``'s min-heap keeps the smallest keys)."""
    return hex_key.translate(str.maketrans("0123456789abcdef", "fedcba9876543210"))


def extract_snapshot(cfg: PipelineConfig, db_url: str, out_dir: Path) -> dict:
    """Write the snapshot's products, search log and human labels (:class:`~dashclip_core.layout.Snapshot`) into
    ``out_dir`` as partitioned parquet (``catalog.chunk_rows`` rows per part, streamed from SQL); return counts.

    Memory is bounded by one chunk plus the set of product ids (the search log and the human labels are
    filtered by id while they stream)."""
    from dashclip_core.layout import Snapshot
    from dashclip_core.storage.partitions import PartWriter

    chunk = cfg.catalog.chunk_rows
    base = _db_folder(db_url)
    snapshot = Snapshot(out_dir)
    sample = cfg.catalog.sample_size
    keep = every_id = None
    if sample > 0:
        keep, every_id = sampled_ids(db_url, sample, cfg.catalog.seed, chunk)
        if len(keep) >= len(every_id):
            keep = None  # the sample is the whole catalog
    ids: set = set()
    counts = {"n_products": 0, "n_with_image": 0, "n_with_title": 0}
    with PartWriter(snapshot.products, pd.DataFrame(columns=PRODUCT_COLUMNS)) as writer:
        for products in iter_table(db_url, "products", chunk):
            if keep is not None:
                products = products[products["product_id"].astype(str).isin(keep)]
            products = resolve_image_uris(products, base)
            ids.update(products["product_id"].tolist())
            counts["n_products"] += len(products)
            counts["n_with_image"] += int(products["image_uri"].notna().sum())
            counts["n_with_title"] += int(products["title"].notna().sum())
            writer.write(products)
    n_log = 0
    with PartWriter(snapshot.search_log, pd.DataFrame(columns=LOG_COLUMNS)) as writer:
        for log in iter_table(db_url, "search_log", chunk):
            log = log[log["product_id"].isin(ids)]
            n_log += len(log)
            writer.write(log)
    # Human labels leave only with the products the sample left out: a label naming no product at all (a blank or
    # unknown id) stays, so the human label gate quarantines it with its row and field instead of it vanishing here.
    left_out = (every_id - {str(i) for i in ids}) if every_id is not None else set()
    n_labels = 0
    eval_queries: set = set()
    with PartWriter(snapshot.human_labels, pd.DataFrame(columns=LABEL_COLUMNS)) as writer:
        for labels in iter_table(db_url, "human_labels", chunk):
            labels = labels[~labels["product_id"].astype(str).isin(left_out)] if left_out else labels
            n_labels += len(labels)
            eval_queries.update(labels.loc[labels["split"] == "eval", "query"].tolist())
            writer.write(labels)
    return {**counts, "n_search_log": n_log, "n_human_labels": n_labels, "n_eval_queries": len(eval_queries),
            "chunk_rows": chunk}
