"""Tests for the catalog gate: GX expectations, per-row quarantine reasons, thresholds, outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dashclip_core.config import ValidationConfig
from dashclip_core.storage.images import ImagePolicy
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
    assert reason == (f"image unreadable (image_unreadable): product 'p00002', field image_uri '{corrupt}': "
                      "not a recognised image format (accepted: JPEG, PNG, WEBP, GIF, BMP, TIFF)")
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
    assert result.quarantine["reason"].iloc[0].startswith(f"image unreadable (image_unreadable): product 'p00006', field image_uri '{truncated}': ")
    assert "truncated" in result.quarantine["reason"].iloc[0]


def test_missing_image_path_is_quarantined(good_image: Path, tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist.jpg"
    products = make_catalog(good_image)
    products.loc[7, "image_uri"] = str(missing)

    result = validate_catalog(products, STRICT)

    assert reasons_by_row(result)[7] == f"image not found (image_not_found): product 'p00007', field image_uri '{missing}': no such file"


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


def test_s3_uris_are_read_under_the_policy(good_image: Path, s3_endpoint: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="gate-images")
    client.create_bucket(Bucket="elsewhere")
    client.put_object(Bucket="gate-images", Key="images/p1.png", Body=good_image.read_bytes())
    client.put_object(Bucket="elsewhere", Key="p2.png", Body=good_image.read_bytes())
    products = make_catalog(good_image)
    products.loc[1, "image_uri"] = "s3://gate-images/images/p1.png"
    products.loc[2, "image_uri"] = "s3://gate-images/images/missing.png"
    products.loc[3, "image_uri"] = "s3://elsewhere/p2.png"
    policy = ImagePolicy.from_roots([good_image.parent, "s3://gate-images/images"], s3_endpoint_url=s3_endpoint)

    result = validate_catalog(products, LENIENT, images=policy)

    reasons = reasons_by_row(result)
    assert set(reasons) == {2, 3}  # row 1 (an allowed S3 object) is clean
    assert reasons[2].startswith("image not found (image_not_found): product 'p00002', field image_uri 's3://gate-images/images/missing.png'")
    assert reasons[3].startswith("image outside the allowed roots (image_outside_roots): product 'p00003', field image_uri 's3://elsewhere/p2.png'")


def test_missing_column_is_named() -> None:
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image_uri'\]"):
        validate_catalog(pd.DataFrame({"product_id": ["a"], "title": ["t"], "category": ["c"]}), STRICT)


# ---- image policy: every hostile image is quarantined with its reason code, none hangs or decodes a bomb -----


def test_hostile_images_are_quarantined_each_with_its_reason(tmp_path: Path) -> None:
    import time

    from PIL import Image

    catalog = tmp_path / "catalog"
    (catalog / "images").mkdir(parents=True)
    good = catalog / "images" / "good.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(good)
    outside = tmp_path / "private.png"
    Image.new("RGB", (8, 8)).save(outside)
    (catalog / "images" / "link.png").symlink_to(outside)
    os.mkfifo(catalog / "images" / "pipe.png")
    Image.new("1", (12000, 10000)).save(catalog / "images" / "bomb.png")  # 120 Mpx in a few KB
    (catalog / "images" / "huge.png").write_bytes(good.read_bytes() + b"\0" * 30_000)
    (catalog / "images" / "junk.png").write_bytes(b"plain text, not pixels" * 10)
    products = make_catalog(good, n=16)
    hostile = {
        2: (f"{catalog}/images/../../private.png", "image_outside_roots"),
        3: (str(outside), "image_outside_roots"),
        4: (str(catalog / "images" / "link.png"), "image_outside_roots"),
        5: ("/dev/zero", "image_outside_roots"),
        6: (str(catalog / "images" / "pipe.png"), "image_not_a_file"),
        7: (str(catalog / "images"), "image_not_a_file"),
        8: (str(catalog / "images" / "bomb.png"), "image_too_many_pixels"),
        9: (str(catalog / "images" / "huge.png"), "image_too_large"),
        10: (str(catalog / "images" / "junk.png"), "image_unreadable"),
        11: (str(catalog / "images" / "gone.png"), "image_not_found"),
    }
    for row, (uri, _) in hostile.items():
        products.loc[row, "image_uri"] = uri
    policy = ImagePolicy.from_roots([catalog], max_bytes=25_000, timeout_s=5.0)
    assert (catalog / "images" / "bomb.png").stat().st_size < 25_000

    start = time.monotonic()
    result = validate_catalog(products, LENIENT, images=policy)

    assert time.monotonic() - start < 30
    reasons = reasons_by_row(result)
    assert set(reasons) == set(hostile)
    for row, (uri, code) in hostile.items():
        assert f"({code}): product 'p{row:05d}', field image_uri {uri!r}: " in reasons[row], (row, reasons[row])
    assert result.summary["n_images_rejected_by_reason"] == {
        "image_not_a_file": 2, "image_not_found": 1, "image_outside_roots": 4, "image_too_large": 1,
        "image_too_many_pixels": 1, "image_unreadable": 1}
    assert len(result.clean) == 16 - len(hostile)


def test_dev_zero_under_an_allowed_root_is_not_read(tmp_path: Path, good_image: Path) -> None:
    products = make_catalog(good_image)
    products.loc[2, "image_uri"] = "/dev/zero"
    result = validate_catalog(products, LENIENT, images=ImagePolicy.from_roots(["/dev", good_image.parent], timeout_s=5.0))
    assert reasons_by_row(result)[2] == ("image is not a regular file (image_not_a_file): product 'p00002', "
                                         "field image_uri '/dev/zero': it is a character device")


def test_validate_catalog_task_applies_the_configured_roots(tmp_path: Path, dashclip_home: Path, tiny_config: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The DAG's gate step builds the policy from the config: an image outside the catalog's folder is quarantined."""
    import sqlite3

    from PIL import Image

    from dashclip_core.catalog.demo import generate_demo_catalog
    from tasks.common import resolve_config, run_paths
    from tasks.steps import extract_catalog
    from tasks.steps import validate_catalog as validate_catalog_task

    db = generate_demo_catalog(tmp_path / "cat", num_products=24, seed=1)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (16, 16)).save(outside)
    with sqlite3.connect(db) as con:
        pid = con.execute("SELECT product_id FROM products WHERE image_uri IS NOT NULL ORDER BY product_id").fetchone()[0]
        con.execute("UPDATE products SET image_uri = ? WHERE product_id = ?", (str(outside), pid))
        pid2 = con.execute("SELECT product_id FROM products WHERE image_uri LIKE 'images/%' ORDER BY product_id DESC").fetchone()[0]
        con.execute("UPDATE products SET image_uri = '../../outside.png' WHERE product_id = ?", (pid2,))
    cfg_path = tmp_path / "configs" / "images.yaml"
    cfg_path.parent.mkdir()
    cfg_path.write_text(tiny_config.read_text().replace("source: demo", f"source: sql\n  db_url: sqlite:///{db}"))
    monkeypatch.setenv("DASHCLIP_CONFIG_DIRS", str(cfg_path.parent))
    params = {"config_path": str(cfg_path)}
    run_id = f"images-{tmp_path.name}"
    snap = extract_catalog(params, run_id=run_id)
    with pytest.raises(Exception, match="catalog gate failed"):
        validate_catalog_task(snap, params, run_id=run_id)
    gate_dir = run_paths(resolve_config(params), run_id).local("validate_catalog")
    quarantine = pd.read_parquet(gate_dir / "quarantine.parquet")
    reasons = dict(zip(quarantine["product_id"], quarantine["reason"]))
    assert set(reasons) == {pid, pid2}
    assert "(image_outside_roots)" in reasons[pid] and str(outside) in reasons[pid]
    assert "(image_outside_roots)" in reasons[pid2] and "outside.png" in reasons[pid2]
