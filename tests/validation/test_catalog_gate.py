"""Tests for the catalog gate: GX expectations, per-row quarantine reasons, thresholds, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dashclip_core.config import ValidationConfig
from dashclip_core.validation.catalog_gate import validate_catalog, write_gate_outputs

STRICT = ValidationConfig(max_bad_product_fraction=0.0, min_products=8)
LENIENT = ValidationConfig(max_bad_product_fraction=0.5, min_products=1)


def make_catalog(image: Path, n: int = 10) -> pd.DataFrame:
    """n good products: the first two image-only (title null), the last one text-only (no image)."""
    titles: list[str | None] = [f"product {i}" for i in range(n)]
    titles[0] = titles[1] = None
    images: list[str | None] = [str(image)] * n
    images[-1] = None
    return pd.DataFrame(
        {
            "product_id": [f"p{i:05d}" for i in range(n)],
            "title": titles,
            "description": [None] * n,
            "category": ["granola bar"] * n,
            "aisle": ["snacks"] * n,
            "image_uri": images,
        }
    )


def reasons_by_row(result) -> dict[int, str]:
    return dict(zip(result.quarantine["row"].tolist(), result.quarantine["reason"].tolist()))


def test_good_catalog_passes_and_writes_empty_quarantine(good_image: Path, tmp_path: Path) -> None:
    products = make_catalog(good_image)

    result = validate_catalog(products, STRICT)

    assert result.passed
    assert list(result.quarantine.columns) == ["product_id", "row", "reason"]
    assert result.quarantine.empty
    pd.testing.assert_frame_equal(result.clean, products)
    assert result.summary["n_rows"] == 10 and result.summary["n_bad"] == 0
    assert result.summary["failing_expectations"] == []

    out = tmp_path / "gate"
    write_gate_outputs(result, out)
    assert pd.read_parquet(out / "clean.parquet").shape == products.shape
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    assert list(quarantine.columns) == ["product_id", "row", "reason"] and quarantine.empty
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True and report["n_rows"] == 10


def test_every_copy_of_a_duplicated_id_is_quarantined(good_image: Path) -> None:
    products = make_catalog(good_image)
    products.loc[5, "product_id"] = "p00003"

    result = validate_catalog(products, STRICT)

    assert not result.passed
    assert reasons_by_row(result) == {3: "duplicate product_id 'p00003'", 5: "duplicate product_id 'p00003'"}
    assert "p00003" not in set(result.clean["product_id"])
    assert len(result.clean) == 8
    failing = {f["check"]: f for f in result.summary["failing_expectations"]}
    assert failing["product_id_unique"]["sample_ids"] == ["p00003"]
    assert failing["product_id_unique"]["column"] == "product_id"


@pytest.mark.parametrize("title", ["", "   ", "\t\n"])
def test_blank_title_is_quarantined_but_null_title_is_fine(good_image: Path, title: str) -> None:
    products = make_catalog(good_image)
    products.loc[4, "title"] = title

    result = validate_catalog(products, STRICT)

    assert reasons_by_row(result) == {4: "title is empty"}  # rows 0 and 1 (title null, image ok) are clean
    assert {"p00000", "p00001"} <= set(result.clean["product_id"])


def test_corrupt_image_file_is_quarantined(good_image: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x00garbage, not a png" * 10)
    products = make_catalog(good_image)
    products.loc[2, "image_uri"] = str(corrupt)

    result = validate_catalog(products, STRICT)

    reason = reasons_by_row(result)[2]
    assert reason.startswith(f"image unreadable: {corrupt}: UnidentifiedImageError")
    assert not result.passed
    assert "p00002" not in set(result.clean["product_id"])


def test_truncated_image_is_caught_by_full_decode(tmp_path: Path) -> None:
    from PIL import Image

    full = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full.read_bytes()[:2000])  # header intact, pixel data cut: open() alone succeeds
    products = make_catalog(full)
    products.loc[6, "image_uri"] = str(truncated)

    result = validate_catalog(products, STRICT)

    assert list(result.quarantine["row"]) == [6]
    assert result.quarantine["reason"].iloc[0].startswith(f"image unreadable: {truncated}: ")


def test_missing_image_path_is_quarantined(good_image: Path, tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist.jpg"
    products = make_catalog(good_image)
    products.loc[7, "image_uri"] = str(missing)

    result = validate_catalog(products, STRICT)

    assert reasons_by_row(result)[7].startswith(f"image unreadable: {missing}: FileNotFoundError")


def test_product_without_title_and_image_and_several_reasons(good_image: Path, tmp_path: Path) -> None:
    products = make_catalog(good_image)
    products.loc[3, "image_uri"] = None
    products.loc[3, "title"] = None  # nothing to find it by
    products.loc[8, ["title", "image_uri", "category"]] = ["  ", str(tmp_path / "gone.png"), None]

    result = validate_catalog(products, LENIENT)

    reasons = reasons_by_row(result)
    assert reasons[3] == "no title and no image"
    assert reasons[8].split("; ")[0] == "title is empty"
    assert "category is missing" in reasons[8].split("; ")
    assert reasons[8].endswith("; no title and no readable image")
    assert result.quarantine["product_id"].tolist() == ["p00003", "p00008"]
    assert len(result.clean) == 8
    json.dumps(result.summary)  # JSON-serialisable


def test_null_product_id_is_quarantined(good_image: Path) -> None:
    products = make_catalog(good_image)
    products.loc[2, "product_id"] = None

    result = validate_catalog(products, LENIENT)

    assert reasons_by_row(result) == {2: "product_id is missing"}
    failing = {f["check"]: f for f in result.summary["failing_expectations"]}
    assert failing["product_id_not_null"]["sample_ids"] == [None]


def test_thresholds_bad_fraction_and_min_products(good_image: Path) -> None:
    products = make_catalog(good_image)
    products.loc[4, "title"] = ""

    assert validate_catalog(products, ValidationConfig(max_bad_product_fraction=0.1, min_products=9)).passed
    assert not validate_catalog(products, ValidationConfig(max_bad_product_fraction=0.09, min_products=1)).passed
    assert not validate_catalog(products, ValidationConfig(max_bad_product_fraction=0.5, min_products=10)).passed


def test_s3_uris_need_a_reader(good_image: Path) -> None:
    products = make_catalog(good_image)
    products.loc[1, "image_uri"] = "s3://bucket/images/p1.png"
    with pytest.raises(ValueError, match=r"row 1: field 'image_uri' is 's3://bucket/images/p1.png'"):
        validate_catalog(products, STRICT)

    blobs = {"s3://bucket/images/p1.png": good_image.read_bytes()}
    result = validate_catalog(products, STRICT, read_bytes=lambda uri: blobs.get(uri) or Path(uri).read_bytes())
    assert result.passed


def test_missing_column_is_named() -> None:
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image_uri'\]"):
        validate_catalog(pd.DataFrame({"product_id": ["a"], "title": ["t"], "category": ["c"]}), STRICT)
