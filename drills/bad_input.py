"""Drill: a bad-input sweep over the catalog, the human labels and the config.

A real demo catalog (SQLite + PNGs, 96 products as in ``configs/tiny.yaml``) is copied and broken, then the
real task functions run on it (``tasks/steps.py``: ``extract_catalog``, ``validate_catalog``, ``label_pairs``)
with ``params={"config_path": <a YAML under the work folder>}`` and a run id, as Airflow would call them.

Cases (each in its own child process with a hard timeout, under one overall deadline, so the sweep can never
hang: a child that runs out of time is killed with its process group and counts as a failed case):

``bad_rows``
    Products: ``image_uri`` -> ``/dev/zero``, a FIFO in the catalog's images folder, ``../../etc/passwd``, an
    absolute path outside the roots, a truncated PNG, a truncated JPEG, a text file named ``.jpg``, a 2 KB PNG
    whose header claims 60000 x 60000 pixels, a file over ``catalog.max_image_bytes``; a duplicated product id;
    two unicode titles and a 1 MB title. Human labels (the table copied without its CHECK constraints, as a
    foreign ``sql`` catalog may be): grades 3, -1, 258, 1.5, NULL, a blank query, a blank product id, an
    unknown product id, a query put in both splits; and a second annotator of an existing pair. The gate
    thresholds are raised so the run goes on: every bad row must be quarantined with its row and field named,
    the labels of quarantined products leave with them, every other row is kept, and ``label_pairs`` labels
    the rest (one label for the pair with two annotators; the unicode and 1 MB titles pass).

    The 1 MB title is *accepted*: a long title is valid data, not damage, and every consumer bounds its own
    cost (the LLM prompt cuts each field to ``prompt.MAX_FIELD_CHARS``, the text towers and the teacher
    truncate to their token limits, quarantine reasons quote at most 80 characters). Refusing it would drop a
    real product for the sake of its consumers.
``gate_stops``
    The same broken catalog with the default thresholds (0 bad rows allowed): ``validate_catalog`` publishes
    its verdict and fails, naming the product quarantine and the human label quarantine; nothing downstream ran.
``missing_column`` / ``renamed_column``
    ``products.category`` dropped, ``products.title`` renamed to ``name``: ``extract_catalog`` fails naming
    the table and the column, and publishes nothing (no step folder, no staging debris).
``config``
    ``storage.root:`` empty, ``labeling.max_cost_usd: '50'``, ``labeling.max_tokens: yes``: loading the run's
    config raises naming the key.

``python -m drills bad_input`` runs it; ``tests/drills/test_bad_input.py`` runs it under pytest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

from drills import Row

ROOT = Path(__file__).resolve().parent.parent
TOTAL_LIMIT_S = 540.0  # the whole sweep, children included: under the acceptance bound of 10 minutes
CASE_LIMIT_S = {"source": 120.0, "bad_rows": 360.0, "gate_stops": 150.0, "missing_column": 90.0, "renamed_column": 90.0,
                "config": 60.0}
CASES = ["bad_rows", "gate_stops", "missing_column", "renamed_column", "config"]
NUM_PRODUCTS = 96
TAG = "drill-bad-input"  # annotator of every injected human label row (finds its row in the snapshot)
ONE_MB = 1_000_000
MAX_IMAGE_BYTES = 400_000  # the drill's catalog.max_image_bytes (the oversized image is just above it)
UNICODE_TITLES = ["Café au lait — 牛奶 🥛 (1 l)", "Ünïcödé ñame: Grüße aus Köln"]
# Expected image reason codes (dashclip_core/storage/images.py; the product gate quotes them in the reason).
IMAGE_FAULTS = {
    "dev_zero": "image_outside_roots",  # realpath /dev/zero is outside the catalog's folder
    "fifo": "image_not_a_file",  # inside the folder, but not a regular file (opening it would block)
    "dotdot": "image_outside_roots",
    "absolute_outside": "image_outside_roots",
    "truncated_png": "image_unreadable",
    "truncated_jpeg": "image_unreadable",
    "text_as_jpg": "image_unreadable",
    "huge_dimensions": "image_too_many_pixels",
    "oversized_file": "image_too_large",
}
# Injected human label rows: (what, change to a good train row, field, check).
LABEL_FAULTS = [
    ("label 3", {"label": 3}, "label", "label_in_set"),
    ("label -1", {"label": -1}, "label", "label_in_set"),
    ("label 258", {"label": 258}, "label", "label_in_set"),
    ("label 1.5", {"label": 1.5}, "label", "label_in_set"),
    ("label NULL", {"label": None}, "label", "label_in_set"),
    ("blank query", {"query": "  "}, "query", "query_not_blank"),
    ("blank product_id", {"product_id": ""}, "product_id", "product_id_not_blank"),
    ("unknown product_id", {"product_id": "no-such-product"}, "product_id", "product_id_known"),
    ("split test", {"split": "test"}, "split", "split_in_set"),
]
CONFIG_FAULTS = [  # (file name, YAML, the key the error must name)
    ("empty_root.yaml", "storage:\n  root:\n", "storage.root"),
    ("cost_as_text.yaml", "labeling:\n  max_cost_usd: '50'\n", "labeling.max_cost_usd"),
    ("tokens_yes.yaml", "labeling:\n  max_tokens: yes\n", "labeling.max_tokens"),
]


# ---------------------------------------------------------------------------------------------------- parent


def run(work: Path) -> list[Row]:
    """Run every case in its own child process under one deadline; one Row per case. Raises if any case failed."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    _allow_configs(work)
    deadline = time.monotonic() + TOTAL_LIMIT_S
    source = _child("source", work, deadline)
    if not source.get("ok"):
        raise RuntimeError(f"bad_input: could not build the source catalog: {source.get('error')}")
    rows, failures = [], []
    for case in CASES:
        result = _child(case, work, deadline)
        if result.get("ok"):
            rows.append(Row(result["fault"], result["what_happened"], int(result["data_lost"])))
        else:
            failures.append(f"{case}: {result.get('error')}")
            rows.append(Row(case, f"FAILED: {str(result.get('error'))[:300]}", int(result.get("data_lost", 1) or 1)))
    for row in rows:
        print(f"  {row.fault} | {row.what_happened} | lost {row.data_lost}", flush=True)
    if failures:
        raise AssertionError("bad_input: " + " || ".join(failures))
    return rows


def _allow_configs(work: Path) -> None:
    """The run's config_path must lie under $DASHCLIP_CONFIG_DIRS (tasks/common.py): add the work folder if needed."""
    dirs = [d for d in os.environ.get("DASHCLIP_CONFIG_DIRS", "").split(os.pathsep) if d.strip()]
    if not any(work.is_relative_to(Path(d).resolve()) for d in dirs):
        os.environ["DASHCLIP_CONFIG_DIRS"] = os.pathsep.join([*dirs, str(work)])


def _child(case: str, work: Path, deadline: float) -> dict:
    """Run ``case`` in ``python -m drills.bad_input``; its JSON result, or the error (timeout = a hang)."""
    limit = min(CASE_LIMIT_S[case], deadline - time.monotonic())
    if limit <= 5:
        return {"ok": False, "error": "no time left under the sweep's deadline"}
    out = work / case / "result.json"
    out.unlink(missing_ok=True)
    log = work / f"{case}.log"
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "drills.bad_input", case, str(work)], cwd=ROOT, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)  # own group: a timeout kills all of it
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"ok": False, "error": f"hung: no result after {limit:.0f} s (killed; log {log})"}
    seconds = time.monotonic() - t0
    print(f"  case {case}: {seconds:.0f} s, exit {rc}", flush=True)
    if rc != 0 or not out.exists():
        tail = log.read_text(errors="replace")[-1500:]
        return {"ok": False, "error": f"exit {rc}; log {log}: ...{tail}"}
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------- children


def _main(case: str, work: Path) -> int:
    """Child entry point: run one case, write ``<work>/<case>/result.json``."""
    folder = work / case
    folder.mkdir(parents=True, exist_ok=True)
    try:
        result = {"ok": True, **CASE_FUNCS[case](work, folder)}
    except Exception as exc:  # noqa: BLE001 - a case that raised is a failed case: its message goes to the parent's row
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:3000]}
    (folder / "result.json").write_text(json.dumps(result))
    return 0


def _source(work: Path, folder: Path) -> dict:
    from dashclip_core.catalog.demo import generate_demo_catalog

    db = generate_demo_catalog(folder / "catalog", num_products=NUM_PRODUCTS, seed=3, image_size=64)
    return {"db": str(db)}


def _copy_source(work: Path, folder: Path) -> Path:
    dst = folder / "catalog"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(work / "source" / "catalog", dst)
    return dst / "catalog.db"


def _config(folder: Path, db: Path, **sections: dict) -> Path:
    """tiny.yaml pointed at ``db`` (a ``sql`` source) with a cache of the case's own, plus ``sections``."""
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["catalog"] = {"source": "sql", "db_url": f"sqlite:///{db}", "max_image_bytes": MAX_IMAGE_BYTES}
    raw["storage"] = {"cache_dir": str(folder / "cache"), "root": str(folder / "runs")}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    path = folder / "drill.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def _break_catalog(db: Path) -> dict:
    """Inject every product and human-label fault of ``bad_rows`` into ``db``; return what each should become."""
    images = db.parent / "images"
    with sqlite3.connect(db) as con:
        # A foreign catalog need not declare a primary key or CHECKs: copy both tables without them.
        con.executescript("CREATE TABLE p2 AS SELECT * FROM products; DROP TABLE products; ALTER TABLE p2 RENAME TO products;"
                          "CREATE TABLE h2 AS SELECT * FROM human_labels; DROP TABLE human_labels;"
                          "ALTER TABLE h2 RENAME TO human_labels;")
        with_image = [r[0] for r in con.execute(
            "SELECT product_id FROM products WHERE image_uri IS NOT NULL AND title IS NOT NULL ORDER BY product_id")]
        victims = dict(zip(IMAGE_FAULTS, with_image))
        png = (images / f"{with_image[-1]}.png").read_bytes()
        uris = {
            "dev_zero": "/dev/zero",
            "fifo": "images/drill_fifo.png",
            "dotdot": "../../../../../../etc/passwd",
            "absolute_outside": "/etc/hostname",
            "truncated_png": "images/drill_truncated.png",
            "truncated_jpeg": "images/drill_truncated.jpg",
            "text_as_jpg": "images/drill_text.jpg",
            "huge_dimensions": "images/drill_huge.png",
            "oversized_file": "images/drill_oversized.png",
        }
        os.mkfifo(images / "drill_fifo.png")
        (images / "drill_truncated.png").write_bytes(png[: len(png) // 2])
        jpeg = _jpeg()
        (images / "drill_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
        (images / "drill_text.jpg").write_text("this is a text file, not a JPEG\n")
        (images / "drill_huge.png").write_bytes(_huge_png(60_000, 60_000))
        (images / "drill_oversized.png").write_bytes(png + b"\0" * (MAX_IMAGE_BYTES + 1 - len(png)))
        for fault, pid in victims.items():
            con.execute("UPDATE products SET image_uri = ? WHERE product_id = ?", (uris[fault], pid))
        rest = [p for p in with_image if p not in victims.values()]
        duplicate, unicode_ids, long_id = rest[0], rest[1:3], rest[3]
        con.execute("INSERT INTO products SELECT * FROM products WHERE product_id = ?", (duplicate,))
        for pid, title in zip(unicode_ids, UNICODE_TITLES):
            con.execute("UPDATE products SET title = ? WHERE product_id = ?", (title, pid))
        con.execute("UPDATE products SET title = ? WHERE product_id = ?", ("Long " + "x" * (ONE_MB - 5), long_id))

        # Human labels: bad rows cloned from a good train row of a clean product, tagged by annotator.
        clean_products = set(rest[4:])
        train = [r for r in con.execute("SELECT query, product_id, label, annotator, split FROM human_labels "
                                        "WHERE split = 'train' ORDER BY query, product_id") if r[1] in clean_products]
        base = dict(zip(("query", "product_id", "label", "annotator", "split"), train[0]))
        for i, (what, change, _, _) in enumerate(LABEL_FAULTS):
            row = {**base, "annotator": f"{TAG}:{i}", **change}
            con.execute("INSERT INTO human_labels (query, product_id, label, annotator, split) VALUES (?, ?, ?, ?, ?)",
                        (row["query"], row["product_id"], row["label"], row["annotator"], row["split"]))
        # A query moved into both splits: every row of that query is quarantined (split_consistent).
        eval_q = con.execute("SELECT query FROM human_labels WHERE split = 'eval' ORDER BY query LIMIT 1").fetchone()[0]
        con.execute("INSERT INTO human_labels (query, product_id, label, annotator, split) VALUES (?, ?, 1, ?, 'train')",
                    (eval_q, rest[4], f"{TAG}:both-splits"))
        # A second annotator of an existing pair (must pass; labels.parquet keeps one row for it).
        second = next(r for r in train[1:] if r[0] != base["query"])
        con.execute("INSERT INTO human_labels (query, product_id, label, annotator, split) VALUES (?, ?, ?, ?, 'train')",
                    (second[0], second[1], (second[2] + 1) % 3, f"{TAG}:second-annotator"))
    return {"image_victims": victims, "duplicate": duplicate, "unicode_ids": unicode_ids, "long_id": long_id,
            "both_splits_query": eval_q, "annotated_pair": [second[0], second[1]]}


def _bad_rows(work: Path, folder: Path) -> dict:
    import pandas as pd

    from dashclip_core import layout
    from dashclip_core.config import PipelineConfig
    from tasks import steps
    from tasks.common import run_paths

    db = _copy_source(work, folder)
    truth = _break_catalog(db)
    cfg_path = _config(folder, db, validation={"max_bad_product_fraction": 0.5, "max_bad_label_fraction": 0.5},
                       labeling={"candidates_per_query": 8, "random_candidates_per_query": 2})  # fewer pairs: a bounded case
    params, run_id = {"config_path": str(cfg_path)}, "drill_bad_rows"
    problems: list[str] = []

    catalog = steps.extract_catalog(params=params, run_id=run_id)
    gate = steps.validate_catalog(catalog, params=params, run_id=run_id)
    labels_summary = steps.label_pairs(catalog, gate, params=params, run_id=run_id)

    paths = run_paths(PipelineConfig.from_file(cfg_path), run_id)
    snap, gate_dir = layout.Snapshot(paths.local("extract_catalog")), layout.CatalogGate(paths.local("validate_catalog"))
    products = pd.read_parquet(snap.products)
    clean, quarantine = pd.read_parquet(gate_dir.clean), pd.read_parquet(gate_dir.quarantine)
    reasons: dict[str, list[str]] = {}
    for pid, reason in zip(quarantine["product_id"], quarantine["reason"]):
        reasons.setdefault(pid, []).append(reason)

    # Products: every fault quarantined with its reason code and the field named; the rest kept.
    for fault, pid in truth["image_victims"].items():
        code = IMAGE_FAULTS[fault]
        got = reasons.get(pid, [])
        if not any(f"({code})" in r and "image_uri" in r for r in got):
            problems.append(f"image fault {fault} ({pid}): expected reason code {code} naming image_uri, got {got}")
    if len(reasons.get(truth["duplicate"], [])) != 2 or not all("duplicate" in r for r in reasons[truth["duplicate"]]):
        problems.append(f"duplicate id {truth['duplicate']}: expected both copies quarantined, got {reasons.get(truth['duplicate'])}")
    titles = dict(zip(clean["product_id"], clean["title"]))
    for pid, title in zip(truth["unicode_ids"], UNICODE_TITLES):
        if titles.get(pid) != title:
            problems.append(f"unicode title of {pid}: expected it to pass unchanged, got {titles.get(pid)!r}")
    if len(titles.get(truth["long_id"]) or "") != ONE_MB:
        problems.append(f"1 MB title of {truth['long_id']}: expected it accepted whole")
    expected_bad = set(truth["image_victims"].values()) | {truth["duplicate"]}
    lost_products = len(set(products["product_id"]) - expected_bad - set(clean["product_id"]))
    wrongly_kept = len(expected_bad & set(clean["product_id"]))
    extra_quarantined = set(quarantine["product_id"]) - expected_bad
    if extra_quarantined:
        problems.append(f"products quarantined that were not broken: {sorted(extra_quarantined)[:5]}")

    # Human labels: each injected row quarantined by its row number and field; the other rows kept.
    human = pd.read_parquet(snap.human_labels)
    hq, hclean = pd.read_parquet(gate_dir.human_labels_quarantine), pd.read_parquet(gate_dir.human_labels)
    by_row = {int(r): (f, reason) for r, f, reason in zip(hq["row"], hq["field"], hq["reason"])}
    tags = human["annotator"].tolist()
    for i, (what, _, field, check) in enumerate(LABEL_FAULTS):
        row = tags.index(f"{TAG}:{i}") if f"{TAG}:{i}" in tags else None
        if row is None:
            problems.append(f"human label '{what}': the snapshot lost the row (the gate never saw it)")
            continue
        got = by_row.get(row)
        if got is None or field not in got[0].split(",") or not got[1].startswith(f"{check}: field {field}"):
            problems.append(f"human label '{what}' (row {row}): expected field {field}, check {check}; got {got}")
    both = [i for i, q in enumerate(human["query"]) if q == truth["both_splits_query"]]
    if not all(i in by_row and "split_consistent" in by_row[i][1] for i in both):
        problems.append(f"query in both splits: expected all {len(both)} rows quarantined (split_consistent)")
    quarantined_products = set(quarantine["product_id"].dropna())
    keep = [i for i, (q, p, a) in enumerate(zip(human["query"], human["product_id"], tags))
            if not str(a).startswith(f"{TAG}:") or a == f"{TAG}:second-annotator"]
    keep = [i for i in keep if human["query"].iat[i] != truth["both_splits_query"] and human["product_id"].iat[i] not in quarantined_products]
    lost_labels = len(keep) - len(hclean)  # every other row must be kept (clean is those rows, in input order)
    report = json.loads(gate_dir.human_labels_report.read_text())
    if report["n_bad"] != len(LABEL_FAULTS) + len(both):
        problems.append(f"human label gate counted {report['n_bad']} bad rows, expected {len(LABEL_FAULTS) + len(both)}")

    # The rest is processed: label_pairs ran on the clean rows; one label for the pair with two annotators.
    labels = pd.read_parquet(layout.Labels(paths.local("label_pairs")).labels)
    q, p = truth["annotated_pair"]
    pair = labels[(labels["query"] == q) & (labels["product_id"] == p)]
    if len(pair) != 1 or pair["source"].iat[0] != "human":
        problems.append(f"pair with two annotators ({q!r}, {p!r}): expected one human row in labels.parquet, got {len(pair)}")
    if set(labels["product_id"]) & expected_bad:
        problems.append("labels.parquet names a quarantined product")
    if not labels["label"].isin([0, 1, 2]).all() or labels["label"].dtype.name != "int8":
        problems.append(f"labels.parquet grades out of range or not int8: {labels['label'].dtype}")
    if problems:
        raise AssertionError("; ".join(problems))
    data_lost = max(0, lost_products) + wrongly_kept + abs(lost_labels)
    return {"fault": f"{len(IMAGE_FAULTS)} bad images, a duplicate id, unicode + 1 MB titles, {len(LABEL_FAULTS) + 1} bad "
                     "human label cases, a second annotator",
            "what_happened": (f"{len(quarantine)} product rows quarantined with reason codes "
                              f"({', '.join(sorted(set(IMAGE_FAULTS.values())))}, duplicate); {len(clean)} clean incl. unicode and 1 MB "
                              f"titles; {report['n_bad']} human label rows quarantined by row+field "
                              f"(+{report['n_product_quarantined']} with their products); label_pairs labelled "
                              f"{labels_summary['n_labels']} pairs, the 2-annotator pair once"),
            "data_lost": data_lost}


def _gate_stops(work: Path, folder: Path) -> dict:
    from dashclip_core.config import PipelineConfig
    from dashclip_core.layout import Step
    from tasks import steps
    from tasks.common import run_paths

    db = _copy_source(work, folder)
    _break_catalog(db)
    cfg_path = _config(folder, db)  # default thresholds: no bad row allowed
    params, run_id = {"config_path": str(cfg_path)}, "drill_gate_stops"
    catalog = steps.extract_catalog(params=params, run_id=run_id)
    try:
        steps.validate_catalog(catalog, params=params, run_id=run_id)
    except Exception as exc:  # AirflowFailException: the gate's verdict, no retry
        message = str(exc)
        if type(exc).__name__ != "AirflowFailException":
            raise
    else:
        raise AssertionError("validate_catalog passed a catalog with bad products and bad human labels")
    paths = run_paths(PipelineConfig.from_file(cfg_path), run_id)
    for part in ("bad product rows", "quarantine.parquet", "bad human label rows", "human_labels_quarantine.parquet"):
        if part not in message:
            raise AssertionError(f"the gate's failure does not name {part!r}: {message}")
    if not paths.is_done(Step.VALIDATE_CATALOG) or paths.is_done(Step.LABEL_PAIRS):
        raise AssertionError("expected the gate verdict published and nothing downstream")
    summary = json.loads((paths.local(Step.VALIDATE_CATALOG) / "summary.json").read_text())
    if summary["passed"] or summary["products_passed"] or summary["human_labels_passed"]:
        raise AssertionError(f"expected both gates failed in the published summary, got {summary}")
    return {"fault": "the same bad catalog at the default thresholds (0 bad rows allowed)",
            "what_happened": (f"validate_catalog published passed=false and failed (AirflowFailException, no retry) naming "
                              f"{summary['n_quarantined']} bad product rows and {summary['n_human_labels_bad']} bad human "
                              "label rows with their quarantine files; label_pairs never ran"),
            "data_lost": 0}


def _column_case(work: Path, folder: Path, sql: str, column: str) -> dict:
    from dashclip_core.config import PipelineConfig
    from dashclip_core.layout import Step
    from tasks import steps
    from tasks.common import run_paths

    db = _copy_source(work, folder)
    with sqlite3.connect(db) as con:
        con.execute(sql)
    cfg_path = _config(folder, db)
    run_id = f"drill_{folder.name}"
    try:
        steps.extract_catalog(params={"config_path": str(cfg_path)}, run_id=run_id)
    except ValueError as exc:
        message = str(exc)
    else:
        raise AssertionError(f"extract_catalog accepted products without column {column!r}")
    if "'products'" not in message or repr(column) not in message:
        raise AssertionError(f"the error does not name table products and column {column!r}: {message}")
    paths = run_paths(PipelineConfig.from_file(cfg_path), run_id)
    run_dir = Path(paths.run_uri)  # a local root in this drill
    leftovers = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    if paths.is_done(Step.EXTRACT_CATALOG) or leftovers:
        raise AssertionError(f"a failed extract left {leftovers} in {run_dir}")
    return {"fault": f"products: {sql.split('products', 1)[1].strip()}",
            "what_happened": f"extract_catalog failed, nothing published: {message}", "data_lost": 0}


def _missing_column(work: Path, folder: Path) -> dict:
    return _column_case(work, folder, "ALTER TABLE products DROP COLUMN category", "category")


def _renamed_column(work: Path, folder: Path) -> dict:
    return _column_case(work, folder, "ALTER TABLE products RENAME COLUMN title TO name", "title")


def _config_case(work: Path, folder: Path) -> dict:
    from tasks.common import resolve_config

    seen, problems = [], []
    for name, text, key in CONFIG_FAULTS:
        path = folder / name
        path.write_text((ROOT / "configs" / "tiny.yaml").read_text() + "\n" + text)
        try:
            cfg = resolve_config({"config_path": str(path)})
        except Exception as exc:  # noqa: BLE001 - any error type will do, if it names the key
            seen.append(f"{key}: {type(exc).__name__}")
            if key not in str(exc) and f"'{key.split('.')[-1]}'" not in str(exc):
                problems.append(f"{name}: the error does not name {key}: {exc}")
        else:
            section, field = key.split(".")
            problems.append(f"{name}: accepted, {key} = {getattr(getattr(cfg, section), field)!r}")
    if problems:
        raise AssertionError("; ".join(problems))
    return {"fault": "config: storage.root empty, labeling.max_cost_usd '50', labeling.max_tokens yes",
            "what_happened": "each refused when the run loads its config, naming the key (" + ", ".join(seen) + ")",
            "data_lost": 0}


CASE_FUNCS = {"source": _source, "bad_rows": _bad_rows, "gate_stops": _gate_stops, "missing_column": _missing_column,
              "renamed_column": _renamed_column, "config": _config_case}


# ---------------------------------------------------------------------------------------------------- files


def _jpeg() -> bytes:
    """A 64 x 64 JPEG of noise (a flat colour would fit in its first few hundred bytes and survive the cut)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _huge_png(width: int, height: int) -> bytes:
    """A PNG of a few KB whose header claims ``width`` x ``height`` (its pixel data is cut short)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\0" * 65536)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], Path(sys.argv[2])))
