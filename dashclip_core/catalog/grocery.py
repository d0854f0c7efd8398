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

The dataset has no search log (the table is written empty), so :func:`grocery_queries` derives a shopper query set
from the catalog itself, and ``human_labels`` grade it from the class taxonomy and the class descriptions (both are
human annotation). Six kinds of query, each with its grade-2 ("high") and grade-1 ("related") fine classes:

    fine         "granny smith"             the class title, lower-cased; 1 = rest of its coarse class
    coarse       "apple"                    the coarse class name; every member is 2
    aisle        "plant based milk"         a documented group of coarse classes or a category (``AISLES``)
    title_word   "vanilla yoghurt"          a flavour/colour word of some (not all) titles + the coarse name
    paraphrase   "granny smith apples"      a title rewritten by rule: brand words dropped, coarse noun added,
                                            plural/singular; never equal to a title
    description  "crunchy apple",           a curated attribute (``ATTRIBUTES``: taste, texture, colour, fat,
                 "fruit for baking"         diet, origin, use) mined from titles and descriptions, on a coarse
                                            name or a category word ("fruit", "vegetables")

Everything else is 0. ~20% of the queries of every kind are held out as 'eval' and judged against every product;
the rest are 'train' queries judged on a mixed sample (the teacher learns from those).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dashclip_core.catalog.schema import DB_FILENAME, build_catalog_dir, stable_hash, write_catalog_db

logger = logging.getLogger(__name__)

GENERATOR = "dashclip_core.catalog.grocery"
GENERATOR_VERSION = "3"  # bump whenever the imported content changes, so existing catalogs get rebuilt
SPLITS = ("train", "val")
ANNOTATOR = "taxonomy"  # labels derive from the dataset's human class annotations and descriptions
UPDATED_AT = "2019-01-07T00:00:00+00:00"  # the dataset's publication (WACV 2019); the photos carry no timestamps
EVAL_FRACTION = 0.2  # share of the queries of every kind held out as 'eval' (judged densely against every product)
MAX_EVAL_QUERIES = 80  # each eval query is judged against the whole catalog (~3,000 photos); cap the dense labels
TRAIN_LABELS_PER_QUERY = {2: 4, 1: 3, 0: 3}  # mixed sample of train-split/iconic products per 'train' query

CLASSES_HEADER = ("Class Name (str)", "Class ID (int)", "Coarse Class Name (str)", "Coarse Class ID (int)",
                  "Iconic Image Path (str)", "Product Description Path (str)")
# Words of fine class titles that make "<word> <coarse>" a sensible shopper query ("vanilla yoghurt", "red pepper").
# Colours only for vegetables: on fruit and packages they describe a variety or a brand rather than the product.
FLAVOUR_WORDS = ("ecological", "lactose", "vanilla", "natural", "strawberry", "blueberry", "fresh", "shelf",
                 "apple", "orange", "grapefruit", "mandarin")
COLOUR_WORDS = ("red", "green", "yellow", "orange")
QUERY_KINDS = ("fine", "coarse", "aisle", "title_word", "paraphrase", "description")


@dataclass(frozen=True)
class Aisle:
    """A shopper aisle word and the classes it names, by coarse class name or category (exact, by definition).

    Only emitted when every coarse class / category it names is in the catalog.
    """

    text: str
    coarse: tuple[str, ...] = ()  # coarse classes graded 2
    categories: tuple[str, ...] = ()  # whole categories graded 2
    related: tuple[str, ...] = ()  # coarse classes graded 1


AISLES = (
    Aisle("fruit", categories=("Fruit",)),
    Aisle("vegetables", categories=("Vegetables",)),
    Aisle("citrus fruit", coarse=("Lemon", "Lime", "Orange", "Red-Grapefruit", "Satsumas")),
    Aisle("fruit juice", coarse=("Juice",)),  # every Juice class is apple/orange/grapefruit/mandarin juice
    # cow's-milk products; the plant-based alternatives share the chilled shelf, so they are 1
    Aisle("dairy", coarse=("Milk", "Sour-Cream", "Sour-Milk", "Yoghurt"),
          related=("Oat-Milk", "Oatghurt", "Soy-Milk", "Soyghurt")),
    Aisle("plant based milk", coarse=("Oat-Milk", "Soy-Milk"), related=("Oatghurt", "Soyghurt")),
    Aisle("plant based yoghurt", coarse=("Oatghurt", "Soyghurt"), related=("Oat-Milk", "Soy-Milk")),
)


@dataclass(frozen=True)
class Attribute:
    """A shopper attribute and the words of a title or description that show a class has it.

    Args:
        facet: "taste", "texture", "colour", "fat", "diet", "origin" or "use" (the cap of ``MAX_PER_FACET`` applies
            per facet).
        templates: query wordings, "{noun}" = the coarse name or category word; one is picked per noun by hash,
            so synonyms ("crunchy" / "crisp") spread over nouns instead of doubling the set.
        evidence: words or phrases of the title/description (lower-case tokens; each token also matches its simple
            inflections: -s, -es, -er, -est, -ed, -ing, y -> ies/ier/ied, final e dropped before -ing).
        categories: categories the attribute makes sense for ("fruit for baking", not "vegetables for baking").
        not_before: a match followed by one of these tokens does not count ("sweet desserts" is a use, not a taste).
        adjacent: colour mode: the word counts in the title, or in the description right before the coarse noun or
            a part word ("dark red apple", "yellow shell"); a pepper description listing every colour does not count.
        plural: fill "{noun}" with the plural of a produce coarse name ("apples for baking").
    """

    facet: str
    templates: tuple[str, ...]
    evidence: tuple[str, ...]
    categories: tuple[str, ...] = ("Fruit", "Vegetables", "Packages")
    not_before: tuple[str, ...] = ()
    adjacent: bool = False
    plural: bool = False


_PRODUCE = ("Fruit", "Vegetables")
_USE = {"facet": "use", "plural": True}
# Curated from reading the 81 descriptions, plus a few synonyms of their wording ("whole milk", "full fat");
# an attribute none of whose evidence occurs in a catalog makes no query there.
ATTRIBUTES = (
    # taste
    Attribute("taste", ("sweet {noun}",), ("sweet",), not_before=("dessert",)),
    Attribute("taste", ("sour {noun}", "tangy {noun}"), ("sour", "tart", "acid", "acidic", "acidity"),
              not_before=("cream", "milk")),
    Attribute("taste", ("mild {noun}",), ("mild", "mellow", "gentle")),
    Attribute("taste", ("bitter {noun}",), ("bitter",)),
    Attribute("taste", ("juicy {noun}",), ("juicy",)),
    Attribute("taste", ("refreshing {noun}",), ("refreshing",)),
    Attribute("taste", ("earthy {noun}",), ("earthy",)),
    Attribute("taste", ("exotic {noun}",), ("exotic",)),
    # texture
    Attribute("texture", ("crunchy {noun}", "crisp {noun}"), ("crunchy", "crisp", "crispy")),
    Attribute("texture", ("firm {noun}",), ("firm", "solid")),
    Attribute("texture", ("soft {noun}",), ("soft",)),
    Attribute("texture", ("creamy {noun}",), ("creamy", "creaminess")),
    Attribute("texture", ("smooth {noun}",), ("smooth",)),
    Attribute("texture", ("{noun} with pulp",), ("with pulp",), categories=("Packages",)),
    Attribute("texture", ("{noun} without pulp", "pulp free {noun}"), ("without pulp",), categories=("Packages",)),
    Attribute("texture", ("{noun} not from concentrate",), ("not from concentrate",), categories=("Packages",)),
    # colour (coarse level only: "green vegetables" means leafy greens, not a green pepper)
    *(Attribute("colour", (f"{c} {{noun}}",), (c,), categories=_PRODUCE, adjacent=True)
      for c in ("red", "green", "yellow", "orange", "pink", "purple", "brown")),
    # fat content (Swedish "mellanmjölk" is sold as medium fat / skimmed, 1.5%; "standardmjölk" is whole milk, 3%)
    Attribute("fat", ("low fat {noun}",), ("low fat",), categories=("Packages",)),
    Attribute("fat", ("semi skimmed {noun}", "skimmed {noun}"), ("skimmed", "medium fat"), categories=("Packages",)),
    Attribute("fat", ("whole {noun}", "full fat {noun}"), ("standard milk", "full fat", "whole milk"),
              categories=("Packages",)),
    Attribute("fat", ("1.5% {noun}",), ("1.5 percent", "1,5 percent"), categories=("Packages",)),
    # diet
    Attribute("diet", ("organic {noun}",), ("organic", "ecological", "ecologically", "krav", "eko")),
    Attribute("diet", ("lactose free {noun}",), ("lactose free", "free from lactose"), categories=("Packages",)),
    Attribute("diet", ("low sugar {noun}", "less sugar {noun}"), ("less added sugar", "less sugar", "low sugar"),
              categories=("Packages",)),
    # origin
    Attribute("origin", ("swedish {noun}",), ("swedish", "sweden")),
    # use
    Attribute(templates=("{noun} for baking",), evidence=("baking", "bake", "pastry", "cake", "cookie", "biscuit"),
              categories=("Fruit", "Packages"), **_USE),
    Attribute(templates=("{noun} for desserts",), evidence=("dessert",), categories=("Fruit", "Packages"), **_USE),
    Attribute(templates=("{noun} for salads",), evidence=("salad",), categories=_PRODUCE, **_USE),
    Attribute(templates=("{noun} for smoothies",), evidence=("smoothie",), **_USE),
    Attribute(templates=("{noun} for cooking",), evidence=("cook", "boil", "fry", "stew", "grill", "wok", "oven",
                                                         "warm dishes"), **_USE),
    Attribute(templates=("{noun} for soup",), evidence=("soup",), categories=("Vegetables",), **_USE),
    Attribute(templates=("{noun} for breakfast",), evidence=("breakfast",), categories=("Packages",), **_USE),
    Attribute(templates=("{noun} for cereal",), evidence=("cereal", "muesli", "porridge"), categories=("Packages",),
              **_USE),
    Attribute(templates=("{noun} for coffee",), evidence=("coffee",), categories=("Packages",), **_USE),
    Attribute(templates=("{noun} for sauces",), evidence=("sauce", "dressing"), categories=("Packages",), **_USE),
    Attribute(templates=("{noun} for snacking",), evidence=("snack",), **_USE),
    Attribute(templates=("{noun} for jam",), evidence=("jam", "marmalade"), categories=("Fruit",), **_USE),
    Attribute(templates=("{noun} for mash",), evidence=("mash",), categories=("Vegetables",), **_USE),
    Attribute(templates=("{noun} for sandwiches",), evidence=("sandwich",), categories=("Vegetables",), **_USE),
    Attribute(templates=("{noun} for burgers",), evidence=("burger", "hamburger"), categories=("Vegetables",), **_USE),
    Attribute(templates=("{noun} for guacamole",), evidence=("guacamole",), categories=("Fruit",), **_USE),
    Attribute(templates=("{noun} for asian cooking",), evidence=("asian",), categories=("Vegetables",), **_USE),
)
# Category-level description queries use these words; packages have none (their aisles are in ``AISLES``).
CATEGORY_NOUNS = {"Fruit": "fruit", "Vegetables": "vegetables"}
MAX_PER_FACET = 24  # keeps "use" and "taste" from drowning the rest (see _capped_by_facet)
COLOUR_PARTS = ("shell", "peel", "skin", "pulp")  # "<colour> <part>" in a description describes the product
UNCOUNTABLE = ("garlic", "ginger", "asparagus")


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
    """A shopper query derived from the catalog, with its graded fine classes.

    Args:
        text: the query string (lower case, unique within a query set).
        kind: one of ``QUERY_KINDS`` (see the module docstring).
        high: fine class names graded 2.
        related: fine class names graded 1 (every other class is 0).
        facet: the ``Attribute.facet`` of a "description" query, else None.
    """

    text: str
    kind: str
    high: frozenset[str]
    related: frozenset[str] = frozenset()
    facet: str | None = None

    def relevance(self, fine_name: str) -> int:
        """Grade of a product of fine class ``fine_name`` (0, 1 or 2)."""
        if fine_name in self.high:
            return 2
        return 1 if fine_name in self.related else 0


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

_TOKEN = re.compile(r"[0-9]+(?:[.,][0-9]+)?|[^\W\d_]+")


def _tokens(text: str | None) -> list[str]:
    """Lower-case word tokens; hyphens and apostrophes split ("lactose-free" -> lactose, free), "1.5" stays whole."""
    return _TOKEN.findall((text or "").lower())


@functools.cache
def _inflections(word: str) -> frozenset[str]:
    """``word`` and its simple English inflections (-s/-es/-er/-est/-ed/-ing, y -> ies/ier/iest/ied, e -> ing).

    Deliberately no -ly or -en: "mildly pasteurized" is not a mild taste and "softens the heat" is not soft.
    """
    forms = {word}
    if word.isalpha():
        forms |= {word + s for s in ("s", "es", "er", "est", "ed", "ing")}
        if word.endswith("y") and len(word) > 2 and word[-2] not in "aeiou":
            forms |= {word[:-1] + s for s in ("ies", "ier", "iest", "ied")}
        if word.endswith("e"):
            forms |= {word + "r", word + "st", word + "d", word[:-1] + "ing"}
    return frozenset(forms)


def _has_phrase(tokens: Sequence[str], phrase: str, not_before: Sequence[str] = ()) -> bool:
    """True when ``phrase``'s tokens (each up to inflection) occur consecutively in ``tokens``, not followed by an
    inflection of a ``not_before`` word."""
    want = [_inflections(t) for t in _tokens(phrase)]
    stop = set().union(*(_inflections(w) for w in not_before)) if not_before else set()
    n = len(want)
    for i in range(len(tokens) - n + 1):
        if all(tokens[i + k] in want[k] for k in range(n)):
            if i + n < len(tokens) and tokens[i + n] in stop:
                continue
            return True
    return False


def _pluralize(word: str) -> str:
    if word in UNCOUNTABLE or word.endswith("s"):
        return word
    if word.endswith(("x", "ch", "sh")) or (word.endswith("o") and word not in ("avocado",)):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in tuple("aeiou"):
        return word[:-1] + "ies"
    return word + "s"


def _noun_phrase(words: Sequence[str], plural: bool) -> str:
    return " ".join([*words[:-1], _pluralize(words[-1])] if plural and words else words)


def _carries(cls: GroceryClass, attr: Attribute, noun: Sequence[str]) -> bool:
    """Whether the title or description of ``cls`` shows ``attr`` (``noun``: the coarse name's tokens)."""
    title, desc = _tokens(cls.title), _tokens(cls.description)
    if attr.adjacent:
        (word,) = attr.evidence
        if word in title:
            return True
        after = _inflections(noun[-1]).union(*(_inflections(p) for p in COLOUR_PARTS)) if noun else frozenset()
        return any(a == word and b in after for a, b in itertools.pairwise(desc))
    return any(_has_phrase(t, e, attr.not_before) for e in attr.evidence for t in (title, desc))


def _template_words(template: str) -> set[str]:
    return set(_tokens(template.replace("{noun}", " ")))


def _description_queries(classes: Sequence[GroceryClass]) -> list[tuple[Attribute, GroceryQuery]]:
    """"<attribute> <coarse>" and "<attribute> <category word>" queries of ``ATTRIBUTES`` (with the attribute that
    made each), before the facet cap.

    Coarse level: 2 = classes of the coarse class that carry the attribute, 1 = the rest of the coarse class; skipped
    when no class or every class carries it (no discrimination), or when the coarse name already holds the word
    ("sour sour cream"). Category level ("sweet fruit", "vegetables for soup"; not for colour, and only for
    categories in ``CATEGORY_NOUNS``): 2 = carriers of the category, 1 = the rest of the category ("sweet fruit"
    -> a lemon is still fruit, as a Granny Smith is still an apple for "sweet apple"); skipped when none or all carry it.
    """
    by_coarse: dict[str, list[GroceryClass]] = {}
    by_category: dict[str, list[GroceryClass]] = {}
    for c in classes:
        by_coarse.setdefault(c.coarse_name, []).append(c)
        by_category.setdefault(c.category, []).append(c)
    out: list[tuple[Attribute, GroceryQuery]] = []

    def emit(attr: Attribute, noun_words: list[str], countable: bool, members: list[GroceryClass],
             carriers: list[GroceryClass]) -> None:
        if not carriers or len(carriers) == len(members):
            return
        noun = " ".join(noun_words)
        template = attr.templates[stable_hash(f"{attr.templates[0]}|{noun}") % len(attr.templates)]
        if _template_words(template) & set(noun_words):
            return
        text = template.format(noun=_noun_phrase(noun_words, attr.plural and countable))
        high = frozenset(c.name for c in carriers)
        out.append((attr, GroceryQuery(text, "description", high, frozenset(m.name for m in members) - high,
                                       attr.facet)))

    for attr in ATTRIBUTES:
        for coarse, members in by_coarse.items():
            if members[0].category not in attr.categories:
                continue
            noun = _tokens(coarse)
            emit(attr, noun, members[0].category in _PRODUCE, members,
                 [m for m in members if _carries(m, attr, noun)])
        if attr.adjacent:
            continue
        for category, members in by_category.items():
            if category not in attr.categories or category not in CATEGORY_NOUNS:
                continue
            # evidence is judged with each class's own coarse noun; the query names the category
            emit(attr, [CATEGORY_NOUNS[category]], False, members,
                 [m for m in members if _carries(m, attr, _tokens(m.coarse_name))])
    return out


def _brand_words(classes: Sequence[GroceryClass]) -> set[str]:
    """Words of package titles that no description ever writes in lower case ("arla", "god", "morgon", "tropicana"):
    names, not descriptive words. Words of coarse names are never brand words ("oatghurt")."""
    lower: set[str] = set()
    for c in classes:
        lower |= {t for t in _TOKEN.findall(c.description or "") if t.islower()}
    coarse_words = {w for c in classes for w in _tokens(c.coarse_name)}
    brand: set[str] = set()
    for c in classes:
        if c.category != "Packages":
            continue
        for w in _tokens(c.title):
            if w not in coarse_words and not any(t in _inflections(w) or t.startswith(w) for t in lower):
                brand.add(w)
    return brand


def _paraphrases(classes: Sequence[GroceryClass]) -> list[GroceryQuery]:
    """Shopper rewrites of the fine titles, by rule, never equal to a title (lower-cased).

    Packages: brand words dropped and the coarse noun moved to the end ("Tropicana Juice Smooth" -> "smooth juice",
    "Bravo Apple Juice" -> "apple juice"). Produce: the coarse noun appended when the title lacks it ("granny smith
    apple"), and the plural ("granny smith apples", "bananas") or singular ("carrot") of that. 2 = every class of
    the same coarse class whose words include all of the rewrite's words ("apple juice" -> all three apple juices),
    1 = the rest of the coarse class.
    """
    brand = _brand_words(classes)
    titles = {c.title.lower() for c in classes}

    def base(c: GroceryClass) -> list[str]:
        coarse = _tokens(c.coarse_name)
        words = _tokens(c.title)
        if c.category == "Packages":
            return [w for w in words if w not in brand and w not in coarse] + coarse
        if all(any(cw in w for w in words) for cw in coarse):
            return words
        return words + coarse

    by_coarse: dict[str, list[GroceryClass]] = {}
    for c in classes:
        by_coarse.setdefault(c.coarse_name, []).append(c)
    out: list[GroceryQuery] = []
    for c in classes:
        words = base(c)
        members = by_coarse[c.coarse_name]
        high = frozenset(m.name for m in members if set(words) <= set(base(m)))
        related = frozenset(m.name for m in members) - high
        texts = [" ".join(words)]
        if c.category in _PRODUCE:
            last = words[-1]
            if last.endswith("s") and not last.endswith(("ss", "us")):
                texts.append(" ".join([*words[:-1], last[:-1]]))
            else:
                texts.append(_noun_phrase(words, plural=True))
        out += [GroceryQuery(t, "paraphrase", high, related) for t in texts if t not in titles]
    return out


def grocery_queries(classes: Sequence[GroceryClass]) -> tuple[GroceryQuery, ...]:
    """The shopper query set of a catalog, deduplicated by text (first definition wins, in ``QUERY_KINDS`` order).

    Returns:
        "fine" (one per class), "coarse" (one per coarse class), "aisle" (``AISLES`` present in the catalog),
        "title_word" (``FLAVOUR_WORDS`` on packages, ``COLOUR_WORDS`` on vegetables, in some but not all titles
        of a coarse class), "paraphrase" (:func:`_paraphrases`) and "description" queries
        (:func:`_description_queries`, at most ``MAX_PER_FACET`` per facet, see :func:`_capped_by_facet`).
    """
    by_coarse: dict[str, list[GroceryClass]] = {}
    for c in classes:
        by_coarse.setdefault(c.coarse_name, []).append(c)
    queries: dict[str, GroceryQuery] = {}

    def add(q: GroceryQuery) -> None:
        queries.setdefault(q.text, q)

    def names(members: Sequence[GroceryClass]) -> frozenset[str]:
        return frozenset(m.name for m in members)

    for c in classes:
        add(GroceryQuery(c.title.lower(), "fine", frozenset([c.name]), names(by_coarse[c.coarse_name]) - {c.name}))
    for coarse, members in by_coarse.items():
        add(GroceryQuery(coarse.replace("-", " ").lower(), "coarse", names(members)))
    categories = {c.category for c in classes}
    for aisle in AISLES:
        if set(aisle.coarse) <= by_coarse.keys() and set(aisle.categories) <= categories:
            high = names([c for c in classes if c.coarse_name in aisle.coarse or c.category in aisle.categories])
            add(GroceryQuery(aisle.text, "aisle", high, names([c for c in classes if c.coarse_name in aisle.related])))
    for coarse, members in by_coarse.items():
        coarse_text = coarse.replace("-", " ").lower()
        words = {"Packages": FLAVOUR_WORDS, "Vegetables": COLOUR_WORDS}.get(members[0].category, ())
        for word in words:
            having = names([m for m in members if word in m.title.lower().split()])
            if having and len(having) < len(members) and word not in coarse_text.split():
                add(GroceryQuery(f"{word} {coarse_text}", "title_word", having, names(members) - having))
    for q in _paraphrases(classes):
        add(q)
    for q in _capped_by_facet([(a, q) for a, q in _description_queries(classes) if q.text not in queries]):
        add(q)
    return tuple(queries.values())


def _capped_by_facet(candidates: Sequence[tuple[Attribute, GroceryQuery]]) -> list[GroceryQuery]:
    """At most ``MAX_PER_FACET`` queries per facet, taken round-robin over the facet's attributes (each attribute's
    queries in hash order), so every attribute keeps a query before any keeps a second."""
    per_attr: dict[Attribute, list[GroceryQuery]] = {}
    for attr, q in candidates:
        per_attr.setdefault(attr, []).append(q)
    by_facet: dict[str, list[list[GroceryQuery]]] = {}
    for attr, qs in per_attr.items():
        by_facet.setdefault(attr.facet, []).append(sorted(qs, key=lambda q: stable_hash(q.text)))
    out: list[GroceryQuery] = []
    for lists in by_facet.values():
        kept: dict[str, GroceryQuery] = {}
        for rank in range(max(map(len, lists))):
            for qs in lists:
                if rank < len(qs) and len(kept) < MAX_PER_FACET:
                    kept.setdefault(qs[rank].text, qs[rank])
        out += kept.values()
    return out


def _eval_queries(queries: Sequence[GroceryQuery], val: Sequence[_Photo]) -> set[str]:
    """``EVAL_FRACTION`` of the queries of every kind (at least one per kind, at most ``MAX_EVAL_QUERIES`` in all),
    picked by SHA-1 of the text among queries with a grade-2 val photo.

    Only queries that val can answer are eligible: with no relevant product NDCG is undefined. Stratifying by kind
    keeps every kind (fine, paraphrase, description, ...) measured on held-out queries.
    """
    val_classes = {p.cls.name for p in val}
    fraction = min(EVAL_FRACTION, MAX_EVAL_QUERIES / max(1, len(queries)))
    chosen: set[str] = set()
    for kind in QUERY_KINDS:
        of_kind = [q for q in queries if q.kind == kind]
        eligible = sorted((q.text for q in of_kind if q.high & val_classes), key=stable_hash)
        chosen |= set(eligible[:max(1, round(fraction * len(of_kind)))] if eligible else ())
    return chosen


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
            grades = [q.relevance(c.name) for _, c in train_pool]
            chosen: list[int] = []
            for g, k in TRAIN_LABELS_PER_QUERY.items():
                pool = [i for i, gi in enumerate(grades) if gi == g]
                chosen += rng.sample(pool, min(k, len(pool)))
            taken = set(chosen)
            rest = [i for i in range(len(train_pool)) if i not in taken]
            chosen += rng.sample(rest, min(len(rest), max(0, sum(TRAIN_LABELS_PER_QUERY.values()) - len(chosen))))
            judged = [(train_pool[i][0], train_pool[i][1], "train") for i in sorted(chosen)]
        rows += [{"query": q.text, "product_id": pid, "label": q.relevance(c.name),
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
        3. Derive the shopper queries (:func:`grocery_queries`); pick ~20% of every kind as 'eval' and judge them
           against every product; judge ~10 mixed train-split/iconic products for every other query ('train').
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
        kinds = Counter(q.kind for q in queries)
        eval_kinds = Counter(q.kind for q in queries if q.text in eval_queries)
        logger.info("grocery catalog from %s: %d products (%s), %d queries (%d eval; by kind %s), %d human labels",
                    root, len(products), ", ".join(f"{s} {len(v)}" for s, v in by_split.items()), len(queries),
                    len(eval_queries), ", ".join(f"{k} {kinds[k]}/{eval_kinds[k]} eval" for k in QUERY_KINDS),
                    len(label_rows))

    return build_catalog_dir(Path(out_dir), meta_items, build)
