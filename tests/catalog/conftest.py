"""Fixtures shared by the catalog tests: one default-size demo catalog per session (it takes a few seconds)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from dashclip_core.catalog.demo import generate_demo_catalog

TableReader = Callable[[Path, str], list[dict]]


def _read_table(db_path: Path, table: str) -> list[dict]:
    conn = sqlite3.connect(db_path)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(row) for row in conn.execute(f"SELECT * FROM {table} ORDER BY rowid")]
    finally:
        conn.close()


@pytest.fixture(scope="session")
def read_table() -> TableReader:
    """``read_table(db_path, table)`` -> all rows of the table as dicts, in insertion order."""
    return _read_table


@pytest.fixture(scope="session")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo catalog with default parameters (480 products, 128 px images)."""
    return generate_demo_catalog(tmp_path_factory.mktemp("demo") / "catalog")
