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
    SAMPLE_SIZE,
    failing_summary,
    run_expectations,
    to_jsonable,
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
    duplicate_ids: set | None = None,
    row_offset: int = 0,
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
        duplicate_ids: the ids that occur more than once in the *whole* snapshot, when ``products`` is one
            partition of it (:func:`validate_catalog_parts`); default: the duplicates within ``products``.
        row_offset: position of ``products``' first row in the snapshot (the quarantine's ``row``).

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
    present = products.loc[products["product_id"].notna(), "product_id"]
    if duplicate_ids is None:
        counts = present.value_counts()
        duplicate_ids = set(counts.index[counts > 1])
    # Uniqueness is a property of the whole snapshot: this batch's rows whose id is duplicated anywhere fail.
    duplicated_here = sorted({to_jsonable(v) for v in present[present.isin(duplicate_ids)]}, key=str)
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
            gxe.ExpectColumnValuesToNotBeInSet(column="product_id", value_set=duplicated_here, meta={"check": "product_id_unique"},
                                               description="product_id_unique: product_id occurs once in the snapshot "
                                                           "(not among the ids it holds more than once)"),
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
            "row": pd.Series([row_offset + i for i in bad_rows], dtype="int64"),
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


MAX_DATA_DOCS_PARTITIONS = 20  # validation pages kept in Data Docs: every failing partition first, then passing ones, up to this many


@dataclass
class PartitionedGateResult:
    """Outcome of :func:`validate_catalog_parts`: the combined verdict and figures of every partition's GX run;
    the clean and quarantined rows are already written (partitioned) to the gate's folder.

    Attributes:
        passed, summary: as :class:`CatalogGateResult`, over the whole snapshot (counts summed, failing
            expectations merged: counts summed, sample ids of the first partitions that failed).
        clean_ids: ``product_id`` of every clean row (ids only: the human label gate joins on them).
        all_ids: ``product_id`` of every snapshot row.
        validation_results: the GX results rendered as Data Docs (at most :data:`MAX_DATA_DOCS_PARTITIONS`).
    """

    passed: bool
    summary: dict[str, Any]
    clean_ids: pd.Series
    all_ids: pd.Series
    n_partitions: int
    validation_results: list[Any] = field(default_factory=list)

    @property
    def n_clean(self) -> int:
        return self.summary["n_clean"]

    @property
    def n_quarantined(self) -> int:
        return self.summary["n_bad"]


def validate_catalog_parts(products_path: str | os.PathLike, cfg: ValidationConfig, out_dir: str | os.PathLike,
                           chunk_rows: int, images: ImagePolicy | None = None,
                           on_partition: Callable[[int, int], None] | None = None) -> PartitionedGateResult:
    """The catalog gate over a partitioned snapshot, one bounded batch at a time.

    Reads ``products_path`` (a folder of parts or one file) in batches of ``chunk_rows`` rows, runs
    :func:`validate_catalog` (one Great Expectations validation) on each, and appends each batch's clean and
    quarantined rows as parts of ``clean.parquet/`` and ``quarantine.parquet/`` in ``out_dir``. Uniqueness is
    checked across the whole snapshot: the ``product_id`` column is read first (ids only) and every id that
    occurs twice anywhere is quarantined wherever it occurs. ``report.json`` holds the combined verdict; the
    Data Docs site is left to the caller (it adds the human label suite to the same site).
    ``on_partition(index, rows)`` is called before each batch is validated (progress; tests count batches).
    """
    from dashclip_core.storage.partitions import PartWriter, iter_frames, read_column

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = CatalogGate(out)
    # (a snapshot without the column gets validate_catalog's error naming it, below)
    all_ids = read_column(products_path, "product_id") if "product_id" in _columns(products_path) else pd.Series([], dtype=object)
    present = all_ids[all_ids.notna()]
    counts = present.value_counts()
    duplicates = set(counts.index[counts > 1])
    totals = {"n_rows": 0, "n_bad": 0, "n_clean": 0, "n_images_checked": 0, "n_images_unreadable": 0}
    by_code: dict[str, int] = {}
    failing: dict[tuple, dict[str, Any]] = {}
    failed_results, passed_results = [], []
    clean_ids: list[pd.Series] = []
    offset = 0
    n_partitions = 0
    empty_quarantine = pd.DataFrame({"product_id": pd.Series(dtype="string"), "row": pd.Series(dtype="int64"),
                                     "reason": pd.Series(dtype="string")})
    with PartWriter(files.clean) as clean_writer, PartWriter(files.quarantine, empty_quarantine) as quarantine_writer:
        for batch in iter_frames(products_path, chunk_rows):
            if on_partition is not None:
                on_partition(n_partitions, len(batch))
            part = validate_catalog(batch, cfg, images=images, duplicate_ids=duplicates, row_offset=offset)
            n_partitions += 1
            offset += len(batch)
            clean_writer.write(part.clean)
            quarantine_writer.write(part.quarantine.astype({"product_id": "string", "row": "int64", "reason": "string"}))
            clean_ids.append(part.clean["product_id"])
            for key in totals:
                totals[key] += part.summary[key]
            for code, n in part.summary["n_images_rejected_by_reason"].items():
                by_code[code] = by_code.get(code, 0) + n
            for f in part.summary["failing_expectations"]:
                merged = failing.setdefault((f["check"], f["column"]), {**f, "unexpected_count": 0, "sample_ids": []})
                merged["unexpected_count"] += f["unexpected_count"] or 0
                merged["sample_ids"] = (merged["sample_ids"] + [i for i in f["sample_ids"] if i not in merged["sample_ids"]])[:SAMPLE_SIZE]
            (failed_results if part.summary["failing_expectations"] else passed_results).extend(part.validation_results)
    bad_fraction = totals["n_bad"] / totals["n_rows"] if totals["n_rows"] else 0.0
    passed = bad_fraction <= cfg.max_bad_product_fraction and totals["n_clean"] >= cfg.min_products
    summary = {**totals, "bad_fraction": bad_fraction, "max_bad_product_fraction": cfg.max_bad_product_fraction,
               "min_products": cfg.min_products, "n_images_rejected_by_reason": dict(sorted(by_code.items())),
               "failing_expectations": list(failing.values()), "n_partitions": n_partitions, "chunk_rows": chunk_rows}
    write_report(passed, summary, out)
    log = logger.info if passed else logger.warning
    log("catalog gate %s: %d rows in %d partitions, %d quarantined (max fraction %s), %d clean (min %d)",
        "passed" if passed else "failed", totals["n_rows"], n_partitions, totals["n_bad"], cfg.max_bad_product_fraction,
        totals["n_clean"], cfg.min_products)
    shown = (failed_results + passed_results)[:MAX_DATA_DOCS_PARTITIONS]
    return PartitionedGateResult(passed=passed, summary=summary,
                                 clean_ids=pd.concat(clean_ids, ignore_index=True) if clean_ids else pd.Series([], dtype=object),
                                 all_ids=all_ids, n_partitions=n_partitions, validation_results=shown)


def _columns(path) -> list[str]:
    import pyarrow.parquet as pq

    from dashclip_core.storage.partitions import part_files

    parts = part_files(path)
    return pq.ParquetFile(parts[0]).schema_arrow.names if parts else []
