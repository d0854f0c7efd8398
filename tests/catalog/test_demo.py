"""Tests of the embedded demo catalog generator (dashclip_core/catalog/demo.py)."""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, inspect

from dashclip_core.catalog import schema
from dashclip_core.catalog.demo import (
    ANNOTATORS,
    PRODUCT_TYPES,
    demo_queries,
    generate_demo_catalog,
    query_split,
)

SMALL = {"num_products": 120, "image_size": 32}  # 3 products per type: quick enough to build several times


def _dir_digest(db_path: Path, read_table) -> dict:
    """Every table's rows and every image's bytes of a catalog folder."""
    folder = db_path.parent
    return {
        "tables": {t: read_table(db_path, t) for t in ("products", "search_log", "human_labels", "meta")},
        "images": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "images").iterdir())},
    }


# ---- structure -----------------------------------------------------------------------------------------------


def test_schema_matches_table_definitions(demo_db):
    engine = create_engine(schema.sqlite_url(demo_db))
    try:
        insp = inspect(engine)
        for table in schema.metadata.sorted_tables:
            assert [c["name"] for c in insp.get_columns(table.name)] == [c.name for c in table.columns]
        not_null = {c["name"] for c in insp.get_columns("products") if not c["nullable"]}
        assert {"product_id", "category", "aisle", "updated_at"} <= not_null
        assert insp.get_pk_constraint("products")["constrained_columns"] == ["product_id"]
    finally:
        engine.dispose()


def test_products_ids_and_fields(demo_db, read_table):
    products = read_table(demo_db, "products")
    assert len(products) == 480
    ids = [p["product_id"] for p in products]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "p00001" and ids[-1] == "p00480"
    assert {p["aisle"] for p in products} == {t.aisle for t in PRODUCT_TYPES}
    assert {p["category"] for p in products} == {t.name for t in PRODUCT_TYPES}
    for p in products:
        assert p["updated_at"].startswith("2025-")
        if p["title"] is not None:
            assert p["category"].title() in p["title"]  # "<Brand> <attributes> <Type> <size>"
            assert p["description"] and p["brand"]


def test_image_only_and_text_only_fractions(demo_db, read_table):
    products = read_table(demo_db, "products")
    image_only = [p for p in products if p["title"] is None]
    text_only = [p for p in products if p["image_uri"] is None]
    assert abs(len(image_only) - 0.12 * 480) <= 2
    assert abs(len(text_only) - 0.08 * 480) <= 2
    assert all(p["description"] is None and p["image_uri"] is not None for p in image_only)
    normal = collections.Counter(p["category"] for p in products if p["title"] and p["image_uri"])
    assert min(normal[t.name] for t in PRODUCT_TYPES) >= 3  # every type keeps a few products with both


def test_images_are_relative_pngs_that_decode(demo_db, read_table):
    for p in read_table(demo_db, "products"):
        if p["image_uri"] is None:
            continue
        assert p["image_uri"] == f"images/{p['product_id']}.png"
        with Image.open(demo_db.parent / p["image_uri"]) as im:
            im.load()
            assert im.format == "PNG" and im.size == (128, 128)


# ---- queries, search log, labels -----------------------------------------------------------------------------


def test_query_set_and_split():
    queries = demo_queries()
    assert 110 <= len(queries) <= 170
    assert {q.kind for q in queries} == {"type", "synonym", "attribute", "concept"}
    split = query_split(queries)
    n_eval = sum(s == "eval" for s in split.values())
    assert 0.15 <= n_eval / len(queries) <= 0.25
    assert any(split[q.text] == "eval" for q in queries if q.kind == "concept")
    assert split == query_split(tuple(reversed(queries)))  # depends on the text only


def test_relevance_definition():
    by_text = {q.text: q for q in demo_queries()}
    healthy = by_text["healthy snack"]
    assert healthy.relevance("granola bar") == 2
    assert healthy.relevance("potato chips") == 1
    assert healthy.relevance("dish soap") == 0
    vanilla = by_text["vanilla yogurt"]
    assert vanilla.relevance("greek yogurt", ("vanilla",)) == 2
    assert vanilla.relevance("greek yogurt", ("organic",)) == 1
    assert vanilla.relevance("butter") == 1  # same aisle
    assert vanilla.relevance("cola", ("vanilla",)) == 0
    assert by_text["plant milk"].relevance("oat milk") == 2


def test_labels_domain_and_references(demo_db, read_table):
    labels = read_table(demo_db, "human_labels")
    product_ids = {p["product_id"] for p in read_table(demo_db, "products")}
    assert {r["label"] for r in labels} == {0, 1, 2}
    assert {r["split"] for r in labels} == {"train", "eval"}
    assert {r["annotator"] for r in labels} <= set(ANNOTATORS)
    assert {r["product_id"] for r in labels} <= product_ids
    pairs = [(r["query"], r["product_id"]) for r in labels]
    assert len(set(pairs)) == len(pairs)
    per_query = collections.Counter(r["query"] for r in labels if r["split"] == "train")
    assert 8 <= min(per_query.values()) and max(per_query.values()) <= 10


def test_label_noise_is_small_and_never_jumps_two_grades(demo_db, read_table):
    category = {p["product_id"]: p["category"] for p in read_table(demo_db, "products")}
    # Attribute queries need the products' attributes, which the DB does not hold; the other kinds need only the type.
    queries = {q.text: q for q in demo_queries() if q.attribute is None}
    diffs = [r["label"] - queries[r["query"]].relevance(category[r["product_id"]])
             for r in read_table(demo_db, "human_labels") if r["query"] in queries]
    assert all(abs(d) <= 1 for d in diffs)
    assert 0.03 <= np.mean([d != 0 for d in diffs]) <= 0.13


def test_eval_queries_are_dense_held_out_and_cover_image_only_products(demo_db, read_table):
    products = {p["product_id"]: p for p in read_table(demo_db, "products")}
    labels = read_table(demo_db, "human_labels")
    eval_queries = {r["query"] for r in labels if r["split"] == "eval"}
    train_queries = {r["query"] for r in labels if r["split"] == "train"}
    assert eval_queries and not eval_queries & train_queries
    assert not eval_queries & {r["query"] for r in read_table(demo_db, "search_log")}  # held out of the log too

    kinds = {q.text: q for q in demo_queries()}
    concept_eval = [q for q in eval_queries if kinds[q].kind == "concept"]
    assert concept_eval
    for q in concept_eval:
        judged = {r["product_id"]: r["label"] for r in labels if r["query"] == q}
        # Dense: every product of a truly relevant type is judged, so unjudged pairs are truly 0.
        assert all(pid in judged for pid, p in products.items() if kinds[q].relevance(p["category"]) > 0)
        assert len(judged) >= 60
    image_only_relevant = [r for r in labels if r["query"] in concept_eval and r["label"] > 0
                           and products[r["product_id"]]["title"] is None]
    assert image_only_relevant


def test_search_log_clicks_follow_relevance(demo_db, read_table):
    category = {p["product_id"]: p["category"] for p in read_table(demo_db, "products")}
    type_queries = {q.text: q for q in demo_queries() if q.kind in ("type", "synonym")}
    totals = collections.defaultdict(lambda: [0, 0])  # grade -> [impressions, clicks]
    rows = read_table(demo_db, "search_log")
    for r in rows:
        assert 1 <= r["impressions"] and 0 <= r["purchases"] <= r["clicks"] <= r["impressions"]
        if r["query"] in type_queries:
            grade = type_queries[r["query"]].relevance(category[r["product_id"]])
            totals[grade][0] += r["impressions"]
            totals[grade][1] += r["clicks"]
    ctr = {g: c / i for g, (i, c) in totals.items()}
    assert ctr[2] > 2 * ctr[1] > 2 * ctr[0]
    per_query = collections.Counter(r["query"] for r in rows)
    assert min(per_query.values()) >= 20 and max(per_query.values()) <= 40


# ---- images carry the product type ---------------------------------------------------------------------------


def _foreground_mean_color(path: Path) -> np.ndarray:
    """Mean RGB of the pixels that differ from the background (read at the top-left corner)."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)  # (H, W, 3)
    foreground = np.linalg.norm(pixels - pixels[0, 0], axis=-1) > 40  # (H, W)
    return pixels[foreground].mean(axis=0)


def test_products_of_a_type_share_a_visual_identity(demo_db, read_table):
    rows = [p for p in read_table(demo_db, "products") if p["image_uri"]]
    colors = np.stack([_foreground_mean_color(demo_db.parent / p["image_uri"]) for p in rows])  # (N, 3)
    types = np.array([p["category"] for p in rows])
    dist = np.linalg.norm(colors[:, None] - colors[None], axis=-1)  # (N, N)
    same = types[:, None] == types[None]
    off_diagonal = ~np.eye(len(rows), dtype=bool)
    assert dist[same & off_diagonal].mean() < 0.5 * dist[~same].mean()
    # The nearest other image by colour alone is mostly of the same type (40 types: chance is 2.5%).
    nearest = np.where(off_diagonal, dist, np.inf).argmin(axis=1)
    assert (types[nearest] == types).mean() > 0.6


# ---- determinism and reuse -----------------------------------------------------------------------------------


def test_same_seed_same_catalog_and_other_seed_differs(tmp_path, read_table):
    first = generate_demo_catalog(tmp_path / "a", seed=7, **SMALL)
    again = generate_demo_catalog(tmp_path / "b", seed=7, **SMALL)
    other = generate_demo_catalog(tmp_path / "c", seed=8, **SMALL)
    assert _dir_digest(first, read_table) == _dir_digest(again, read_table)
    digest_other = _dir_digest(other, read_table)
    assert digest_other["tables"]["products"] != _dir_digest(first, read_table)["tables"]["products"]
    assert digest_other["images"] != _dir_digest(first, read_table)["images"]


def test_reuses_matching_catalog_and_rebuilds_on_new_parameters(tmp_path, read_table):
    db = generate_demo_catalog(tmp_path / "cat", **SMALL)
    stamp = db.stat().st_mtime_ns
    assert generate_demo_catalog(tmp_path / "cat", **SMALL) == db
    assert db.stat().st_mtime_ns == stamp
    (db.parent / "stale.txt").write_text("left over")

    db2 = generate_demo_catalog(tmp_path / "cat", num_products=80, image_size=32)
    assert db2 == db
    assert len(read_table(db2, "products")) == 80
    assert not (db.parent / "stale.txt").exists()  # replaced as a whole folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat"]  # no temporary folders left behind


@pytest.mark.parametrize("kwargs", [
    {"num_products": 0},
    {"image_only_fraction": 1.2},
    {"image_only_fraction": 0.6, "text_only_fraction": 0.5},
    {"image_size": 8},
])
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        generate_demo_catalog(tmp_path / "cat", **kwargs)
