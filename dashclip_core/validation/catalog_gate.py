"""Catalog gate: Great Expectations checks on a catalog snapshot, with a per-row quarantine.

The gate runs one GX suite over the snapshot's ``products`` frame (CONTRACTS.md, "Snapshot"):

1. ``product_id`` is not null, not blank and unique. Every row of a duplicated id is quarantined:
   we cannot tell which copy is right.
2. ``title``, when present, is not empty or whitespace-only. A null title is fine: image-only
   products legitimately have none.
3. ``category`` is not null and not blank.
4. Every non-null ``image_uri`` decodes (PIL ``open`` + ``load``). The decode happens in Python and
   its outcome becomes the boolean column ``image_readable`` that GX checks, so the GX result is the
   single source of truth for which rows are bad.
5. Every product has a non-empty title or a readable image (column ``has_title_or_image``).

Rows that fail any expectation go to ``quarantine`` with the reasons joined by ``"; "``; the rest
form ``clean``. The gate passes when the bad share is at most
``ValidationConfig.max_bad_product_fraction`` and at least ``ValidationConfig.min_products`` rows
are clean.

The GX runner and the report helpers are shared with the label and embedding gates
(:mod:`dashclip_core.validation.expectations`).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import great_expectations.expectations as gxe
import pandas as pd

from dashclip_core.config import ValidationConfig
from dashclip_core.layout import CatalogGate
from dashclip_core.validation.expectations import BLANK, failing_summary, run_expectations, write_report

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("product_id", "title", "category", "image_uri")
QUARANTINE_COLUMNS = ("product_id", "row", "reason")


@dataclass
class CatalogGateResult:
    """Outcome of :func:`validate_catalog`.

    Attributes:
        passed: bad share <= ``max_bad_product_fraction`` and ``len(clean) >= min_products``.
        clean: input rows that passed every expectation (all columns kept, index reset).
        quarantine: one row per bad input row: ``product_id``, ``row`` (0-based position in the
            input), ``reason`` (every problem found, joined by ``"; "``).
        summary: JSON-serialisable figures: ``n_rows``, ``n_bad``, ``n_clean``, ``bad_fraction``, the
            thresholds, and ``failing_expectations`` (check, column, count, sample of bad ids).
    """

    passed: bool
    clean: pd.DataFrame
    quarantine: pd.DataFrame
    summary: dict[str, Any]


def read_local_bytes(uri: str) -> bytes:
    """Default image reader: the bytes of a local file (``file://`` prefix allowed)."""
    uri = uri.removeprefix("file://")
    return Path(uri).read_bytes()


def check_image(uri: str, read_bytes: Callable[[str], bytes] = read_local_bytes) -> str | None:
    """Decode one image fully.

    Args:
        uri: local path or any URI ``read_bytes`` understands.
        read_bytes: returns the raw bytes of ``uri``.

    Returns:
        None when the image decodes, else ``"<ExceptionType>: <message>"``.
    """
    from PIL import Image, UnidentifiedImageError  # pillow is only needed when a catalog is validated

    try:
        with Image.open(io.BytesIO(read_bytes(uri))) as img:
            img.load()  # open() only reads the header; load() decodes the pixels and finds truncation
    except UnidentifiedImageError:
        # PIL's own message names the in-memory buffer, not the file; the caller adds the URI.
        return "UnidentifiedImageError: not a recognised image format"
    except Exception as exc:  # noqa: BLE001 - any failure to read or decode makes the image unusable
        return f"{type(exc).__name__}: {exc}"
    return None


def validate_catalog(
    products: pd.DataFrame,
    cfg: ValidationConfig,
    read_bytes: Callable[[str], bytes] | None = None,
    max_workers: int = 8,
) -> CatalogGateResult:
    """Validate a catalog snapshot and split it into clean and quarantined rows.

    Args:
        products: the snapshot's products frame (CONTRACTS.md); needs the columns ``product_id``,
            ``title``, ``category`` and ``image_uri`` (other columns are carried into ``clean``).
        cfg: thresholds (``max_bad_product_fraction``, ``min_products``).
        read_bytes: reads the bytes of an image URI. Default: local files only; pass one (e.g. from
            ``dashclip_core.storage``) when ``image_uri`` holds ``s3://`` URIs.
        max_workers: threads used to read and decode images (reads from S3 are I/O bound).

    Returns:
        A :class:`CatalogGateResult`.

    Raises:
        ValueError: a required column is missing, or an ``s3://`` image URI is found without a
            ``read_bytes`` callable.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in products.columns]
    if missing:
        raise ValueError(
            f"products frame: missing column(s) {missing}; found {list(products.columns)}; "
            f"expected at least {list(REQUIRED_COLUMNS)} (CONTRACTS.md, products.parquet)"
        )
    products = products.reset_index(drop=True)
    n_rows = len(products)
    uris = products["image_uri"].astype(object).where(products["image_uri"].notna(), None).tolist()

    # Step 4: decode every image in Python; GX then checks the boolean outcome.
    if read_bytes is None:
        s3_rows = [i for i, u in enumerate(uris) if isinstance(u, str) and u.startswith("s3://")]
        if s3_rows:
            i = s3_rows[0]
            raise ValueError(
                f"products row {i}: field 'image_uri' is {uris[i]!r}, an S3 URI ({len(s3_rows)} such rows), "
                "but no read_bytes was given; pass read_bytes that can read s3:// URIs"
            )
        read_bytes = read_local_bytes
    image_rows = [i for i, u in enumerate(uris) if u is not None]
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        errors = list(pool.map(lambda i: check_image(str(uris[i]), read_bytes), image_rows))
    image_error: dict[int, str] = {i: e for i, e in zip(image_rows, errors) if e is not None}
    logger.info("catalog gate: decoded %d images, %d unreadable", len(image_rows), len(image_error))

    titles = products["title"].astype(object).where(products["title"].notna(), None)
    has_title = titles.map(lambda t: isinstance(t, str) and t.strip() != "")
    image_readable = pd.Series([None if uris[i] is None else i not in image_error for i in range(n_rows)], dtype=object)
    frame = pd.DataFrame(
        {
            "product_id": products["product_id"],
            "title": titles,
            "category": products["category"],
            "image_readable": image_readable,
            "has_title_or_image": has_title | image_readable.map(lambda r: r is True),
        }
    )

    outcomes = run_expectations(
        frame,
        [
            gxe.ExpectColumnValuesToNotBeNull(column="product_id", meta={"check": "product_id_not_null"}),
            gxe.ExpectColumnValuesToNotMatchRegex(
                column="product_id", regex=BLANK, meta={"check": "product_id_not_blank"}
            ),
            gxe.ExpectColumnValuesToBeUnique(column="product_id", meta={"check": "product_id_unique"}),
            gxe.ExpectColumnValuesToNotMatchRegex(column="title", regex=BLANK, meta={"check": "title_not_blank"}),
            gxe.ExpectColumnValuesToNotBeNull(column="category", meta={"check": "category_not_null"}),
            gxe.ExpectColumnValuesToNotMatchRegex(column="category", regex=BLANK, meta={"check": "category_not_blank"}),
            gxe.ExpectColumnValuesToBeInSet(
                column="image_readable", value_set=[True], meta={"check": "image_readable"}
            ),
            gxe.ExpectColumnValuesToBeInSet(
                column="has_title_or_image", value_set=[True], meta={"check": "has_title_or_image"}
            ),
        ],
        suite_name="catalog_gate",
    )

    # Reasons come from the GX outcomes only; the Python-side detail just makes them readable.
    ids = products["product_id"].astype(object).where(products["product_id"].notna(), None).tolist()
    reason_for: dict[str, Callable[[int], str]] = {
        "product_id_not_null": lambda i: "product_id is missing",
        "product_id_not_blank": lambda i: "product_id is empty",
        "product_id_unique": lambda i: f"duplicate product_id {ids[i]!r}",
        "title_not_blank": lambda i: "title is empty",
        "category_not_null": lambda i: "category is missing",
        "category_not_blank": lambda i: "category is empty",
        "image_readable": lambda i: f"image unreadable: {uris[i]}: {image_error.get(i, 'unknown error')}",
        "has_title_or_image": lambda i: (
            "no title and no image" if uris[i] is None else "no title and no readable image"
        ),
    }
    reasons: dict[int, list[str]] = {}
    for check, outcome in outcomes.items():
        for i in outcome.unexpected_rows:
            reasons.setdefault(i, []).append(reason_for[check](i))

    bad_rows = sorted(reasons)
    quarantine = pd.DataFrame(
        {
            "product_id": pd.Series([ids[i] for i in bad_rows], dtype=object),
            "row": pd.Series(bad_rows, dtype="int64"),
            "reason": pd.Series(["; ".join(reasons[i]) for i in bad_rows], dtype=object),
        },
        columns=list(QUARANTINE_COLUMNS),
    )
    clean = products.drop(index=bad_rows).reset_index(drop=True)

    n_bad = len(bad_rows)
    bad_fraction = n_bad / n_rows if n_rows else 0.0
    passed = bad_fraction <= cfg.max_bad_product_fraction and len(clean) >= cfg.min_products
    summary = {
        "n_rows": n_rows,
        "n_bad": n_bad,
        "n_clean": len(clean),
        "bad_fraction": bad_fraction,
        "max_bad_product_fraction": cfg.max_bad_product_fraction,
        "min_products": cfg.min_products,
        "n_images_checked": len(image_rows),
        "n_images_unreadable": len(image_error),
        "failing_expectations": failing_summary(outcomes, ids),
    }
    if passed:
        logger.info("catalog gate passed: %d rows, %d quarantined", n_rows, n_bad)
    else:
        logger.warning(
            "catalog gate failed: %d of %d rows bad (max fraction %s), %d clean (min %d); failing checks: %s",
            n_bad,
            n_rows,
            cfg.max_bad_product_fraction,
            len(clean),
            cfg.min_products,
            [f["check"] for f in summary["failing_expectations"]],
        )
    return CatalogGateResult(passed=passed, clean=clean, quarantine=quarantine, summary=summary)


def write_gate_outputs(result: CatalogGateResult, out_dir: str | os.PathLike) -> Path:
    """Write ``clean.parquet``, ``quarantine.parquet`` (always, possibly empty) and ``report.json``.

    Args:
        result: output of :func:`validate_catalog`.
        out_dir: folder to write into (created if needed).

    Returns:
        The path of ``report.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = CatalogGate(out)
    result.clean.to_parquet(files.clean, index=False)
    quarantine = result.quarantine.reindex(columns=list(QUARANTINE_COLUMNS))
    quarantine = quarantine.astype({"product_id": "string", "row": "int64", "reason": "string"})
    quarantine.to_parquet(files.quarantine, index=False)
    return write_report(result.passed, result.summary, out)
