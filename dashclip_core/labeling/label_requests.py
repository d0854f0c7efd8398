"""(query, product_id) rows of a table -> the :class:`~dashclip_core.labeling.base.LabelRequest` a labeler grades."""

from __future__ import annotations

from collections.abc import Iterator

import pandas as pd

from dashclip_core.labeling.base import PRODUCT_FIELDS, LabelRequest


def requests_for(pairs: pd.DataFrame, products: pd.DataFrame) -> Iterator[LabelRequest]:
    """One :class:`LabelRequest` per (query, product_id) row, with the product fields a prompt shows.

    Args:
        pairs: columns query, product_id.
        products: one row per product_id with (some of) the fields of ``PRODUCT_FIELDS``; a blank or
            missing field is sent as None.

    Raises:
        ValueError: a pair names a product_id that is not in ``products``.
    """
    fields = {r["product_id"]: r for r in products.to_dict("records")}
    for i, (query, pid) in enumerate(zip(pairs["query"].tolist(), pairs["product_id"].tolist())):
        product = fields.get(pid)
        if product is None:
            raise ValueError(f"pair row {i}: product_id {pid!r} (query {query!r}) is not in the products table")
        yield LabelRequest(query=str(query), product_id=str(pid), **{f: _text_or_none(product.get(f)) for f in PRODUCT_FIELDS})


def _text_or_none(value) -> str | None:
    return value if isinstance(value, str) and value.strip() else None
