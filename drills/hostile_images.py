"""Drill: hostile image files in a catalog (a FIFO, /dev/zero, escapes by symlink, ``../`` and absolute
path, a decompression bomb, an oversized file, a truncated file, a directory).

Real steps (``tasks/steps.py`` ``extract_catalog`` and ``validate_catalog``, tiny config) run twice on copies
of one generated demo catalog (SQLite + PNGs):

1. the untouched copy: the reference;
2. a copy with one hostile image per kind of fault, in the files themselves (the FIFO is a real named pipe,
   the bomb a real 12000 x 10000 PNG of a few KB) or in the DB's ``image_uri``.

Checks: the steps finish within a hard deadline (a FIFO or /dev/zero would block or exhaust a naive
reader); the gate stops the run; the quarantine names exactly the injected products, each with its
expected reason code and ``field image_uri``; every other product is in ``clean.parquet`` exactly as in
the reference (same columns, values and image bytes). ``data_lost`` counts good products missing from
``clean`` plus hostile ones that got into it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

from drills import Row
from drills.env import ROOT

DEADLINE_S = 240.0  # both steps of one run; a blocking read would never end
MAX_IMAGE_BYTES = 1_000_000


def run(work: Path) -> Row:
    from dashclip_core.catalog.demo import generate_demo_catalog

    source = generate_demo_catalog(work / "source" / "catalog", num_products=40, seed=7).parent
    reference_dir, hostile_dir = work / "reference", work / "hostile"
    shutil.copytree(source, reference_dir)
    shutil.copytree(source, hostile_dir)
    expected = _inject(hostile_dir, work / "outside")

    t0 = time.time()
    ref_clean, _ = _run_steps(work, "reference", reference_dir, expect_pass=True)
    bad_clean, quarantine = _run_steps(work, "hostile", hostile_dir, expect_pass=False)
    seconds = time.time() - t0

    reasons = dict(zip(quarantine["product_id"], quarantine["reason"]))
    if set(reasons) != set(expected):
        raise AssertionError(f"quarantined {sorted(reasons)}, expected {sorted(expected)}")
    for pid, code in expected.items():
        if f"({code}): product {pid!r}, field image_uri " not in reasons[pid]:
            raise AssertionError(f"product {pid}: reason {reasons[pid]!r} lacks code {code}")

    good = [p for p in ref_clean["product_id"] if p not in expected]
    got = set(bad_clean["product_id"])
    lost = sum(p not in got for p in good) + sum(p in got for p in expected)
    _same_rows(ref_clean, bad_clean, good, reference_dir, hostile_dir)
    codes = sorted(set(expected.values()))
    return Row(fault=f"{len(expected)} hostile images ({', '.join(c.removeprefix('image_') for c in codes)})",
               what_happened=f"gate stopped the run in {seconds:.0f} s (both runs), quarantined exactly the {len(expected)} "
                             f"with their reason codes; {len(good)} good products clean and identical to the reference",
               data_lost=lost)


def _inject(catalog: Path, outside: Path) -> dict[str, str]:
    """One hostile image per fault; returns product_id -> expected reason code."""
    from PIL import Image

    outside.mkdir(parents=True, exist_ok=True)
    secret = outside / "secret.png"
    Image.new("RGB", (32, 32), (9, 9, 9)).save(secret)
    db = catalog / "catalog.db"
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT product_id, image_uri FROM products WHERE image_uri IS NOT NULL AND title IS NOT NULL "
                           "ORDER BY product_id").fetchall()
        victims = iter(rows)
        expected: dict[str, str] = {}

        def file_fault(code: str, make) -> None:
            pid, uri = next(victims)
            path = catalog / uri
            path.unlink()
            make(path)
            expected[pid] = code

        def uri_fault(code: str, new_uri: str) -> None:
            pid, _ = next(victims)
            con.execute("UPDATE products SET image_uri = ? WHERE product_id = ?", (new_uri, pid))
            expected[pid] = code

        file_fault("image_not_a_file", os.mkfifo)  # a reader without the stat check blocks forever
        file_fault("image_outside_roots", lambda p: p.symlink_to(secret))
        file_fault("image_too_many_pixels", lambda p: Image.new("1", (12000, 10000)).save(p, format="PNG"))
        file_fault("image_too_large", lambda p: p.write_bytes(secret.read_bytes() + b"\0" * (MAX_IMAGE_BYTES + 1)))
        file_fault("image_unreadable", lambda p: p.write_bytes(_noise_png()[:1500]))  # truncated
        uri_fault("image_outside_roots", "/dev/zero")
        uri_fault("image_outside_roots", f"../../outside/{secret.name}")
        uri_fault("image_outside_roots", str(secret))
        uri_fault("image_not_a_file", "images")  # a directory inside the catalog folder
    return expected


def _noise_png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _run_steps(work: Path, name: str, catalog: Path, expect_pass: bool):
    """extract_catalog + validate_catalog of the tiny config on ``catalog``, in a thread with a hard deadline."""
    import pandas as pd

    from dashclip_core.config import PipelineConfig
    from tasks import steps
    from tasks.common import run_paths

    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text((ROOT / "configs" / "tiny.yaml").read_text().replace(
        "source: demo", f"source: sql\n  db_url: sqlite:///{catalog / 'catalog.db'}\n  max_image_bytes: {MAX_IMAGE_BYTES}"
    ).replace("name: tiny", f"name: drill-{name}"))
    params, run_id = {"config_path": str(cfg_path)}, f"drill__hostile_images_{name}"
    box: dict = {}

    def body() -> None:
        try:
            snap = steps.extract_catalog(params, run_id=run_id)
            box["gate"] = steps.validate_catalog(snap, params, run_id=run_id)
        except Exception as err:  # noqa: BLE001 - judged below
            box["error"] = err

    worker = threading.Thread(target=body, daemon=True)
    worker.start()
    worker.join(DEADLINE_S)
    if worker.is_alive():
        raise AssertionError(f"{name}: extract_catalog + validate_catalog still running after {DEADLINE_S} s (a blocking read?)")
    error = box.get("error")
    if expect_pass and error is not None:
        raise AssertionError(f"{name}: the fault-free run failed: {error}") from error
    if not expect_pass and (error is None or "catalog gate failed" not in str(error)):
        raise AssertionError(f"{name}: the gate should have stopped the run, got {error!r}")
    gate_dir = run_paths(PipelineConfig.from_file(cfg_path), run_id).local("validate_catalog")
    return pd.read_parquet(gate_dir / "clean.parquet"), pd.read_parquet(gate_dir / "quarantine.parquet")


def _same_rows(ref, got, ids: list[str], ref_dir: Path, got_dir: Path) -> None:
    """The good products are unchanged: every column equal (image_uri relative to its catalog copy) and the
    image files byte-identical."""
    ref, got = ref.set_index("product_id"), got.set_index("product_id")
    present = [p for p in ids if p in got.index]
    for col in ref.columns:
        if col == "image_uri":
            continue
        a, b = ref.loc[present, col], got.loc[present, col]
        if not a.fillna("<null>").equals(b.fillna("<null>")):
            raise AssertionError(f"column {col} differs from the reference for good products")
    for pid in present:
        a, b = (v if isinstance(v, str) else None for v in (ref.at[pid, "image_uri"], got.at[pid, "image_uri"]))
        if (a is None) != (b is None):
            raise AssertionError(f"product {pid}: image presence differs from the reference")
        if a is not None:
            if os.path.relpath(a, ref_dir) != os.path.relpath(b, got_dir):
                raise AssertionError(f"product {pid}: image_uri {b} is not the reference's {a}")
            if hashlib.sha256(Path(a).read_bytes()).digest() != hashlib.sha256(Path(b).read_bytes()).digest():
                raise AssertionError(f"product {pid}: image bytes differ from the reference")
