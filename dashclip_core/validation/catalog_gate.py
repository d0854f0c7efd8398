"""Catalog gate: Great Expectations checks on a catalog snapshot, with a per-row quarantine.

The gate runs one GX suite over the snapshot's ``products`` frame (CONTRACTS.md, "Snapshot"):

1. ``product_id`` is not null, not blank and unique. Every row of a duplicated id is quarantined:
   we cannot tell which copy is right.
2. ``title``, when present, is not empty or whitespace-only. A null title is fine: image-only
   products legitimately have none.
3. ``category`` is not null and not blank.
4. Every non-null ``image_uri`` is allowed and decodes, read through
   :func:`dashclip_core.storage.images.check_image` under the run's :class:`~dashclip_core.storage.images.ImagePolicy`:
   inside an allowed root (the catalog's folder, ``catalog.image_roots``), a regular file of at most
   ``catalog.max_image_bytes``, at most ``catalog.max_image_pixels`` (checked on the header, before
   decoding), decoded in full within ``catalog.image_read_timeout_s``. The check happens in Python and
   its outcome becomes the boolean column ``image_readable`` that GX checks, so the GX result is the
   single source of truth for which rows are bad; the quarantine reason carries the reason code
   (``image_outside_roots``, ``image_not_found``, ``image_not_a_file``, ``image_too_large``,
   ``image_too_many_pixels``, ``image_unreadable``, ``image_timeout``).
5. Every product has a non-empty title or a readable image (column ``has_title_or_image``).

Rows that fail any expectation go to ``quarantine`` with the reasons joined by ``"; "``; the rest
form ``clean``. The gate passes when the bad share is at most
``ValidationConfig.max_bad_product_fraction`` and at least ``ValidationConfig.min_products`` rows
are clean.

The GX runner and the report helpers are shared with the label and embedding gates
(:mod:`dashclip_core.validation.expectations`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations.expectations as gxe
import pandas as pd

from dashclip_core.config import ValidationConfig
from dashclip_core.layout import CatalogGate
from dashclip_core.storage.images import ImagePolicy, ImageRejected, PixelBudget, check_image
from dashclip_core.validation.expectations import (
    BLANK,
    failing_summary,
    run_expectations,
    write_data_docs,
    write_report,
)

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
        validation_results: the GX validation result behind ``summary``; :func:`write_gate_outputs`
            renders it as the gate's Data Docs.
    """

    passed: bool
    clean: pd.DataFrame
    quarantine: pd.DataFrame
    summary: dict[str, Any]
    validation_results: list[Any] = field(default_factory=list)


def image_reason(product_id, uri: str, rejected: ImageRejected) -> str:
    """Quarantine reason of a rejected image, naming the product, the field and the reason code, e.g.
    ``image too large (image_too_large): product 'p1', field image_uri '/c/p1.png': 3 bytes > max 2 bytes``."""
    return f"{str(rejected).split(':', 1)[0]}: product {product_id!r}, field image_uri {uri!r}: {rejected.detail}"


def validate_catalog(
    products: pd.DataFrame,
    cfg: ValidationConfig,
    images: ImagePolicy | None = None,
    max_workers: int = 8,
) -> CatalogGateResult:
    """Validate a catalog snapshot and split it into clean and quarantined rows.

    Args:
        products: the snapshot's products frame (CONTRACTS.md); needs the columns ``product_id``,
            ``title``, ``category`` and ``image_uri`` (other columns are carried into ``clean``).
        cfg: thresholds (``max_bad_product_fraction``, ``min_products``).
        images: which image locations may be read and the byte / pixel / time limits; the DAG passes
            ``ImagePolicy.for_pipeline(cfg)``. Default: any location with the default limits (for
            library use on trusted frames). ``s3://`` URIs are read with boto3.
        max_workers: threads used to read and decode images (reads from S3 are I/O bound); at most
            ``2 * images.max_pixels`` pixels decode at once, whatever the thread count.

    Returns:
        A :class:`CatalogGateResult`.

    Raises:
        ValueError: a required column is missing.
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

    # Step 4: check and decode every image in Python; GX then checks the boolean outcome.
    images = images if images is not None else ImagePolicy()
    budget = PixelBudget(2 * images.max_pixels)  # bounds the gate's decode memory, not only each image's
    image_rows = [i for i, u in enumerate(uris) if u is not None]
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        errors = list(pool.map(lambda i: check_image(str(uris[i]), images, budget), image_rows))
    image_error: dict[int, ImageRejected] = {i: e for i, e in zip(image_rows, errors) if e is not None}
    by_code: dict[str, int] = {}
    for rejected in image_error.values():
        by_code[rejected.reason_code] = by_code.get(rejected.reason_code, 0) + 1
    logger.info("catalog gate: checked %d images, %d rejected %s", len(image_rows), len(image_error), by_code or "")

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
        "image_readable": lambda i: (
            image_reason(ids[i], uris[i], image_error[i]) if i in image_error
            else f"image unreadable: product {ids[i]!r}, field image_uri {uris[i]!r}"
        ),
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
        "n_images_rejected_by_reason": dict(sorted(by_code.items())),
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
    return CatalogGateResult(passed=passed, clean=clean, quarantine=quarantine, summary=summary,
                             validation_results=[outcomes.validation_result])


def write_gate_outputs(result: CatalogGateResult, out_dir: str | os.PathLike) -> Path:
    """Write ``clean.parquet``, ``quarantine.parquet`` (always, possibly empty), ``report.json`` and ``data_docs/``.

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
    write_data_docs(result.validation_results, out)  # data_docs/: GX's own pages of this validation
    return write_report(result.passed, result.summary, out)
