"""Tests of the GroceryStoreDataset importer (dashclip_core/catalog/grocery.py)."""

from __future__ import annotations

import collections
import csv
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from PIL import Image

from dashclip_core.catalog.grocery import (
    ATTRIBUTES,
    CLASSES_HEADER,
    EVAL_FRACTION,
    MAX_EVAL_QUERIES,
    MAX_PER_FACET,
    QUERY_KINDS,
    GroceryClass,
    GroceryLayoutError,
    GroceryQuery,
    _paraphrases,
    _read_classes,
    grocery_queries,
    import_grocery,
)
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


@pytest.fixture(scope="module")
def real_queries() -> dict[str, GroceryQuery]:
    """The query set the importer derives from the real classes, by text."""
    if not REAL_ROOT.is_dir():
        pytest.skip(f"GroceryStoreDataset not present at {REAL_ROOT}")
    classes = sorted(_read_classes(REAL_ROOT.resolve()).values(), key=lambda c: c.class_id)
    return {q.text: q for q in grocery_queries(classes)}


def _real_classes() -> dict[str, str]:
    with (REAL_ROOT / "dataset" / "classes.csv").open(newline="") as f:
        return {row["Class Name (str)"]: row["Coarse Class Name (str)"] for row in csv.DictReader(f)}


def _text(name: str) -> str:
    return name.replace("-", " ").lower()


def test_real_labels_are_the_query_grades(real_db, real_queries, read_table):
    products = {p["product_id"]: p for p in read_table(real_db, "products")}
    labels = read_table(real_db, "human_labels")
    assert {r["label"] for r in labels} == {0, 1, 2}
    assert {r["annotator"] for r in labels} == {"taxonomy"}
    assert {r["query"] for r in labels} == real_queries.keys()  # every derived query is labelled
    pairs = collections.Counter((r["query"], r["product_id"]) for r in labels)
    assert max(pairs.values()) == 1  # query texts unique: no pair judged twice
    for r in labels:
        assert r["label"] == real_queries[r["query"]].relevance(products[r["product_id"]]["category"]), r


def test_real_taxonomy_queries_follow_the_taxonomy(real_queries):
    """The rule for titles and coarse names, written independently of the importer: a fine title targets its class
    (2) and the rest of its coarse class (1); a coarse name targets all of its classes."""
    classes = _real_classes()
    fine = [q for q in real_queries.values() if q.kind == "fine"]
    coarse = [q for q in real_queries.values() if q.kind == "coarse"]
    assert {q.text for q in fine} == {_text(f) for f in classes}
    assert {q.text for q in coarse} == {_text(c) for c in classes.values()} - {_text(f) for f in classes}
    for q in fine:
        (name,) = [f for f in classes if _text(f) == q.text]
        assert q.high == {name}
        assert q.related == {f for f, c in classes.items() if c == classes[name]} - {name}
    for q in coarse:
        assert q.high == {f for f, c in classes.items() if _text(c) == q.text} and not q.related


def _evidence_regex(words: Sequence[str]) -> re.Pattern:
    """Independent of the importer's tokenizer: a word starting with any evidence phrase (final consonant+y may be
    "i": pastry -> pastries), hyphens as spaces."""
    def one(w: str) -> str:
        head, y = (w[:-1], "[yi]") if re.search(r"[^aeiou]y$", w) else (w, "")
        return re.escape(head).replace(r"\ ", r"[\s-]+") + y
    return re.compile(r"\b(?:" + "|".join(map(one, words)) + r")", re.IGNORECASE)


def test_real_description_queries_are_mined_from_the_descriptions(real_queries):
    """Each description query names a coarse class or category word; its grade-2 classes all carry an evidence word
    of an attribute that has the query's wording; grade 1 = the rest of that coarse class or category; never all."""
    products = {}
    with (REAL_ROOT / "index.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            products[row["class_name"]] = row
    described = [q for q in real_queries.values() if q.kind == "description"]
    assert len(described) >= 40
    assert {q.facet for q in described} == {"taste", "texture", "colour", "fat", "diet", "origin", "use"}
    assert max(collections.Counter(q.facet for q in described).values()) <= MAX_PER_FACET
    for q in described:
        groups = {**{_text(r["coarse_class_name"]): r["coarse_class_name"] for r in products.values()},
                  **{r["category"].lower(): r["category"] for r in products.values()}}
        attrs, noun = [], None
        for attr in ATTRIBUTES:
            for template in attr.templates:
                prefix, _, suffix = template.partition("{noun}")
                if q.text.startswith(prefix) and q.text.endswith(suffix):
                    middle = q.text[len(prefix):len(q.text) - len(suffix)]
                    for g, name in groups.items():  # "apples" for baking names the coarse class Apple
                        if middle in (g, g + "s", g + "es"):
                            attrs.append(attr)
                            noun = name
        assert attrs and noun, q
        members = {n for n, r in products.items() if noun in (r["coarse_class_name"], r["category"])}
        assert q.high and q.high < members, q
        assert q.related == members - q.high, q
        pattern = _evidence_regex([w for a in attrs for w in a.evidence])
        for name in q.high:
            assert pattern.search(f"{_text(name)} {products[name]['description']}"), (q.text, name)


def test_real_shopper_queries(real_queries):
    qs = real_queries
    titles = {_text(f) for f in _real_classes()}
    paraphrases = [q for q in qs.values() if q.kind == "paraphrase"]
    assert len(paraphrases) >= 30 and not {q.text for q in paraphrases} & titles
    assert qs["granny smith apples"].high == {"Granny-Smith"}
    assert qs["bananas"].high == {"Banana"}
    # brand words dropped: the shopper's "apple juice" is every brand's apple juice
    assert qs["apple juice"].high == {"Bravo-Apple-Juice", "God-Morgon-Apple-Juice", "Tropicana-Apple-Juice"}
    assert qs["smooth juice"].high == {"Tropicana-Juice-Smooth"}  # coarse noun moved to the end
    assert qs["plant based milk"].kind == "aisle"
    assert qs["plant based milk"].high == {"Oatly-Oat-Milk", "Alpro-Fresh-Soy-Milk", "Alpro-Shelf-Soy-Milk"}
    assert qs["plant based milk"].relevance("Oatly-Natural-Oatghurt") == 1
    assert qs["plant based milk"].relevance("Arla-Standard-Milk") == 0
    assert len(qs["fruit"].high) == 28  # singleton classes (Banana) have a category too
    assert qs["sour apple"].high == {"Granny-Smith"}  # "a clear acidity in the flavor"
    assert qs["skimmed milk"].high == {"Arla-Ecological-Medium-Fat-Milk", "Arla-Lactose-Medium-Fat-Milk",
                                       "Arla-Medium-Fat-Milk", "Garant-Ecological-Medium-Fat-Milk"}
    assert "mild juice" not in qs or "Tropicana-Apple-Juice" not in qs["mild juice"].high  # "Mildly pasteurized"
    assert 200 <= len(qs) <= 400


def test_real_every_kind_is_held_out(real_db, real_queries, read_table):
    eval_q = {r["query"] for r in read_table(real_db, "human_labels") if r["split"] == "eval"}
    kinds = collections.Counter(real_queries[t].kind for t in eval_q)
    assert set(kinds) == set(QUERY_KINDS), kinds
    assert len(eval_q) <= MAX_EVAL_QUERIES
    for kind in QUERY_KINDS:  # ~EVAL_FRACTION of every kind, not just overall
        n = sum(q.kind == kind for q in real_queries.values())
        assert kinds[kind] == max(1, round(EVAL_FRACTION * n)), (kind, kinds[kind], n)


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


# ---- shopper queries on hand-made classes --------------------------------------------------------------------

# (name, id, coarse, coarse id, category) and a description each. Every apple is sweet (no "sweet apple": it would
# not discriminate), one apple is crunchy and for baking, the lemon is sour, the juices test the inflection limits.
SHOP_CLASSES = [("Crispy-Red", 0, "Apple", 0, "Fruit"), ("Soft-Green", 1, "Apple", 0, "Fruit"),
                ("Plain-Apple", 2, "Apple", 0, "Fruit"), ("Juicy-Pear", 3, "Pear", 1, "Fruit"),
                ("Hard-Pear", 4, "Pear", 1, "Fruit"), ("Lemon", 5, "Lemon", 2, "Fruit"),
                ("Brand-Apple-Juice", 6, "Juice", 3, "Packages"), ("Brand-Orange-Juice", 7, "Juice", 3, "Packages"),
                ("Brand-Juice-Smooth", 9, "Juice", 3, "Packages")]
SHOP_DESCRIPTIONS = {
    "Crispy-Red": "A crunchy, sweet apple. Great for baking pies.",
    "Soft-Green": "A soft and sweet apple with a mild taste.",
    "Plain-Apple": "A sweet apple.",
    "Juicy-Pear": "Juicier than other pears, and sweet.",
    "Hard-Pear": "A pear to store.",
    "Lemon": "Lemon has a sour taste.",
    "Brand-Apple-Juice": "Apple juice without pulp. Mildly pasteurized.",
    "Brand-Orange-Juice": "Orange juice with pulp that softens any breakfast table.",
    "Brand-Juice-Smooth": "A smooth juice for the breakfast table.",
}


def _shop_classes() -> list[GroceryClass]:
    return [GroceryClass(name, cid, coarse, coarse_id, category, Path(f"/nowhere/{name}.jpg"), SHOP_DESCRIPTIONS[name])
            for name, cid, coarse, coarse_id, category in SHOP_CLASSES]


@pytest.fixture(scope="module")
def shop_queries() -> dict[str, GroceryQuery]:
    queries = grocery_queries(_shop_classes())
    assert len({q.text for q in queries}) == len(queries)  # unique texts
    return {q.text: q for q in queries}


def _one_of(queries: Mapping[str, GroceryQuery], *texts: str) -> GroceryQuery:
    """The query among synonym wordings (the importer picks one per noun by hash)."""
    (q,) = [queries[t] for t in texts if t in queries]
    return q


def _grades(q: GroceryQuery) -> dict[str, int]:
    return {name: q.relevance(name) for name, *_ in SHOP_CLASSES}


def test_description_attribute_grades_its_carriers(shop_queries):
    crunchy = _one_of(shop_queries, "crunchy apple", "crisp apple")
    assert (crunchy.kind, crunchy.facet) == ("description", "texture")
    assert _grades(crunchy) == {"Crispy-Red": 2, "Soft-Green": 1, "Plain-Apple": 1, "Juicy-Pear": 0, "Hard-Pear": 0,
                                "Lemon": 0, "Brand-Apple-Juice": 0, "Brand-Orange-Juice": 0, "Brand-Juice-Smooth": 0}
    # category level: 2 = carriers of the category, 1 = the rest of the category
    crunchy_fruit = _one_of(shop_queries, "crunchy fruit", "crisp fruit")
    assert _grades(crunchy_fruit) == {"Crispy-Red": 2, "Soft-Green": 1, "Plain-Apple": 1, "Juicy-Pear": 1,
                                      "Hard-Pear": 1, "Lemon": 1, "Brand-Apple-Juice": 0, "Brand-Orange-Juice": 0,
                                      "Brand-Juice-Smooth": 0}
    assert _grades(shop_queries["apples for baking"])["Crispy-Red"] == 2  # use words, plural noun
    assert shop_queries["juicy pear"].high == {"Juicy-Pear"}  # "Juicier" is an inflection of juicy
    assert shop_queries["sweet fruit"].high == {"Crispy-Red", "Soft-Green", "Plain-Apple", "Juicy-Pear"}
    assert _one_of(shop_queries, "sour fruit", "tangy fruit").high == {"Lemon"}
    assert _one_of(shop_queries, "juice without pulp", "pulp free juice").high == {"Brand-Apple-Juice"}
    assert shop_queries["juice with pulp"].high == {"Brand-Orange-Juice"}  # "with pulp" is not "without pulp"


def test_absent_and_non_discriminating_attributes_make_no_query(shop_queries):
    texts = " | ".join(shop_queries)
    for word in ("bitter", "exotic", "creamy", "organic", "swedish", "for desserts", "for salads"):
        assert word not in texts  # in no title or description
    assert "sweet apple" not in shop_queries  # every apple is sweet: the whole coarse class
    assert "sour lemon" not in shop_queries and "tangy lemon" not in shop_queries  # single-class coarse
    assert "mild juice" not in shop_queries  # "Mildly pasteurized" is not a mild taste
    assert "soft juice" not in shop_queries  # "softens" is not soft
    assert "mild apple" in shop_queries and "soft apple" in shop_queries  # ... while the plain words count


def test_paraphrases_differ_from_titles(shop_queries):
    titles = {name.replace("-", " ").lower() for name, *_ in SHOP_CLASSES}
    paraphrases = {t: q for t, q in shop_queries.items() if q.kind == "paraphrase"}
    assert not paraphrases.keys() & titles
    # also before the query set's dedupe (where a fine query of the same text would win anyway)
    raw = _paraphrases(_shop_classes())
    assert raw and not {q.text for q in raw} & titles
    assert {q.text for q in raw} >= {"crispy red apple", "plain apples", "lemons", "smooth juice"}
    assert paraphrases["crispy red apple"].high == {"Crispy-Red"}  # coarse noun added
    assert paraphrases["crispy red apples"].high == {"Crispy-Red"}  # and the plural
    assert paraphrases["lemons"].high == {"Lemon"}
    # "brand" is never written in lower case in a description: a brand word, dropped; the coarse noun goes last
    assert paraphrases["smooth juice"].high == {"Brand-Juice-Smooth"}
    assert not any("brand" in t for t in paraphrases)
    assert all(q.relevance(n) in (0, 1, 2) for q in shop_queries.values() for n, *_ in SHOP_CLASSES)


def test_fake_import_labels_description_queries(tmp_path, read_table):
    classes = [*SHOP_CLASSES, ("Banana", 8, "Banana", 4, "Fruit")]
    descriptions = {**SHOP_DESCRIPTIONS, "Banana": "An ecologically grown banana."}
    db = import_grocery(_fake_layout(tmp_path / "grocery", classes=classes, descriptions=descriptions),
                        tmp_path / "catalog")
    products = {p["product_id"]: p for p in read_table(db, "products")}
    labels = read_table(db, "human_labels")
    assert {r["label"] for r in labels} <= {0, 1, 2}
    by_query = collections.defaultdict(dict)
    for r in labels:
        by_query[r["query"]][r["product_id"]] = r["label"]
    assert max(collections.Counter((r["query"], r["product_id"]) for r in labels).values()) == 1
    crunchy = next(t for t in ("crunchy apple", "crisp apple") if t in by_query)
    expected = {"Crispy-Red": 2, "Soft-Green": 1, "Plain-Apple": 1}
    for pid, label in by_query[crunchy].items():
        assert label == expected.get(products[pid]["category"], 0), (pid, label)
    assert {products[pid]["category"] for pid, g in by_query[crunchy].items() if g == 2} == {"Crispy-Red"}
    # the Banana's iconic path has no <Fine> folder; it still belongs to Fruit, and "ecologically" is organic
    assert all(g == (2 if products[pid]["category"] == "Banana" else 1 if products[pid]["aisle"] in
                     ("Apple", "Pear", "Lemon") else 0) for pid, g in by_query["organic fruit"].items())
    assert all(g == 2 for pid, g in by_query["fruit"].items() if products[pid]["category"] == "Banana")
