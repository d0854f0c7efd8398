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
    """Read the three tables; missing required columns raise naming the table and column."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    try:
        try:
            conn = engine.connect()
        except sa.exc.OperationalError as err:  # name the DB, never its password (the URL leaves the process in errors)
            raise ConnectionError(f"catalog DB {redact_url(db_url)} is unreachable: {redact_text(str(err.orig))}") from err
        with conn:
            tables = {}
            for table, cols in (("products", PRODUCT_COLUMNS), ("search_log", LOG_COLUMNS), ("human_labels", LABEL_COLUMNS)):
                df = pd.read_sql(sa.text(f"SELECT * FROM {table}"), conn)
                missing = [c for c in cols if c not in df.columns]
                if missing:
                    raise ValueError(f"{redact_url(db_url)}: table '{table}' lacks column(s) {missing}; expected {cols}")
                tables[table] = df[cols]
    finally:
        engine.dispose()
    return tables["products"], tables["search_log"], tables["human_labels"]


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


def sample_products(products: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A deterministic sample: the ``n`` products with the smallest hash(seed, product_id); stable as the catalog grows."""
    if n <= 0 or n >= len(products):
        return products
    key = products["product_id"].astype(str).map(lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    return products.loc[key.sort_values().index[:n]].sort_index()


def extract_snapshot(cfg: PipelineConfig, db_url: str, out_dir: Path) -> dict:
    """Write the snapshot's products, search log and human labels (:class:`~dashclip_core.layout.Snapshot`) into
    ``out_dir``; return counts."""
    from dashclip_core.layout import Snapshot

    products, log, labels = read_catalog(db_url)
    products = resolve_image_uris(products, _db_folder(db_url))
    every_id = set(products["product_id"])
    products = sample_products(products, cfg.catalog.sample_size, cfg.catalog.seed)
    ids = set(products["product_id"])
    log = log[log["product_id"].isin(ids)]
    # Human labels leave only with the products the sample left out: a label naming no product at all (a blank or
    # unknown id) stays, so the human label gate quarantines it with its row and field instead of it vanishing here.
    labels = labels[~labels["product_id"].isin(every_id - ids)]
    snapshot = Snapshot(out_dir)
    products.to_parquet(snapshot.products, index=False)
    log.to_parquet(snapshot.search_log, index=False)
    labels.to_parquet(snapshot.human_labels, index=False)
    return {
        "n_products": len(products),
        "n_with_image": int(products["image_uri"].notna().sum()),
        "n_with_title": int(products["title"].notna().sum()),
        "n_search_log": len(log),
        "n_human_labels": len(labels),
        "n_eval_queries": int(labels.loc[labels["split"] == "eval", "query"].nunique()),
    }
