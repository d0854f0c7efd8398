"""Fixtures shared by the labeling tests."""

from __future__ import annotations

import pandas as pd
import pytest


@pytest.fixture
def three_products() -> pd.DataFrame:
    """Three products with every kind of gap a prompt must handle: no title (p3), no description (p2)."""
    return pd.DataFrame({
        "product_id": ["p1", "p2", "p3"],
        "title": ["Oat Milk", "Gala Apples", None],
        "description": ["Creamy oat drink", None, "Lemon dish soap"],
        "category": ["Milk", "Apple", "Cleaning"],
        "aisle": ["Dairy", "Fruit", "Household"],
    })
