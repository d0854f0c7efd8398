"""The catalog database: table definitions (SQLAlchemy Core) and the helpers that write one.

The schema is the one in ``CONTRACTS.md``; both the demo generator (:mod:`dashclip_core.catalog.demo`) and the
GroceryStoreDataset importer (:mod:`dashclip_core.catalog.grocery`) write it, and ``extract_catalog`` reads it.
A generated catalog is a folder holding ``catalog.db`` (and, for the demo, ``images/``); it is built in a temporary
sibling folder and renamed into place, so a reader never sees a half-written catalog, and a ``meta`` table records
the generator and its parameters so that an identical request reuses the folder instead of rebuilding it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Column,
    Engine,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    create_engine,
    inspect,
    select,
)
from sqlalchemy.exc import DatabaseError

logger = logging.getLogger(__name__)


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process and Python version (unlike ``hash``): the
    generated catalogs' splits and picks depend on it, so they never change between runs."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")

DB_FILENAME = "catalog.db"

metadata = MetaData()

products = Table(
    "products",
    metadata,
    Column("product_id", Text, primary_key=True),
    Column("title", Text, nullable=True),  # NULL for image-only products
    Column("description", Text, nullable=True),
    Column("brand", Text, nullable=True),
    Column("category", Text, nullable=False),  # fine product type, e.g. "granola bar" / "Golden Delicious"
    Column("aisle", Text, nullable=False),  # coarse group, e.g. "snacks" / "Apple"
    Column("image_uri", Text, nullable=True),  # relative to the DB's folder, absolute, or s3://...; NULL = text-only
    Column("updated_at", Text, nullable=False),  # ISO-8601
)

search_log = Table(
    "search_log",
    metadata,
    Column("query", Text, nullable=False),
    Column("product_id", Text, nullable=False),
    Column("impressions", Integer, nullable=False),
    Column("clicks", Integer, nullable=False),
    Column("purchases", Integer, nullable=False),
    CheckConstraint("clicks <= impressions AND purchases <= clicks", name="ck_search_log_funnel"),
    Index("ix_search_log_query", "query"),
)

human_labels = Table(
    "human_labels",
    metadata,
    Column("query", Text, nullable=False),
    Column("product_id", Text, nullable=False),
    Column("label", Integer, nullable=False),  # 0 irrelevant, 1 moderately, 2 highly relevant
    Column("annotator", Text, nullable=False),
    Column("split", Text, nullable=False),  # 'train' (teacher/training) or 'eval' (held-out queries, judged densely)
    CheckConstraint("label IN (0, 1, 2)", name="ck_human_labels_label"),
    CheckConstraint("split IN ('train', 'eval')", name="ck_human_labels_split"),
    Index("ix_human_labels_query", "query"),
)

meta = Table(
    "meta",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
)


def create_schema(engine: Engine) -> None:
    """Create every catalog table (``products``, ``search_log``, ``human_labels``, ``meta``) that is missing.

    Args:
        engine: SQLAlchemy engine of the catalog database.
    """
    metadata.create_all(engine)


def sqlite_url(db_path: Path) -> str:
    """SQLAlchemy URL of a SQLite file."""
    return f"sqlite:///{Path(db_path).resolve()}"


def write_catalog_db(
    db_path: Path,
    product_rows: Iterable[Mapping[str, Any]],
    search_log_rows: Iterable[Mapping[str, Any]],
    label_rows: Iterable[Mapping[str, Any]],
    meta_items: Mapping[str, str],
) -> None:
    """Create a fresh SQLite catalog at ``db_path`` and fill it in one transaction.

    Args:
        db_path: file to create; it must not exist yet.
        product_rows: dicts with the ``products`` columns.
        search_log_rows: dicts with the ``search_log`` columns (may be empty).
        label_rows: dicts with the ``human_labels`` columns.
        meta_items: key/value strings for the ``meta`` table.

    Raises:
        FileExistsError: ``db_path`` exists (catalogs are built in a fresh folder, never patched).
    """
    db_path = Path(db_path)
    if db_path.exists():
        raise FileExistsError(f"{db_path}: catalog DB already exists; build catalogs into a fresh folder")
    engine = create_engine(sqlite_url(db_path))
    try:
        create_schema(engine)
        with engine.begin() as conn:
            for table, rows in (
                (products, list(product_rows)),
                (search_log, list(search_log_rows)),
                (human_labels, list(label_rows)),
                (meta, [{"key": k, "value": v} for k, v in meta_items.items()]),
            ):
                if rows:  # an empty executemany would be read as a single-row insert of defaults
                    conn.execute(table.insert(), rows)
    finally:
        engine.dispose()


def read_meta(db_path: Path) -> dict[str, str] | None:
    """Return the ``meta`` table of a catalog DB, or None when the file or the table is missing or unreadable."""
    db_path = Path(db_path)
    if not db_path.is_file():
        return None
    engine = create_engine(sqlite_url(db_path))
    try:
        if not inspect(engine).has_table("meta"):
            return None
        with engine.connect() as conn:
            return {row.key: row.value for row in conn.execute(select(meta.c.key, meta.c.value))}
    except DatabaseError as exc:  # a truncated or foreign file: treat as absent so that it gets rebuilt
        logger.warning("%s: cannot read the meta table (%s); the catalog will be rebuilt", db_path, exc)
        return None
    finally:
        engine.dispose()


def build_catalog_dir(out_dir: Path, meta_items: Mapping[str, str], build: Callable[[Path], None]) -> Path:
    """Build a catalog folder atomically, or reuse it when its ``meta`` table already matches.

    Steps:
        1. If ``out_dir/catalog.db`` has a ``meta`` table equal to ``meta_items``, return it untouched.
        2. Otherwise call ``build(tmp_dir)`` on a fresh temporary folder beside ``out_dir`` (same file system, so
           the rename below is atomic); ``build`` must write ``tmp_dir/catalog.db`` including ``meta_items``.
        3. Swap the temporary folder in for ``out_dir`` and delete the previous content.

    Args:
        out_dir: final catalog folder; anything already in it is replaced when the catalog is rebuilt.
        meta_items: the generator version and parameters that identify this catalog.
        build: writes the catalog into the folder it is given.

    Returns:
        Path of ``out_dir/catalog.db``.

    Raises:
        RuntimeError: ``build`` did not write a DB whose ``meta`` matches ``meta_items``.
    """
    out_dir = Path(out_dir)
    db_path = out_dir / DB_FILENAME
    wanted = dict(meta_items)
    # 1.
    if read_meta(db_path) == wanted:
        logger.info("catalog %s is up to date; reusing it", db_path)
        return db_path
    # 2.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{token}"
    old_dir = out_dir.parent / f".{out_dir.name}.old-{token}"
    tmp_dir.mkdir()
    try:
        build(tmp_dir)
        if read_meta(tmp_dir / DB_FILENAME) != wanted:
            raise RuntimeError(f"{tmp_dir / DB_FILENAME}: the builder did not record the expected meta table")
        # 3.
        if out_dir.exists():
            out_dir.rename(old_dir)
        try:
            tmp_dir.rename(out_dir)
        except OSError:
            # Another process published the same folder between our two renames; use theirs if it matches.
            if read_meta(db_path) == wanted:
                return db_path
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        shutil.rmtree(old_dir, ignore_errors=True)
    logger.info("wrote catalog %s", db_path)
    return db_path
