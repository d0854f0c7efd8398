"""Import the GroceryStoreDataset (Klasson et al., WACV 2019) as a catalog DB.

The original layout under ``root`` is read (``index.csv`` only supplies descriptions, see below)::

    dataset/classes.csv        fine class name, id, coarse class name, id, iconic image path, description path
    dataset/train.txt          "<path>, <fine id>, <coarse id>" per line, paths relative to dataset/
    dataset/val.txt
    dataset/train/..., dataset/val/...                 photos
    dataset/iconic-images-and-descriptions/<Category>/<Coarse>/<Fine>/<Fine>_Iconic.jpg (+ _Description.txt)

Every photo of train and val becomes one product ("g-train-0001", "g-val-0001"), and so does every iconic image
("g-iconic-0001"); ``image_uri`` is the absolute path into the dataset (images are never copied). Title = the fine
class name with dashes as spaces ("Golden Delicious"), description = the class description, category = fine class,
aisle = coarse class. When a ``_Description.txt`` named by classes.csv is absent (the copy on our machines ships
the texts only in ``index.csv``), the description comes from the ``description`` column of ``root/index.csv``.

The dataset has no search log (the table is written empty). ``human_labels`` follow the class taxonomy, which is
human annotation: for each query (a fine class title, a coarse class name, or "<attribute word> <coarse class>"),
the query's target fine classes are 2, the other fine classes of the same coarse class 1, everything else 0.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dashclip_core.catalog.schema import DB_FILENAME, build_catalog_dir, write_catalog_db

logger = logging.getLogger(__name__)

GENERATOR = "dashclip_core.catalog.grocery"
GENERATOR_VERSION = "2"  # bump whenever the imported content changes, so existing catalogs get rebuilt
SPLITS = ("train", "val")
ANNOTATOR = "taxonomy"  # labels derive from the dataset's human class annotations
UPDATED_AT = "2019-01-07T00:00:00+00:00"  # the dataset's publication (WACV 2019); the photos carry no timestamps
EVAL_FRACTION = 0.2  # share of the queries held out as 'eval' (judged densely against every product)
TRAIN_LABELS_PER_QUERY = {2: 4, 1: 3, 0: 3}  # mixed sample of train-split/iconic products per 'train' query

CLASSES_HEADER = ("Class Name (str)", "Class ID (int)", "Coarse Class Name (str)", "Coarse Class ID (int)",
                  "Iconic Image Path (str)", "Product Description Path (str)")
# Words of fine class titles that make "<word> <coarse>" a sensible shopper query ("vanilla yoghurt", "red pepper").
# Colours only for vegetables: on fruit and packages they describe a variety or a brand rather than the product.
FLAVOUR_WORDS = ("ecological", "lactose", "vanilla", "natural", "strawberry", "blueberry", "fresh", "shelf",
                 "apple", "orange", "grapefruit", "mandarin")
COLOUR_WORDS = ("red", "green", "yellow", "orange")


class GroceryLayoutError(ValueError):
    """The dataset folder does not have the expected layout; the message names the file and line."""


@dataclass(frozen=True)
class GroceryClass:
    """One fine class of ``classes.csv``."""

    name: str  # e.g. "Golden-Delicious"
    class_id: int
    coarse_name: str  # e.g. "Apple"
    coarse_id: int
    category: str  # "Fruit", "Vegetables" or "Packages" (from the iconic image path)
    iconic_path: Path
    description: str | None

    @property
    def title(self) -> str:
        return self.name.replace("-", " ")


@dataclass(frozen=True)
class GroceryQuery:
    """A query derived from the class taxonomy.

    Args:
        text: the query string.
        kind: "fine" (a class title), "coarse" (a coarse class name) or "attribute" ("vanilla yoghurt").
        high: fine class names graded 2.
        coarse: coarse class whose other fine classes are graded 1.
    """

    text: str
    kind: str
    high: frozenset[str]
    coarse: str

    def relevance(self, fine_name: str, coarse_name: str) -> int:
        """Grade of a product of fine class ``fine_name`` / coarse class ``coarse_name`` (0, 1 or 2)."""
        if fine_name in self.high:
            return 2
        return 1 if coarse_name == self.coarse else 0


@dataclass(frozen=True)
class _Photo:
    split: str
    path: Path  # absolute
    cls: GroceryClass


# ---- reading the layout --------------------------------------------------------------------------------------


def _dataset_path(dataset: Path, rel: str) -> Path:
    """classes.csv writes paths with a leading slash ("/iconic-images-and-descriptions/...") relative to dataset/."""
    return dataset / rel.strip().lstrip("/")


def _read_index_descriptions(root: Path) -> dict[str, str]:
    index = root / "index.csv"
    if not index.is_file():
        return {}
    with index.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"class_name", "description"} - set(reader.fieldnames or ())
        if missing:
            raise GroceryLayoutError(f"{index}: line 1: missing columns {sorted(missing)}")
        return {row["class_name"]: row["description"].strip() for row in reader if row["description"].strip()}


def _read_classes(root: Path) -> dict[int, GroceryClass]:
    dataset = root / "dataset"
    path = dataset / "classes.csv"
    if not path.is_file():
        raise GroceryLayoutError(f"{path}: file not found; expected the GroceryStoreDataset layout under {root}")
    with path.open(newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f))
    if not lines or tuple(h.strip() for h in lines[0]) != CLASSES_HEADER:
        raise GroceryLayoutError(f"{path}: line 1: header {lines[0] if lines else []} != expected {list(CLASSES_HEADER)}")
    index_descriptions: dict[str, str] | None = None  # read index.csv only when a description file is missing
    classes: dict[int, GroceryClass] = {}
    for lineno, fields in enumerate(lines[1:], start=2):
        if not fields or not "".join(fields).strip():
            continue
        if len(fields) != len(CLASSES_HEADER):
            raise GroceryLayoutError(f"{path}: line {lineno}: expected {len(CLASSES_HEADER)} fields, got {fields}")
        name, class_id, coarse_name, coarse_id, iconic, description_rel = (x.strip() for x in fields)
        try:
            class_id_i, coarse_id_i = int(class_id), int(coarse_id)
        except ValueError:
            raise GroceryLayoutError(f"{path}: line {lineno}: class ids must be integers, got "
                                     f"{class_id!r} / {coarse_id!r}") from None
        if class_id_i in classes:
            raise GroceryLayoutError(f"{path}: line {lineno}: duplicate class id {class_id_i}")
        iconic_path = _dataset_path(dataset, iconic)
        if not iconic_path.is_file():
            raise GroceryLayoutError(f"{path}: line {lineno}: iconic image {iconic!r} of class {name} not found "
                                     f"at {iconic_path}")
        description_path = _dataset_path(dataset, description_rel)
        if description_path.is_file():
            description: str | None = description_path.read_text(encoding="utf-8").strip() or None
        else:
            if index_descriptions is None:
                index_descriptions = _read_index_descriptions(root)
            description = index_descriptions.get(name)
            if description is None:
                logger.warning("%s: line %d: no description for class %s (neither %s nor index.csv has one)",
                               path, lineno, name, description_path)
        # iconic path: /iconic-images-and-descriptions/<Category>/<Coarse>/[<Fine>/]<file> (no <Fine> folder when
        # the coarse class has a single fine class of the same name: .../Fruit/Banana/Banana_Iconic.jpg)
        parts = Path(iconic.strip().lstrip("/")).parts
        category = parts[1] if len(parts) >= 4 else ""
        classes[class_id_i] = GroceryClass(name, class_id_i, coarse_name, coarse_id_i, category, iconic_path.resolve(),
                                           description)
    if not classes:
        raise GroceryLayoutError(f"{path}: no classes listed")
    return classes


def _read_split(root: Path, split: str, classes: dict[int, GroceryClass], products_per_class: int) -> list[_Photo]:
    """Read ``dataset/<split>.txt``, check every line, and keep the first ``products_per_class`` photos per class."""
    dataset = root / "dataset"
    path = dataset / f"{split}.txt"
    if not path.is_file():
        raise GroceryLayoutError(f"{path}: file not found; expected the GroceryStoreDataset layout under {root}")
    photos: list[_Photo] = []
    kept: dict[int, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = [x.strip() for x in line.split(",")]
        if len(fields) != 3:
            raise GroceryLayoutError(f"{path}: line {lineno}: expected '<path>, <fine id>, <coarse id>', got {line!r}")
        rel, fine_id, coarse_id = fields
        try:
            cls = classes[int(fine_id)]
        except (ValueError, KeyError):
            raise GroceryLayoutError(f"{path}: line {lineno}: fine class id {fine_id!r} is not in classes.csv") from None
        if coarse_id != str(cls.coarse_id):
            raise GroceryLayoutError(f"{path}: line {lineno}: coarse id {coarse_id!r} != {cls.coarse_id} given for "
                                     f"class {cls.name} in classes.csv")
        image = dataset / rel
        if not image.is_file():
            raise GroceryLayoutError(f"{path}: line {lineno}: image {rel!r} not found at {image}")
        if products_per_class and kept.get(cls.class_id, 0) >= products_per_class:
            continue
        kept[cls.class_id] = kept.get(cls.class_id, 0) + 1
        photos.append(_Photo(split, image.resolve(), cls))
    if not photos:
        raise GroceryLayoutError(f"{path}: no images listed")
    return photos


# ---- queries and labels --------------------------------------------------------------------------------------


def grocery_queries(classes: Sequence[GroceryClass]) -> tuple[GroceryQuery, ...]:
    """Queries derived from the class taxonomy, deduplicated by text (first definition wins).

    Returns:
        One "fine" query per class (its title lower-cased), one "coarse" query per coarse class ("oat milk"),
        and "attribute" queries "<word> <coarse>" for the words of ``FLAVOUR_WORDS`` (packages) and
        ``COLOUR_WORDS`` (vegetables) that occur in some but not all fine class titles of a coarse class.
    """
    by_coarse: dict[str, list[GroceryClass]] = {}
    for c in classes:
        by_coarse.setdefault(c.coarse_name, []).append(c)
    queries: dict[str, GroceryQuery] = {}

    def add(q: GroceryQuery) -> None:
        queries.setdefault(q.text, q)

    for c in classes:
        add(GroceryQuery(c.title.lower(), "fine", frozenset([c.name]), c.coarse_name))
    for coarse, members in by_coarse.items():
        add(GroceryQuery(coarse.replace("-", " ").lower(), "coarse", frozenset(m.name for m in members), coarse))
    for coarse, members in by_coarse.items():
        coarse_text = coarse.replace("-", " ").lower()
        words = {"Packages": FLAVOUR_WORDS, "Vegetables": COLOUR_WORDS}.get(members[0].category, ())
        for word in words:
            having = [m.name for m in members if word in m.title.lower().split()]
            if having and len(having) < len(members) and word not in coarse_text.split():
                add(GroceryQuery(f"{word} {coarse_text}", "attribute", frozenset(having), coarse))
    return tuple(queries.values())


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def _eval_queries(queries: Sequence[GroceryQuery], val: Sequence[_Photo]) -> set[str]:
    """The ``EVAL_FRACTION`` of all queries, picked by SHA-1 of the text among queries with a grade-2 val photo.

    Only queries that val can answer are eligible: with no relevant product NDCG is undefined.
    """
    val_classes = {p.cls.name for p in val}
    eligible = sorted((q.text for q in queries if q.high & val_classes), key=_stable_hash)
    return set(eligible[:round(EVAL_FRACTION * len(queries))])


def _labels(queries: Sequence[GroceryQuery], eval_queries: set[str], train_pool: Sequence[tuple[str, GroceryClass]],
            all_products: Sequence[tuple[str, GroceryClass]], seed: int) -> list[dict]:
    """Train queries: a mixed sample of ``TRAIN_LABELS_PER_QUERY`` from ``train_pool`` (topped up to 10 from any
    grade when one runs short); eval queries: every product of the catalog. Retrieval ranks the whole catalog,
    so an unjudged photo of the right class would otherwise count as irrelevant."""
    rng = random.Random(f"grocery-labels-{seed}")
    rows: list[dict] = []
    for q in queries:
        if q.text in eval_queries:
            judged = [(pid, c, "eval") for pid, c in all_products]
        else:
            grades = [q.relevance(c.name, c.coarse_name) for _, c in train_pool]
            chosen: list[int] = []
            for g, k in TRAIN_LABELS_PER_QUERY.items():
                pool = [i for i, gi in enumerate(grades) if gi == g]
                chosen += rng.sample(pool, min(k, len(pool)))
            taken = set(chosen)
            rest = [i for i in range(len(train_pool)) if i not in taken]
            chosen += rng.sample(rest, min(len(rest), max(0, sum(TRAIN_LABELS_PER_QUERY.values()) - len(chosen))))
            judged = [(train_pool[i][0], train_pool[i][1], "train") for i in sorted(chosen)]
        rows += [{"query": q.text, "product_id": pid, "label": q.relevance(c.name, c.coarse_name),
                  "annotator": ANNOTATOR, "split": split} for pid, c, split in judged]
    return rows


# ---- entry point ---------------------------------------------------------------------------------------------


def _layout_fingerprint(root: Path) -> str:
    """SHA-1 of the three index files, so that an edited dataset invalidates an imported catalog."""
    digest = hashlib.sha1()
    for rel in ("dataset/classes.csv", "dataset/train.txt", "dataset/val.txt", "index.csv"):
        p = root / rel
        digest.update(rel.encode())
        digest.update(p.read_bytes() if p.is_file() else b"<absent>")
    return digest.hexdigest()


def import_grocery(root: Path, out_dir: Path, products_per_class: int = 0, seed: int = 0) -> Path:
    """Import the GroceryStoreDataset at ``root`` into ``out_dir/catalog.db``, or reuse an identical import.

    Steps:
        1. Read and check ``classes.csv`` and ``train.txt`` / ``val.txt`` (every listed image must exist).
        2. One product per kept photo (train, then val) and one per iconic image, with absolute ``image_uri``.
        3. Derive queries from the taxonomy; pick ~20% as 'eval' and judge them against every product;
           judge ~10 mixed train-split/iconic products for every other query ('train').
        4. Write the DB (empty ``search_log``) with a ``meta`` table; atomically, as in the demo generator.

    Args:
        root: dataset folder holding ``dataset/`` (e.g. ``PipelineConfig.grocery_root()``).
        out_dir: catalog folder (e.g. ``PipelineConfig.catalog_dir()``); only ``catalog.db`` is written there.
        products_per_class: 0 keeps every photo; N > 0 keeps the first N photos per fine class per split.
        seed: seed of the sample of 'train' label pairs.

    Returns:
        Path of ``out_dir/catalog.db``.

    Raises:
        GroceryLayoutError: a file is missing or malformed (names the file, the line and the problem).
        ValueError: ``products_per_class`` is negative.
    """
    if products_per_class < 0:
        raise ValueError(f"products_per_class must be >= 0 (0 = every photo), got {products_per_class}")
    root = Path(root).resolve()
    if not (root / "dataset").is_dir():
        raise GroceryLayoutError(f"{root / 'dataset'}: folder not found; point catalog.grocery_root at the "
                                 f"GroceryStoreDataset folder that contains dataset/classes.csv")
    params = {"root": str(root), "products_per_class": products_per_class, "seed": seed}
    meta_items = {"generator": GENERATOR, "generator_version": GENERATOR_VERSION,
                  "params": json.dumps(params, sort_keys=True), "layout_sha1": _layout_fingerprint(root)}

    def build(tmp_dir: Path) -> None:
        # 1.
        classes = _read_classes(root)
        photos = {split: _read_split(root, split, classes, products_per_class) for split in SPLITS}
        # 2.
        products: list[dict] = []
        by_split: dict[str, list[tuple[str, GroceryClass]]] = {}

        def add(split: str, number: int, width: int, image: Path, cls: GroceryClass) -> None:
            pid = f"g-{split}-{number:0{width}d}"
            by_split.setdefault(split, []).append((pid, cls))
            products.append({"product_id": pid, "title": cls.title, "description": cls.description, "brand": None,
                             "category": cls.name, "aisle": cls.coarse_name, "image_uri": str(image),
                             "updated_at": UPDATED_AT})

        for split in SPLITS:
            width = max(4, len(str(len(photos[split]))))
            for k, photo in enumerate(photos[split], start=1):
                add(split, k, width, photo.path, photo.cls)
        iconic = sorted(classes.values(), key=lambda c: c.class_id)
        for k, cls in enumerate(iconic, start=1):
            add("iconic", k, 4, cls.iconic_path, cls)
        # 3.
        queries = grocery_queries(iconic)
        eval_queries = _eval_queries(queries, photos["val"])
        train_pool = by_split["train"] + by_split["iconic"]
        label_rows = _labels(queries, eval_queries, train_pool, [p for split in by_split.values() for p in split], seed)
        # 4.
        write_catalog_db(tmp_dir / DB_FILENAME, products, [], label_rows, meta_items)
        logger.info("grocery catalog from %s: %d products (%s), %d queries (%d eval), %d human labels", root,
                    len(products), ", ".join(f"{s} {len(v)}" for s, v in by_split.items()), len(queries),
                    len(eval_queries), len(label_rows))

    return build_catalog_dir(Path(out_dir), meta_items, build)
