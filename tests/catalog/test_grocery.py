"""Tests of the GroceryStoreDataset importer (dashclip_core/catalog/grocery.py)."""

from __future__ import annotations

import collections
import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from PIL import Image

from dashclip_core.catalog.grocery import CLASSES_HEADER, GroceryLayoutError, _read_classes, import_grocery
from dashclip_core.config import PROJECT_ROOT

REAL_ROOT = Path(os.environ.get("DASHCLIP_GROCERY_ROOT", PROJECT_ROOT.parent / "shared" / "data" / "grocery_store"))
PER_CLASS = 2


def _split_lines(root: Path, split: str) -> list[list[str]]:
    text = (root / "dataset" / f"{split}.txt").read_text().splitlines()
    return [[x.strip() for x in line.split(",")] for line in text if line.strip()]


# ---- the real dataset ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not REAL_ROOT.is_dir():
        pytest.skip(f"GroceryStoreDataset not present at {REAL_ROOT}")
    return import_grocery(REAL_ROOT, tmp_path_factory.mktemp("grocery") / "catalog", products_per_class=PER_CLASS)


def test_real_row_counts(real_db, read_table):
    products = read_table(real_db, "products")
    with (REAL_ROOT / "dataset" / "classes.csv").open(newline="") as f:
        n_classes = sum(1 for _ in csv.DictReader(f))
    expected = {"iconic": n_classes}
    for split in ("train", "val"):
        per_class = collections.Counter(fields[1] for fields in _split_lines(REAL_ROOT, split))
        expected[split] = sum(min(PER_CLASS, n) for n in per_class.values())
    got = collections.Counter(p["product_id"].split("-")[1] for p in products)
    assert got == expected
    assert len({p["product_id"] for p in products}) == len(products)
    assert read_table(real_db, "search_log") == []


def test_real_products_point_into_the_dataset(real_db, read_table):
    for p in read_table(real_db, "products"):
        uri = Path(p["image_uri"])
        assert uri.is_absolute() and uri.is_file(), p
        assert REAL_ROOT.resolve() in uri.parents  # never copied
        assert p["title"] == p["category"].replace("-", " ")
        assert p["description"]  # from the description files or index.csv
        assert p["brand"] is None


def _expected_label(query: str, category: str, aisle: str, classes: dict[str, str]) -> int:
    """The taxonomy rule, written independently of the importer: a query names a fine class, a coarse class, or
    "<word> <coarse class>"; its target fine classes are 2, the rest of its coarse class 1, everything else 0."""
    def text(name: str) -> str:
        return name.replace("-", " ").lower()

    fine = [f for f in classes if text(f) == query]
    if fine:
        targets, coarse = set(fine), classes[fine[0]]
    else:
        matches = [c for c in set(classes.values()) if query == text(c) or query.endswith(" " + text(c))]
        coarse = max(matches, key=lambda c: len(text(c)))  # "sour milk" is Sour-Milk, not "sour" + Milk
        word = query[: -len(text(coarse))].strip()
        targets = {f for f, c in classes.items() if c == coarse and (not word or word in text(f).split())}
    return 2 if category in targets else int(aisle == coarse)


def test_real_labels_follow_the_taxonomy(real_db, read_table):
    with (REAL_ROOT / "dataset" / "classes.csv").open(newline="") as f:
        classes = {row["Class Name (str)"]: row["Coarse Class Name (str)"] for row in csv.DictReader(f)}
    products = {p["product_id"]: p for p in read_table(real_db, "products")}
    labels = read_table(real_db, "human_labels")
    assert {r["label"] for r in labels} == {0, 1, 2}
    assert {r["annotator"] for r in labels} == {"taxonomy"}
    for r in labels:
        p = products[r["product_id"]]
        assert r["label"] == _expected_label(r["query"], p["category"], p["aisle"], classes), (r, p)
    queries = {r["query"] for r in labels}
    assert {"golden delicious", "apple", "oat milk", "juice", "vanilla yoghurt"} <= queries


def test_real_eval_queries_are_held_out_and_dense_over_the_catalog(real_db, read_table):
    products = read_table(real_db, "products")
    val_ids = {p["product_id"] for p in products if p["product_id"].startswith("g-val-")}
    labels = read_table(real_db, "human_labels")
    eval_q = collections.defaultdict(set)
    train_q = collections.defaultdict(set)
    for r in labels:
        (eval_q if r["split"] == "eval" else train_q)[r["query"]].add(r["product_id"])
    assert eval_q and not eval_q.keys() & train_q.keys()
    assert 0.15 <= len(eval_q) / (len(eval_q) + len(train_q)) <= 0.25
    all_ids = {p["product_id"] for p in products}
    assert all(judged == all_ids for judged in eval_q.values())
    assert all(not pids & val_ids and 8 <= len(pids) <= 10 for pids in train_q.values())
    assert all(any(r["label"] == 2 for r in labels if r["query"] == q) for q in eval_q)


def test_real_import_is_reused(real_db):
    stamp = real_db.stat().st_mtime_ns
    assert import_grocery(REAL_ROOT, real_db.parent, products_per_class=PER_CLASS) == real_db
    assert real_db.stat().st_mtime_ns == stamp


# ---- a small fake layout -------------------------------------------------------------------------------------

FAKE_CLASSES = [("Golden-Delicious", 0, "Apple", 0, "Fruit"), ("Granny-Smith", 1, "Apple", 0, "Fruit"),
                ("Oatly-Oat-Milk", 2, "Oat-Milk", 1, "Packages")]


def _fake_layout(root: Path, photos_per_class: int = 2, classes: Sequence[tuple[str, int, str, int, str]] = FAKE_CLASSES,
                 descriptions: Mapping[str, str] | None = None) -> Path:
    """A GroceryStoreDataset-shaped folder with tiny JPEGs; Granny-Smith's description lives only in index.csv.

    ``descriptions`` replaces the default texts ("About <name>." in the file, "Index text for <name>." in index.csv).
    A class named like its coarse class has no <Fine> folder in its iconic path, as in the real dataset (Banana).
    """
    descriptions = descriptions or {}
    dataset = root / "dataset"
    rows = [",".join(CLASSES_HEADER)]
    index = [["class_name", "description"]]
    for name, cid, coarse, coarse_id, category in classes:
        rel = f"iconic-images-and-descriptions/{category}/{coarse}" + ("" if name == coarse else f"/{name}")
        (dataset / rel).mkdir(parents=True)
        Image.new("RGB", (8, 8), (cid * 60 % 256, 100, 50)).save(dataset / rel / f"{name}_Iconic.jpg")
        if name != "Granny-Smith":
            (dataset / rel / f"{name}_Description.txt").write_text(descriptions.get(name, f"About {name}.") + "\n")
        index.append([name, descriptions.get(name, f"Index text for {name}.")])
        rows.append(f"{name},{cid},{coarse},{coarse_id},/{rel}/{name}_Iconic.jpg,/{rel}/{name}_Description.txt")
        for split in ("train", "val"):
            folder = dataset / split / category / coarse / name
            folder.mkdir(parents=True)
            for k in range(1, photos_per_class + 1):
                Image.new("RGB", (8, 8), (cid * 60 % 256, 50, 100)).save(folder / f"{name}_{k:03d}.jpg")
    (dataset / "classes.csv").write_text("\n".join(rows))
    with (root / "index.csv").open("w", newline="") as f:
        csv.writer(f).writerows(index)
    for split in ("train", "val"):
        lines = [f"{split}/{category}/{coarse}/{name}/{name}_{k:03d}.jpg, {cid}, {coarse_id}"
                 for name, cid, coarse, coarse_id, category in classes for k in range(1, photos_per_class + 1)]
        (dataset / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_fake_layout_imports(tmp_path, read_table):
    root = _fake_layout(tmp_path / "grocery", photos_per_class=3)
    db = import_grocery(root, tmp_path / "catalog", products_per_class=2)
    products = {p["product_id"]: p for p in read_table(db, "products")}
    assert len(products) == 3 * 2 + 3 * 2 + 3
    assert products["g-train-0001"]["title"] == "Golden Delicious"
    assert products["g-train-0001"]["aisle"] == "Apple"
    assert products["g-train-0001"]["description"] == "About Golden-Delicious."
    assert products["g-train-0003"]["description"] == "Index text for Granny-Smith."  # index.csv fallback
    assert products["g-iconic-0003"]["category"] == "Oatly-Oat-Milk"
    assert products["g-train-0002"]["image_uri"].endswith("Golden-Delicious_002.jpg")  # first N per class


def test_category_of_single_class_coarse_classes(tmp_path):
    """A coarse class with one fine class of the same name has no <Fine> folder in its iconic path (Banana)."""
    root = _fake_layout(tmp_path / "grocery", classes=[*FAKE_CLASSES, ("Banana", 3, "Banana", 2, "Fruit")])
    assert {c.name: c.category for c in _read_classes(root).values()} == {
        "Golden-Delicious": "Fruit", "Granny-Smith": "Fruit", "Oatly-Oat-Milk": "Packages", "Banana": "Fruit"}


def test_missing_image_names_the_file_and_line(tmp_path):
    root = _fake_layout(tmp_path / "grocery")
    train_txt = root / "dataset" / "train.txt"
    lines = train_txt.read_text().splitlines()
    lines[1] = "train/Fruit/Apple/Golden-Delicious/Golden-Delicious_999.jpg, 0, 0"
    train_txt.write_text("\n".join(lines) + "\n")
    with pytest.raises(GroceryLayoutError, match=r"train\.txt: line 2: image .*Golden-Delicious_999\.jpg"):
        import_grocery(root, tmp_path / "catalog")
    assert not (tmp_path / "catalog").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grocery"]  # no temporary folder left behind


def test_inconsistent_ids_and_missing_layout_are_reported(tmp_path):
    root = _fake_layout(tmp_path / "grocery")
    val_txt = root / "dataset" / "val.txt"
    lines = val_txt.read_text().splitlines()
    lines[0] = lines[0].rsplit(",", 1)[0] + ", 7"
    val_txt.write_text("\n".join(lines) + "\n")
    with pytest.raises(GroceryLayoutError, match=r"val\.txt: line 1: coarse id '7'"):
        import_grocery(root, tmp_path / "catalog")
    with pytest.raises(GroceryLayoutError, match="dataset"):
        import_grocery(tmp_path / "nowhere", tmp_path / "catalog")
