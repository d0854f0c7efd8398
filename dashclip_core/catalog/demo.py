"""Deterministic embedded demo catalog: a small grocery store with drawn product images and shopper queries.

The demo exists so that the whole pipeline runs (and means something) without downloads. It is built so that
image-text learning is measurable and short queries need more than word overlap:

* 8 aisles x 5 product types. Every type has a visual identity (packaging shape, colour palette, pattern) that
  its products share with jitter, so an image reveals the product type even when the product has no text.
* Products have brand, attributes (organic, vanilla, ...), a title and a description; a fraction is image-only
  (no title/description/brand) and a fraction text-only (no image).
* Queries come in four kinds: the type name, synonyms/paraphrases ("plant milk"), attribute queries ("vanilla
  yogurt") and concept queries that span types ("healthy snack", "baking"). :class:`DemoQuery.relevance` is the
  ground truth (2 = target type [with the attribute], 1 = same aisle / related concept, 0 = otherwise).
* ``search_log`` simulates impressions, clicks and purchases driven by that relevance, for the 'train' queries only:
  'eval' queries are held out of everything a model could train on (see :func:`query_split`).
* ``human_labels`` judge ~10 mixed pairs per 'train' query, and densely judge every product of the related aisles
  plus 30 random ones per 'eval' query, so NDCG@10 over the whole catalog is meaningful (unjudged pairs are 0).
  About 8% of the labels are moved by one grade (annotator noise, never 0 <-> 2).

Everything is derived from ``seed`` with string-seeded :class:`random.Random` streams (stable across processes and
Python versions), one stream per concern so that, e.g., the image of a product does not depend on the search log.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from dashclip_core.catalog.schema import DB_FILENAME, build_catalog_dir, stable_hash, write_catalog_db

logger = logging.getLogger(__name__)

GENERATOR = "dashclip_core.catalog.demo"
GENERATOR_VERSION = "1"  # bump whenever the generated content changes, so existing catalogs get rebuilt
IMAGES_DIRNAME = "images"
ANNOTATORS = ("a1", "a2", "a3", "a4", "a5")
EVAL_FRACTION = 0.2  # share of the queries of each kind held out as 'eval'
LABEL_NOISE = 0.08  # share of human labels moved by one grade
EVAL_RANDOM_PRODUCTS = 30  # random products judged per eval query beside the related aisles
_BASE_TIME = datetime(2025, 1, 1, tzinfo=UTC)

RGB = tuple[int, int, int]


# ---- the store: aisles, product types, attributes ------------------------------------------------------------


@dataclass(frozen=True)
class ProductType:
    """One product type (the ``category`` column) and everything its products are generated from.

    Args:
        name: type name, also the ``category`` value and the type-name query, e.g. "oat milk".
        aisle: the ``aisle`` value, e.g. "dairy".
        shape: packaging silhouette drawn by :func:`_draw_product` ("carton", "bottle", "round", ...).
        color: base RGB fill of the packaging.
        accent: RGB of the pattern, lid, leaf and other details.
        pattern: "none", "stripes", "dots", "checks", "waves" or "zigzag".
        attributes: attributes a product of this type may have (keys of ``ATTRIBUTE_PHRASES``).
        sizes: pack sizes written at the end of the title.
        descriptions: alternative first sentences of the description; they paraphrase the type.
        synonyms: shopper queries that mean this type without (always) naming it.
        size: (width, height) of the silhouette as fractions of the image side, before jitter.
        label: whether the packaging carries a label band with the brand name.
    """

    name: str
    aisle: str
    shape: str
    color: RGB
    accent: RGB
    pattern: str
    attributes: tuple[str, ...]
    sizes: tuple[str, ...]
    descriptions: tuple[str, ...]
    synonyms: tuple[str, ...]
    size: tuple[float, float]
    label: bool = True


def _t(name, aisle, shape, color, accent, pattern, attributes, sizes, descriptions, synonyms, size, label=True):
    """Positional shorthand for :class:`ProductType` that keeps the table below one block per type."""
    return ProductType(name, aisle, shape, color, accent, pattern, tuple(attributes), tuple(sizes),
                       tuple(descriptions), tuple(synonyms), size, label)


# fmt: off
PRODUCT_TYPES: tuple[ProductType, ...] = (
    # dairy
    _t("oat milk", "dairy", "carton", (214, 190, 120), (110, 80, 40), "waves",
       ["organic", "unsweetened", "barista", "chocolate"], ["1 L", "1.5 L"],
       ["Creamy drink made from Nordic oats, free from dairy.", "Smooth oat drink that works in coffee, porridge and cereal."],
       ["dairy free milk", "plant milk"], (0.42, 0.76)),
    _t("whole milk", "dairy", "bottle", (60, 110, 210), (250, 250, 250), "none",
       ["organic", "lactose-free", "family size"], ["1 L", "2 L"],
       ["Fresh pasteurised cow's milk with 3.5% fat.", "Rich creamy milk from grass-fed cows, for drinking or cooking."],
       ["full fat milk", "cow milk"], (0.36, 0.8)),
    _t("greek yogurt", "dairy", "tub", (120, 200, 200), (20, 50, 110), "dots",
       ["vanilla", "low-fat", "strawberry", "organic"], ["500 g", "1 kg"],
       ["Thick strained yoghurt, high in protein.", "Creamy cultured yoghurt, lovely with fruit and granola."],
       ["strained yoghurt", "high protein yogurt"], (0.62, 0.5)),
    _t("cheddar cheese", "dairy", "wedge", (250, 170, 30), (190, 110, 0), "dots",
       ["aged", "organic", "sliced", "low-fat"], ["200 g", "400 g"],
       ["Sharp hard cheese made from cow's milk.", "Tangy cheese for sandwiches, melting and grating."],
       ["hard cheese", "cheese block"], (0.7, 0.5), label=False),
    _t("butter", "dairy", "box", (250, 225, 80), (200, 30, 30), "stripes",
       ["salted", "unsalted", "organic", "spreadable"], ["250 g", "500 g"],
       ["Churned from fresh cream, golden and rich.", "Creamy spread for toast, frying and baking."],
       ["dairy spread"], (0.7, 0.36)),
    # snacks
    _t("granola bar", "snacks", "bar", (170, 110, 50), (250, 200, 60), "stripes",
       ["organic", "honey", "chocolate", "gluten-free"], ["5-pack", "12-pack"],
       ["Crunchy oat bar with honey, a healthy snack for on the go.", "Chewy bar of rolled oats and nuts that fits in any bag."],
       ["cereal bar", "oat bar"], (0.82, 0.3)),
    _t("trail mix", "snacks", "bag", (210, 120, 40), (250, 235, 190), "dots",
       ["salted", "unsalted", "chocolate", "organic"], ["200 g", "400 g"],
       ["Roasted nuts, seeds and dried fruit for hiking and snacking.", "A handful of almonds, cashews and raisins keeps you going."],
       ["nut mix", "nuts and raisins"], (0.56, 0.72)),
    _t("potato chips", "snacks", "bag", (230, 40, 40), (255, 220, 0), "zigzag",
       ["sea salt", "sour cream", "barbecue", "family size"], ["150 g", "300 g"],
       ["Thin crispy fried potato slices.", "Crunchy crisps cooked in sunflower oil, made for sharing."],
       ["crisps"], (0.58, 0.74)),
    _t("chocolate cookies", "snacks", "box", (90, 50, 30), (240, 230, 210), "dots",
       ["double chocolate", "gluten-free", "family size", "vegan"], ["200 g", "350 g"],
       ["Baked biscuits with chunks of dark chocolate.", "Sweet crunchy treat, perfect with a glass of milk."],
       ["chocolate biscuits", "choc chip cookies"], (0.62, 0.48)),
    _t("rice cakes", "snacks", "roll", (200, 220, 120), (40, 110, 50), "stripes",
       ["whole grain", "lightly salted", "organic", "chocolate"], ["100 g", "130 g"],
       ["Light puffed whole grain rice rounds, low in calories.", "Airy crunchy rice discs, great with toppings."],
       ["puffed rice cakes", "rice crackers"], (0.5, 0.64)),
    # beverages
    _t("orange juice", "beverages", "carton", (255, 140, 20), (40, 150, 40), "dots",
       ["not from concentrate", "with pulp", "organic", "family size"], ["1 L", "1.75 L"],
       ["Freshly pressed juice from ripe oranges, rich in vitamin C.", "Sunny citrus drink squeezed from oranges."],
       ["oj", "fresh squeezed juice"], (0.42, 0.76)),
    _t("sparkling water", "beverages", "bottle", (120, 200, 240), (255, 255, 255), "dots",
       ["lemon", "lime", "berry", "family size"], ["500 ml", "1.5 L"],
       ["Carbonated mineral water with fine bubbles.", "Refreshing bubbly water with zero calories."],
       ["fizzy water", "soda water"], (0.34, 0.82)),
    _t("cola", "beverages", "can", (180, 20, 30), (250, 250, 250), "waves",
       ["zero sugar", "cherry", "vanilla"], ["330 ml", "6-pack"],
       ["Classic fizzy soft drink with caramel flavour.", "Ice cold sparkling soda to share at parties."],
       ["soft drink", "soda"], (0.42, 0.64)),
    _t("green tea", "beverages", "box", (90, 170, 90), (250, 240, 200), "checks",
       ["organic", "jasmine", "mint", "decaf"], ["20 bags", "40 bags"],
       ["Delicate steamed tea leaves in bags, brew for three minutes.", "Light grassy tea, rich in antioxidants."],
       ["tea bags", "japanese tea"], (0.52, 0.6)),
    _t("ground coffee", "beverages", "bag", (50, 35, 30), (200, 150, 60), "stripes",
       ["decaf", "dark roast", "organic", "espresso"], ["250 g", "500 g"],
       ["Roasted arabica beans, ground for filter brewing.", "Full bodied roast for a strong morning cup."],
       ["coffee", "filter coffee"], (0.5, 0.74)),
    # bakery
    _t("sliced bread", "bakery", "loaf", (200, 140, 70), (250, 240, 220), "stripes",
       ["whole wheat", "sourdough", "gluten-free", "seeded"], ["500 g", "800 g"],
       ["Soft baked loaf, pre-sliced for toast and sandwiches.", "Everyday bread with a tender crumb."],
       ["toast bread", "sandwich loaf"], (0.76, 0.52)),
    _t("croissants", "bakery", "crescent", (220, 160, 60), (150, 90, 30), "stripes",
       ["butter", "chocolate", "almond", "mini"], ["4-pack", "6-pack"],
       ["Flaky laminated pastry baked golden.", "Light buttery layers, best warm with coffee."],
       ["french pastry"], (0.78, 0.56), label=False),
    _t("bagels", "bakery", "ring", (190, 130, 70), (245, 230, 190), "dots",
       ["sesame", "plain", "everything", "whole wheat"], ["4-pack", "6-pack"],
       ["Boiled and baked dough rings with a chewy crust.", "Dense round rolls with a hole, great toasted with cream cheese."],
       ["new york bagels"], (0.66, 0.66), label=False),
    _t("muffins", "bakery", "muffin", (140, 80, 150), (230, 220, 200), "dots",
       ["blueberry", "chocolate", "banana", "mini"], ["4-pack", "6-pack"],
       ["Soft sweet cakes baked in paper cups.", "Moist little cakes for an afternoon treat."],
       ["cupcakes"], (0.58, 0.62), label=False),
    _t("tortillas", "bakery", "disc", (235, 205, 140), (170, 110, 50), "dots",
       ["whole wheat", "corn", "gluten-free", "large"], ["8-pack", "12-pack"],
       ["Thin soft flatbreads for wraps and tacos.", "Flexible wheat rounds ready to fill and roll."],
       ["wraps", "flatbread"], (0.78, 0.5), label=False),
    # produce
    _t("apples", "produce", "round", (170, 205, 60), (90, 60, 30), "none",
       ["organic", "crisp", "value pack"], ["1 kg", "6 pcs"],
       ["Crisp juicy apples picked at the autumn harvest.", "Sweet and tart fruit, great for snacking and pies."],
       ["granny smith"], (0.58, 0.58), label=False),
    _t("bananas", "produce", "banana", (250, 220, 40), (110, 80, 30), "none",
       ["organic", "fairtrade", "ripe"], ["1 kg", "bunch"],
       ["Sweet creamy fruit in an easy peel, full of potassium.", "Ripe yellow fruit for smoothies and lunchboxes."],
       ["banana"], (0.8, 0.5), label=False),
    _t("oranges", "produce", "round", (250, 140, 0), (255, 190, 90), "dots",
       ["organic", "seedless", "juicing"], ["1 kg", "2 kg"],
       ["Juicy sweet citrus with a bright peel.", "Seedless citrus fruit, easy to peel and rich in vitamin C."],
       ["navel oranges", "citrus fruit"], (0.6, 0.6), label=False),
    _t("tomatoes", "produce", "round", (225, 40, 35), (40, 140, 40), "none",
       ["organic", "vine ripened", "heirloom"], ["500 g", "1 kg"],
       ["Ripe red fruits for salads, sauces and sandwiches.", "Juicy sun ripened fruit with a fresh green top."],
       ["salad tomatoes", "fresh tomatoes"], (0.6, 0.54), label=False),
    _t("lettuce", "produce", "leafy", (60, 160, 60), (190, 230, 150), "stripes",
       ["organic", "romaine", "iceberg"], ["1 head", "2 heads"],
       ["Fresh crunchy leaves for a green salad.", "Crisp green head, washed and ready to use."],
       ["salad greens", "leafy greens"], (0.7, 0.62), label=False),
    # pantry
    _t("spaghetti", "pantry", "box", (20, 60, 140), (250, 250, 250), "stripes",
       ["whole wheat", "gluten-free", "organic"], ["500 g", "1 kg"],
       ["Long dried durum wheat pasta, cooks in nine minutes.", "Italian style pasta strands for bolognese and carbonara."],
       ["pasta", "noodles"], (0.34, 0.82)),
    _t("tomato sauce", "pantry", "jar", (200, 30, 30), (240, 230, 200), "none",
       ["basil", "organic", "spicy", "garlic"], ["400 g", "680 g"],
       ["Slow cooked sauce of ripe tomatoes and olive oil.", "Rich ready made sauce for pasta and pizza."],
       ["pasta sauce", "marinara"], (0.46, 0.62)),
    _t("rolled oats", "pantry", "can", (200, 170, 110), (30, 60, 140), "checks",
       ["organic", "gluten-free", "quick"], ["500 g", "1 kg"],
       ["Whole grain flakes for porridge, overnight oats and baking.", "Hearty flakes that cook into a warm creamy bowl."],
       ["porridge oats", "oatmeal"], (0.46, 0.68)),
    _t("flour", "pantry", "bag", (245, 240, 225), (200, 60, 40), "none",
       ["whole wheat", "organic", "self-raising", "gluten-free"], ["1 kg", "2 kg"],
       ["Finely milled wheat for breads, cakes and pancakes.", "Soft white powder milled from wheat, a kitchen basic."],
       ["baking flour", "plain flour"], (0.56, 0.76)),
    _t("honey", "pantry", "jar", (230, 160, 20), (60, 40, 10), "checks",
       ["organic", "raw", "creamed", "wildflower"], ["350 g", "500 g"],
       ["Golden nectar collected by bees in Swedish meadows.", "Naturally sweet and sticky, for tea, toast and baking."],
       ["natural sweetener", "bee honey"], (0.46, 0.56)),
    # frozen
    _t("frozen pizza", "frozen", "pizzabox", (40, 40, 70), (240, 170, 60), "none",
       ["pepperoni", "margherita", "vegetarian", "family size"], ["350 g", "2-pack"],
       ["Stone baked thin crust with mozzarella, ready in 12 minutes.", "Crispy base topped with tomato and cheese, straight from the freezer."],
       ["ready pizza", "oven pizza"], (0.82, 0.5)),
    _t("ice cream", "frozen", "tub", (240, 150, 190), (120, 60, 30), "waves",
       ["vanilla", "chocolate", "strawberry", "vegan"], ["500 ml", "1 L"],
       ["Creamy frozen dessert churned with fresh cream.", "Smooth scoops of frozen treat for hot summer days."],
       ["frozen dessert", "gelato"], (0.62, 0.52)),
    _t("frozen peas", "frozen", "bag", (30, 150, 60), (200, 240, 200), "dots",
       ["organic", "petite", "family size"], ["500 g", "1 kg"],
       ["Sweet garden peas frozen within hours of picking.", "Tender little green vegetables, ready in three minutes."],
       ["green peas", "frozen vegetables"], (0.56, 0.72)),
    _t("fish fingers", "frozen", "box", (80, 170, 230), (255, 200, 40), "waves",
       ["cod", "breaded", "family size"], ["10-pack", "20-pack"],
       ["Crispy breaded cod pieces, oven baked in 15 minutes.", "Golden coated white fish, a kids' favourite dinner."],
       ["fish sticks", "breaded fish"], (0.66, 0.46)),
    _t("frozen berries", "frozen", "bag", (110, 30, 90), (250, 250, 255), "dots",
       ["organic", "wild", "mixed"], ["250 g", "500 g"],
       ["Frozen raspberries, blueberries and blackberries for smoothies.", "Tart and sweet summer fruit, frozen at peak ripeness."],
       ["frozen fruit", "mixed berries"], (0.56, 0.72)),
    # household
    _t("dish soap", "household", "bottle", (120, 220, 90), (250, 250, 250), "none",
       ["lemon", "eco", "sensitive", "unscented"], ["500 ml", "1 L"],
       ["Concentrated liquid that cuts through grease on pots and plates.", "Gentle cleaner for washing dishes by hand."],
       ["washing up liquid", "dishwashing liquid"], (0.3, 0.82)),
    _t("laundry detergent", "household", "jug", (80, 60, 200), (250, 200, 0), "stripes",
       ["unscented", "eco", "color", "sensitive"], ["1.5 L", "3 L"],
       ["Liquid for washing clothes at 30 degrees.", "Removes tough stains and keeps fabrics bright."],
       ["laundry soap", "clothes washing liquid"], (0.58, 0.76)),
    _t("paper towels", "household", "roll", (250, 250, 250), (60, 140, 220), "waves",
       ["recycled", "extra absorbent", "family size"], ["2 rolls", "6 rolls"],
       ["Absorbent paper sheets for spills in the kitchen.", "Strong two ply rolls that soak up messes."],
       ["kitchen roll", "kitchen paper"], (0.48, 0.74)),
    _t("sponges", "household", "sponge", (250, 210, 50), (40, 140, 60), "dots",
       ["eco", "scrub", "non-scratch"], ["3-pack", "6-pack"],
       ["Soft foam pads with a green scouring side.", "Durable pads for scrubbing pans and counters."],
       ["scrubbing pads", "scourer"], (0.66, 0.42), label=False),
    _t("trash bags", "household", "box", (35, 35, 35), (200, 200, 200), "stripes",
       ["recycled", "drawstring", "heavy duty"], ["20 bags", "50 bags"],
       ["Strong plastic sacks for the kitchen bin.", "Tear resistant liners with tie handles."],
       ["bin liners", "garbage bags"], (0.56, 0.5)),
)

ATTRIBUTE_PHRASES: dict[str, str] = {
    "organic": "Made with certified organic ingredients.",
    "unsweetened": "No added sugar.",
    "barista": "Foams well for lattes and cappuccinos.",
    "chocolate": "With rich cocoa.",
    "lactose-free": "Lactose free and easy to digest.",
    "family size": "A big pack for the whole family.",
    "vanilla": "Flavoured with real vanilla.",
    "low-fat": "Lower in fat than the classic recipe.",
    "strawberry": "With sweet strawberries.",
    "aged": "Matured for twelve months for a deep flavour.",
    "sliced": "Ready sliced.",
    "salted": "Lightly salted.",
    "unsalted": "No salt added.",
    "spreadable": "Spreads straight from the fridge.",
    "honey": "Sweetened with honey.",
    "gluten-free": "Free from gluten.",
    "sea salt": "Seasoned with sea salt flakes.",
    "sour cream": "With a tangy sour cream and onion seasoning.",
    "barbecue": "Smoky barbecue seasoning.",
    "double chocolate": "Twice the chocolate.",
    "vegan": "Entirely plant based.",
    "whole grain": "Made from whole grains.",
    "lightly salted": "With a pinch of salt.",
    "not from concentrate": "Never made from concentrate.",
    "with pulp": "With bits of fruit pulp.",
    "lemon": "With a fresh lemon scent.",
    "lime": "With a twist of lime.",
    "berry": "With a hint of berries.",
    "zero sugar": "Zero sugar and zero calories.",
    "cherry": "Cherry flavoured.",
    "jasmine": "Scented with jasmine blossoms.",
    "mint": "Blended with peppermint leaves.",
    "decaf": "Decaffeinated.",
    "dark roast": "Dark roasted for a bold taste.",
    "espresso": "Fine espresso grind.",
    "whole wheat": "Baked with whole wheat.",
    "sourdough": "Slowly fermented sourdough.",
    "seeded": "Topped with sunflower and pumpkin seeds.",
    "butter": "Made with real butter.",
    "almond": "Filled with almond cream.",
    "mini": "Bite sized.",
    "sesame": "Sprinkled with sesame seeds.",
    "plain": "Plain and simple.",
    "everything": "Topped with garlic, onion and poppy seeds.",
    "blueberry": "Studded with blueberries.",
    "banana": "With ripe banana.",
    "corn": "Made from stone ground corn.",
    "large": "Extra large rounds.",
    "crisp": "Extra crisp bite.",
    "value pack": "Value pack.",
    "fairtrade": "Fairtrade certified.",
    "ripe": "Ready to eat today.",
    "seedless": "Without seeds.",
    "juicing": "Ideal for juicing.",
    "vine ripened": "Ripened on the vine.",
    "heirloom": "An heirloom variety.",
    "romaine": "Romaine variety with long leaves.",
    "iceberg": "Iceberg variety.",
    "basil": "With fresh basil.",
    "spicy": "With a chilli kick.",
    "garlic": "With roasted garlic.",
    "quick": "Cooks in three minutes.",
    "self-raising": "With baking powder mixed in.",
    "raw": "Raw and unfiltered.",
    "creamed": "Creamed for easy spreading.",
    "wildflower": "From wildflower meadows.",
    "pepperoni": "Topped with pepperoni.",
    "margherita": "Classic margherita.",
    "vegetarian": "Topped with grilled vegetables.",
    "petite": "Extra small and sweet.",
    "cod": "Made from cod.",
    "breaded": "In a crispy breadcrumb coat.",
    "wild": "Wild picked.",
    "mixed": "A mix of several berries.",
    "eco": "Biodegradable formula.",
    "sensitive": "Gentle on sensitive skin.",
    "unscented": "Free from perfume.",
    "color": "Keeps colours bright.",
    "recycled": "Made from recycled material.",
    "extra absorbent": "Extra absorbent.",
    "scrub": "With a tough scrubbing side.",
    "non-scratch": "Safe on non-stick pans.",
    "drawstring": "With drawstring closure.",
    "heavy duty": "Heavy duty and puncture resistant.",
}

BRANDS = (
    "Nordvik", "Greenfield", "Sunhaven", "Bluecrest", "Harvest Lane", "Oakridge", "Pure Valley", "Little Meadow",
    "Golden Spoon", "Riverbend", "Fjordmark", "Sweetleaf", "Cedar Hill", "Brightfarm", "Urban Pantry", "Hillside",
)

# (query, attribute, target type): 2 = the type with the attribute, 1 = the type without it or its aisle.
ATTRIBUTE_QUERIES: tuple[tuple[str, str, str], ...] = (
    ("organic granola", "organic", "granola bar"),
    ("vanilla yogurt", "vanilla", "greek yogurt"),
    ("unsweetened oat milk", "unsweetened", "oat milk"),
    ("lactose free milk", "lactose-free", "whole milk"),
    ("sea salt chips", "sea salt", "potato chips"),
    ("decaf coffee", "decaf", "ground coffee"),
    ("whole wheat bread", "whole wheat", "sliced bread"),
    ("gluten free pasta", "gluten-free", "spaghetti"),
    ("sugar free cola", "zero sugar", "cola"),
    ("blueberry muffins", "blueberry", "muffins"),
    ("raw honey", "raw", "honey"),
    ("vegan ice cream", "vegan", "ice cream"),
    ("pepperoni pizza", "pepperoni", "frozen pizza"),
    ("aged cheddar", "aged", "cheddar cheese"),
    ("unsalted butter", "unsalted", "butter"),
    ("lemon dish soap", "lemon", "dish soap"),
    ("unscented laundry detergent", "unscented", "laundry detergent"),
    ("sesame bagels", "sesame", "bagels"),
    ("chocolate croissant", "chocolate", "croissants"),
    ("organic bananas", "organic", "bananas"),
    ("mint tea", "mint", "green tea"),
    ("corn tortillas", "corn", "tortillas"),
    ("recycled paper towels", "recycled", "paper towels"),
)

# (query, highly relevant types, moderately relevant types): concepts that span types and need semantics.
CONCEPT_QUERIES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("healthy snack", ("granola bar", "trail mix", "rice cakes"),
     ("potato chips", "chocolate cookies", "apples", "bananas", "greek yogurt")),
    ("breakfast", ("rolled oats", "greek yogurt", "sliced bread", "croissants", "bagels", "orange juice"),
     ("whole milk", "oat milk", "butter", "honey", "ground coffee", "muffins", "bananas", "granola bar")),
    ("something to drink", ("orange juice", "sparkling water", "cola", "green tea"),
     ("ground coffee", "whole milk", "oat milk")),
    ("baking", ("flour", "butter"), ("honey", "rolled oats", "whole milk")),
    ("party snacks", ("potato chips", "chocolate cookies", "cola"),
     ("trail mix", "frozen pizza", "sparkling water", "ice cream")),
    ("quick dinner", ("frozen pizza", "fish fingers"), ("spaghetti", "tomato sauce", "frozen peas", "tortillas")),
    ("cleaning supplies", ("dish soap", "laundry detergent", "sponges"), ("paper towels", "trash bags")),
    ("sandwich", ("sliced bread", "cheddar cheese"), ("butter", "tomatoes", "lettuce", "bagels")),
    ("dessert", ("ice cream", "chocolate cookies", "muffins"), ("frozen berries", "honey", "croissants")),
    ("caffeine boost", ("ground coffee", "cola", "green tea"), ()),
    ("lunchbox for kids", ("granola bar", "apples", "bananas", "rice cakes"),
     ("cheddar cheese", "sliced bread", "orange juice")),
    ("fresh fruit", ("apples", "bananas", "oranges"), ("frozen berries", "tomatoes", "orange juice")),
    ("salad", ("lettuce", "tomatoes"), ("cheddar cheese",)),
    ("pasta night", ("spaghetti", "tomato sauce"), ("cheddar cheese", "frozen peas")),
    ("smoothie", ("frozen berries", "bananas", "greek yogurt"), ("oat milk", "whole milk", "honey", "orange juice")),
    ("taco night", ("tortillas", "tomatoes", "cheddar cheese"), ("lettuce",)),
    ("hot drink", ("ground coffee", "green tea"), ("whole milk", "oat milk")),
)
# fmt: on

_TYPES_BY_NAME = {t.name: t for t in PRODUCT_TYPES}


# ---- queries and ground-truth relevance ---------------------------------------------------------------------


@dataclass(frozen=True)
class DemoQuery:
    """A shopper query of the demo catalog with its ground-truth relevance.

    Args:
        text: the query string.
        kind: "type", "synonym", "attribute" or "concept".
        high: product types that are highly relevant (label 2), given ``attribute``.
        moderate: product types that are moderately relevant (label 1).
        attribute: for attribute queries, the attribute a ``high`` product needs for label 2 (label 1 without).
    """

    text: str
    kind: str
    high: frozenset[str]
    moderate: frozenset[str]
    attribute: str | None = None

    def relevance(self, category: str, attributes: Sequence[str] = ()) -> int:
        """Ground-truth grade of a product of type ``category`` with ``attributes`` for this query (0, 1 or 2)."""
        if category in self.high and (self.attribute is None or self.attribute in attributes):
            return 2
        if category in self.high or category in self.moderate:
            return 1
        return 0


def _aisle_mates(type_name: str) -> frozenset[str]:
    aisle = _TYPES_BY_NAME[type_name].aisle
    return frozenset(t.name for t in PRODUCT_TYPES if t.aisle == aisle and t.name != type_name)


def demo_queries() -> tuple[DemoQuery, ...]:
    """Every query of the demo catalog (about 130), in a fixed order.

    Returns:
        Type-name and synonym queries (the type is 2, its aisle 1), attribute queries (the type with the attribute
        is 2, the type without it and its aisle 1) and concept queries (explicit high/moderate type lists).
    """
    queries: list[DemoQuery] = []
    for t in PRODUCT_TYPES:
        queries.append(DemoQuery(t.name, "type", frozenset([t.name]), _aisle_mates(t.name)))
    for t in PRODUCT_TYPES:
        queries += [DemoQuery(s, "synonym", frozenset([t.name]), _aisle_mates(t.name)) for s in t.synonyms]
    for text, attribute, type_name in ATTRIBUTE_QUERIES:
        queries.append(DemoQuery(text, "attribute", frozenset([type_name]), _aisle_mates(type_name), attribute))
    for text, high, moderate in CONCEPT_QUERIES:
        queries.append(DemoQuery(text, "concept", frozenset(high), frozenset(moderate) - frozenset(high)))
    return tuple(queries)


def _check_definitions() -> None:
    """Fail at import on an inconsistent hand-written table (a typo would silently make a query irrelevant)."""
    texts = [q.text for q in demo_queries()]
    dupes = sorted({q for q in texts if texts.count(q) > 1})
    if dupes:
        raise ValueError(f"{__name__}: duplicate demo queries {dupes}")
    for q in demo_queries():
        unknown = (q.high | q.moderate) - _TYPES_BY_NAME.keys()
        if unknown:
            raise ValueError(f"{__name__}: query {q.text!r} names unknown product types {sorted(unknown)}")
        if q.attribute is not None and any(q.attribute not in _TYPES_BY_NAME[h].attributes for h in q.high):
            raise ValueError(f"{__name__}: query {q.text!r}: attribute {q.attribute!r} is not offered by {sorted(q.high)}")
    for t in PRODUCT_TYPES:
        missing = [a for a in t.attributes if a not in ATTRIBUTE_PHRASES]
        if missing:
            raise ValueError(f"{__name__}: type {t.name!r}: attributes {missing} have no entry in ATTRIBUTE_PHRASES")


_check_definitions()


def query_split(queries: Sequence[DemoQuery]) -> dict[str, str]:
    """Split queries into 'train' and 'eval' by a hash of the query text, stratified by kind.

    Within each kind the ``EVAL_FRACTION`` of queries with the smallest SHA-1 of their text are 'eval', so the split
    depends on the text only (not on the seed or the catalog size) and every kind, concepts included, is held out.

    Args:
        queries: the queries to split.

    Returns:
        Query text -> 'train' or 'eval'.
    """
    split: dict[str, str] = {}
    for kind in sorted({q.kind for q in queries}):
        ranked = sorted((q.text for q in queries if q.kind == kind), key=stable_hash)
        n_eval = max(1, round(EVAL_FRACTION * len(ranked)))
        split.update({text: ("eval" if i < n_eval else "train") for i, text in enumerate(ranked)})
    return split


# ---- products ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoProduct:
    """One generated product before it is written (holds the ground truth the DB does not: its attributes)."""

    product_id: str
    type: ProductType
    brand: str
    attributes: tuple[str, ...]
    size: str
    description_variant: int
    has_text: bool
    has_image: bool
    updated_at: str

    @property
    def title(self) -> str:
        words = [self.brand, *(a.title() for a in self.attributes), self.type.name.title(), self.size]
        return " ".join(words)

    @property
    def description(self) -> str:
        sentences = [self.type.descriptions[self.description_variant]]
        sentences += [ATTRIBUTE_PHRASES[a] for a in self.attributes]
        return " ".join(sentences)

    def row(self) -> dict[str, str | None]:
        return {
            "product_id": self.product_id,
            "title": self.title if self.has_text else None,
            "description": self.description if self.has_text else None,
            "brand": self.brand if self.has_text else None,
            "category": self.type.name,
            "aisle": self.type.aisle,
            "image_uri": f"{IMAGES_DIRNAME}/{self.product_id}.png" if self.has_image else None,
            "updated_at": self.updated_at,
        }


def _make_products(num_products: int, image_only_fraction: float, text_only_fraction: float,
                   seed: int) -> list[DemoProduct]:
    """Draw the products.

    Steps:
        1. Assign types so that every type gets ``num_products / 40`` products (+-1), in a shuffled order.
        2. Pick the image-only and then the text-only products round-robin over the types (each round takes one
           product of every type, types in shuffled order), so that every type keeps as many normal products as
           the fractions allow.
        3. Draw brand, 0-2 attributes, size, description variant and timestamp per product.
    """
    rng = random.Random(f"demo-products-{seed}")
    n_types = len(PRODUCT_TYPES)
    # 1.
    type_index = [i % n_types for i in range(num_products)]
    rng.shuffle(type_index)
    # 2.
    by_type: dict[int, list[int]] = {}
    for i, t in enumerate(type_index):
        by_type.setdefault(t, []).append(i)
    order_of_types = sorted(by_type)
    rng.shuffle(order_of_types)
    for members in by_type.values():
        rng.shuffle(members)
    round_robin = [by_type[t][r] for r in range(max(map(len, by_type.values()), default=0))
                   for t in order_of_types if r < len(by_type[t])]
    n_image_only = round(image_only_fraction * num_products)
    n_text_only = round(text_only_fraction * num_products)
    image_only = set(round_robin[:n_image_only])
    text_only = set(round_robin[n_image_only:n_image_only + n_text_only])
    # 3.
    products = []
    for i, t in enumerate(type_index):
        ptype = PRODUCT_TYPES[t]
        n_attr = rng.choice((0, 1, 1, 2))
        attributes = tuple(sorted(rng.sample(ptype.attributes, n_attr), key=ptype.attributes.index))
        updated = _BASE_TIME + timedelta(seconds=rng.randrange(180 * 24 * 3600))
        products.append(DemoProduct(
            product_id=f"p{i + 1:05d}",
            type=ptype,
            brand=rng.choice(BRANDS),
            attributes=attributes,
            size=rng.choice(ptype.sizes),
            description_variant=rng.randrange(len(ptype.descriptions)),
            has_text=i not in image_only,
            has_image=i not in text_only,
            updated_at=updated.isoformat(),
        ))
    return products


# ---- images --------------------------------------------------------------------------------------------------


def _jitter_color(rgb: RGB, rng: random.Random, hue: float = 0.025, sat: float = 0.12, val: float = 0.1) -> RGB:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    h = (h + rng.uniform(-hue, hue)) % 1.0
    s = min(1.0, max(0.0, s * rng.uniform(1 - sat, 1 + sat)))
    v = min(1.0, max(0.0, v * rng.uniform(1 - val, 1 + val)))
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _shade(rgb: RGB, factor: float) -> RGB:
    """Darken (factor < 1) or lighten (factor > 1, towards white) a colour."""
    if factor <= 1:
        return tuple(round(c * factor) for c in rgb)  # type: ignore[return-value]
    return tuple(round(c + (255 - c) * (factor - 1)) for c in rgb)  # type: ignore[return-value]


def _paint_pattern(draw: ImageDraw.ImageDraw, pattern: str, side: int, color: RGB, rng: random.Random) -> None:
    """Paint ``pattern`` over the whole canvas; the silhouette mask later clips it to the packaging."""
    step = max(4, side // rng.choice((8, 9, 10)))
    phase = rng.randrange(step)
    width = max(1, step // 4)
    if pattern == "stripes":
        for k in range(-side, 2 * side, step):
            draw.line([(k + phase, 0), (k + phase - side // 3, side)], fill=color, width=width)
    elif pattern == "dots":
        r = max(1, step // 5)
        for y in range(phase, side, step):
            for x in range(phase + (step // 2 if (y // step) % 2 else 0), side, step):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
    elif pattern == "checks":
        for y in range(0, side, step):
            for x in range(0, side, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x + phase, y, x + phase + step // 2, y + step // 2], fill=color)
    elif pattern == "waves":
        amp = step / 4
        for y0 in range(phase, side, step):
            pts = [(x, y0 + amp * math.sin(2 * math.pi * x / step)) for x in range(0, side + 4, 4)]
            draw.line(pts, fill=color, width=width)
    elif pattern == "zigzag":
        for y0 in range(phase, side, step):
            pts = [(x, y0 + (step // 4 if (x // (step // 2)) % 2 else 0)) for x in range(0, side + step, step // 2)]
            draw.line(pts, fill=color, width=width)
    elif pattern != "none":
        raise ValueError(f"unknown pattern {pattern!r}")


def _silhouette(mask: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float]) -> None:
    """Draw the packaging outline of ``shape`` into ``mask`` (255 = object)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    if shape in ("box", "pizzabox"):
        mask.rectangle(box, fill=255)
    elif shape == "carton":
        mask.rectangle([x0, y0 + 0.2 * h, x1, y1], fill=255)
        mask.polygon([(x0, y0 + 0.2 * h), (cx, y0 + 0.05 * h), (x1, y0 + 0.2 * h)], fill=255)
        mask.rectangle([x0 + 0.15 * w, y0, x1 - 0.15 * w, y0 + 0.08 * h], fill=255)
    elif shape == "bottle":
        mask.rounded_rectangle([x0, y0 + 0.3 * h, x1, y1], radius=0.15 * w, fill=255)
        mask.polygon([(x0, y0 + 0.32 * h), (cx - 0.2 * w, y0 + 0.12 * h), (cx + 0.2 * w, y0 + 0.12 * h),
                      (x1, y0 + 0.32 * h)], fill=255)
        mask.rectangle([cx - 0.2 * w, y0 + 0.04 * h, cx + 0.2 * w, y0 + 0.14 * h], fill=255)
    elif shape == "jug":
        mask.rounded_rectangle([x0, y0 + 0.2 * h, x1, y1], radius=0.1 * w, fill=255)
        mask.rectangle([x0 + 0.1 * w, y0 + 0.05 * h, x0 + 0.35 * w, y0 + 0.22 * h], fill=255)
        mask.ellipse([x1 - 0.45 * w, y0 + 0.02 * h, x1 - 0.05 * w, y0 + 0.4 * h], fill=255)
        mask.ellipse([x1 - 0.35 * w, y0 + 0.1 * h, x1 - 0.15 * w, y0 + 0.3 * h], fill=0)  # handle hole
    elif shape == "can" or shape == "roll":
        mask.rectangle([x0, y0 + 0.07 * h, x1, y1 - 0.07 * h], fill=255)
        mask.ellipse([x0, y0, x1, y0 + 0.14 * h], fill=255)
        mask.ellipse([x0, y1 - 0.14 * h, x1, y1], fill=255)
    elif shape == "bag":
        teeth = 8
        top = [(x0 + 0.04 * w + k * 0.92 * w / teeth, y0 + (0.05 * h if k % 2 else 0)) for k in range(teeth + 1)]
        mask.polygon(top + [(x1, y0 + 0.25 * h), (x1 - 0.04 * w, y1), (x0 + 0.04 * w, y1), (x0, y0 + 0.25 * h)],
                     fill=255)
    elif shape == "jar":
        mask.rounded_rectangle([x0, y0 + 0.16 * h, x1, y1], radius=0.14 * w, fill=255)
        mask.rectangle([x0 + 0.08 * w, y0, x1 - 0.08 * w, y0 + 0.2 * h], fill=255)
    elif shape == "bar":
        mask.rectangle([x0 + 0.06 * w, y0, x1 - 0.06 * w, y1], fill=255)
        teeth = 6
        for side_x, out_x in ((x0 + 0.06 * w, x0), (x1 - 0.06 * w, x1)):
            pts = [(out_x if k % 2 else side_x, y0 + k * h / teeth) for k in range(teeth + 1)]
            mask.polygon([(side_x, y0)] + pts + [(side_x, y1)], fill=255)
    elif shape == "round":
        mask.ellipse(box, fill=255)
    elif shape == "tub":
        mask.polygon([(x0, y0 + 0.12 * h), (x1, y0 + 0.12 * h), (x1 - 0.1 * w, y1), (x0 + 0.1 * w, y1)], fill=255)
        mask.ellipse([x0, y0, x1, y0 + 0.24 * h], fill=255)
    elif shape == "loaf":
        mask.rounded_rectangle([x0, y0 + 0.3 * h, x1, y1], radius=0.08 * w, fill=255)
        mask.ellipse([x0, y0, x1, y0 + 0.7 * h], fill=255)
    elif shape in ("crescent", "banana"):
        cut = 0.5 if shape == "crescent" else 0.72  # how far the cut-out ellipse reaches down: thin for bananas
        mask.ellipse([x0, y0 - 0.6 * h, x1, y1], fill=255)
        mask.ellipse([x0 + 0.08 * w, y0 - 0.6 * h - 0.2 * h, x1 - 0.08 * w, y1 - (1 - cut) * h], fill=0)
        mask.rectangle([x0 - 1, y0 - h, x1 + 1, y0], fill=0)
    elif shape == "ring":
        mask.ellipse(box, fill=255)
        mask.ellipse([cx - 0.16 * w, y0 + 0.34 * h, cx + 0.16 * w, y1 - 0.34 * h], fill=0)
    elif shape == "disc":
        mask.ellipse(box, fill=255)
    elif shape == "wedge":
        mask.polygon([(x0, y1), (x1, y1), (x1, y0 + 0.2 * h), (x0, y0 + 0.6 * h)], fill=255)
    elif shape == "sponge":
        mask.rounded_rectangle(box, radius=0.06 * w, fill=255)
    elif shape == "muffin":
        mask.polygon([(x0 + 0.1 * w, y0 + 0.45 * h), (x1 - 0.1 * w, y0 + 0.45 * h), (x1 - 0.2 * w, y1),
                      (x0 + 0.2 * w, y1)], fill=255)
        mask.ellipse([x0, y0, x1, y0 + 0.6 * h], fill=255)
    elif shape == "leafy":
        for fx, fy, fr in ((0.5, 0.5, 0.5), (0.28, 0.55, 0.3), (0.72, 0.55, 0.3), (0.5, 0.3, 0.32), (0.5, 0.7, 0.3)):
            mask.ellipse([x0 + (fx - fr) * w, y0 + (fy - fr) * h, x0 + (fx + fr) * w, y0 + (fy + fr) * h], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _details(draw: ImageDraw.ImageDraw, ptype: ProductType, box: tuple[float, float, float, float],
             color: RGB, accent: RGB) -> None:
    """Draw the parts of a silhouette that are not the packaging colour (caps, lids, leaves, toppings)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    shape = ptype.shape
    if shape == "bottle":
        draw.rectangle([cx - 0.22 * w, y0, cx + 0.22 * w, y0 + 0.08 * h], fill=accent)
    elif shape == "jug":
        draw.rectangle([x0 + 0.08 * w, y0, x0 + 0.37 * w, y0 + 0.07 * h], fill=accent)
    elif shape == "can":
        draw.ellipse([x0, y0, x1, y0 + 0.14 * h], fill=(190, 190, 195))
    elif shape == "roll":
        draw.ellipse([x0, y0, x1, y0 + 0.14 * h], fill=_shade(color, 0.85))
        draw.ellipse([cx - 0.12 * w, y0 + 0.04 * h, cx + 0.12 * w, y0 + 0.1 * h], fill=_shade(color, 0.6))
    elif shape == "jar":
        draw.rectangle([x0 + 0.06 * w, y0, x1 - 0.06 * w, y0 + 0.16 * h], fill=_shade(accent, 0.7))
    elif shape == "tub":
        draw.ellipse([x0, y0, x1, y0 + 0.24 * h], fill=accent)
    elif shape == "carton":
        draw.polygon([(x0, y0 + 0.2 * h), (cx, y0 + 0.05 * h), (x1, y0 + 0.2 * h)], fill=_shade(color, 0.8))
    elif shape == "round" and ptype.name == "apples":
        draw.line([(cx, y0 + 0.1 * h), (cx + 0.04 * w, y0 - 0.08 * h)], fill=accent, width=max(1, int(0.04 * w)))
        draw.ellipse([cx + 0.04 * w, y0 - 0.1 * h, cx + 0.3 * w, y0 + 0.02 * h], fill=(60, 140, 40))
    elif shape == "round" and ptype.name == "tomatoes":
        for k in range(5):
            a = 2 * math.pi * k / 5
            draw.line([(cx, y0 + 0.08 * h), (cx + 0.2 * w * math.cos(a), y0 + 0.08 * h + 0.1 * h * math.sin(a))],
                      fill=accent, width=max(1, int(0.05 * w)))
    elif shape == "round":
        draw.ellipse([cx - 0.05 * w, y0 + 0.02 * h, cx + 0.05 * w, y0 + 0.1 * h], fill=(60, 120, 40))
    elif shape == "banana":
        draw.ellipse([x0, y0 - 0.02 * h, x0 + 0.08 * w, y0 + 0.1 * h], fill=accent)
        draw.ellipse([x1 - 0.08 * w, y0 - 0.02 * h, x1, y0 + 0.1 * h], fill=accent)
    elif shape == "wedge":
        draw.polygon([(x0, y0 + 0.6 * h), (x1, y0 + 0.2 * h), (x1 - 0.15 * w, y0 + 0.1 * h),
                      (x0 - 0.05 * w, y0 + 0.48 * h)], fill=_shade(color, 1.3))
    elif shape == "sponge":
        draw.rounded_rectangle([x0, y0, x1, y0 + 0.35 * h], radius=0.05 * w, fill=accent)
    elif shape == "muffin":
        draw.polygon([(x0 + 0.1 * w, y0 + 0.45 * h), (x1 - 0.1 * w, y0 + 0.45 * h), (x1 - 0.2 * w, y1),
                      (x0 + 0.2 * w, y1)], fill=accent)
        for k in range(1, 6):
            xt = x0 + 0.1 * w + k * 0.8 * w / 6
            xb = x0 + 0.2 * w + k * 0.6 * w / 6
            draw.line([(xt, y0 + 0.45 * h), (xb, y1)], fill=_shade(accent, 0.8), width=max(1, int(0.02 * w)))
    elif shape == "pizzabox":
        r = 0.38 * h
        draw.ellipse([cx - r, (y0 + y1) / 2 - r, cx + r, (y0 + y1) / 2 + r], fill=accent)
        for fx, fy in ((-0.4, -0.3), (0.35, -0.2), (-0.1, 0.4), (0.3, 0.35), (0.0, -0.05)):
            px, py, pr = cx + fx * r, (y0 + y1) / 2 + fy * r, 0.13 * r
            draw.ellipse([px - pr, py - pr, px + pr, py + pr], fill=(180, 30, 30))


def _render_image(product: DemoProduct, image_size: int, seed: int, font_cache: dict[int, ImageFont.ImageFont]
                  ) -> Image.Image:
    """Draw one product: the type's silhouette, colour and pattern with per-product jitter, on a pale background.

    Drawn at twice the size and downsampled, which smooths the edges without a slow anti-aliased renderer.
    """
    rng = random.Random(f"demo-image-{seed}-{product.product_id}")
    ptype = product.type
    side = image_size * 2
    bg = tuple(round(c * 255) for c in colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.03, 0.12),
                                                           rng.uniform(0.88, 0.98)))
    color = _jitter_color(ptype.color, rng)
    accent = _jitter_color(ptype.accent, rng, hue=0.015, sat=0.08, val=0.06)
    scale = rng.uniform(0.85, 1.1)
    w, h = ptype.size[0] * scale * side, ptype.size[1] * scale * side
    cx = side / 2 + rng.uniform(-0.07, 0.07) * side
    cy = side / 2 + rng.uniform(-0.06, 0.06) * side
    box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)

    # 1. packaging colour + pattern + label band, clipped to the silhouette
    body = Image.new("RGB", (side, side), color)
    body_draw = ImageDraw.Draw(body)
    _paint_pattern(body_draw, ptype.pattern, side, accent, rng)
    if ptype.label:
        band_top = box[1] + h * rng.uniform(0.45, 0.52)
        band = [box[0], band_top, box[2], band_top + 0.2 * h]
        body_draw.rectangle(band, fill=(246, 244, 236))
        font_px = max(8, int(0.09 * side))
        font = font_cache.setdefault(font_px, ImageFont.load_default(size=font_px))
        text = product.brand.split()[0].upper()[:7]
        body_draw.text(((box[0] + box[2]) / 2, band_top + 0.1 * h), text, fill=_shade(color, 0.45), font=font,
                       anchor="mm")
    mask = Image.new("L", (side, side), 0)
    _silhouette(ImageDraw.Draw(mask), ptype.shape, box)
    obj = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    obj.paste(body, mask=mask)
    _details(ImageDraw.Draw(obj), ptype, box, color, accent)

    # 2. a soft shadow and a small rotation, so that position and pose vary as in product photos
    canvas = Image.new("RGB", (side, side), bg)
    shadow_y = min(side - 2, box[3] + 0.02 * side)
    ImageDraw.Draw(canvas).ellipse([box[0], shadow_y - 0.04 * side, box[2], shadow_y + 0.03 * side],
                                   fill=_shade(bg, 0.88))
    obj = obj.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BICUBIC, center=(cx, cy))
    canvas.paste(obj, mask=obj.getchannel("A"))
    return canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)


# ---- search log and human labels -----------------------------------------------------------------------------


def _binomial(rng: random.Random, n: int, p: float) -> int:
    return sum(rng.random() < p for _ in range(n))


_CLICK_RATE = {0: 0.01, 1: 0.06, 2: 0.22}
_PURCHASE_RATE = {0: 0.05, 1: 0.12, 2: 0.3}


def _simulate_search_log(queries: Sequence[DemoQuery], split: dict[str, str], products: Sequence[DemoProduct],
                         seed: int) -> list[dict]:
    """Impressions, clicks and purchases of 20-40 products per 'train' query.

    A shown list is ~45% highly relevant products, ~30% moderately relevant (aisle mates, related concepts) and the
    rest random, ranked by a noisy score; impressions fall with the rank and clicks/purchases follow relevance.
    'eval' queries get no log rows: the labeling step mines training pairs from the log, and a held-out query must
    not reach training that way.
    """
    rng = random.Random(f"demo-log-{seed}")
    rows: list[dict] = []
    for q in queries:
        if split[q.text] != "train":
            continue
        grades = [q.relevance(p.type.name, p.attributes) for p in products]
        pools = {g: [i for i, gi in enumerate(grades) if gi == g] for g in (0, 1, 2)}
        n_shown = min(len(products), rng.randint(20, 40))
        shown = rng.sample(pools[2], min(len(pools[2]), round(0.45 * n_shown)))
        shown += rng.sample(pools[1], min(len(pools[1]), round(0.3 * n_shown)))
        rest = [i for i in range(len(products)) if i not in set(shown)]
        shown += rng.sample(rest, min(len(rest), n_shown - len(shown)))
        ranked = sorted(shown, key=lambda i: -(grades[i] + rng.gauss(0, 0.8)))
        top = rng.randint(40, 120)
        for rank, i in enumerate(ranked):
            impressions = max(1, round(top / (1 + 0.15 * rank)))
            clicks = _binomial(rng, impressions, _CLICK_RATE[grades[i]])
            purchases = _binomial(rng, clicks, _PURCHASE_RATE[grades[i]])
            rows.append({"query": q.text, "product_id": products[i].product_id, "impressions": impressions,
                         "clicks": clicks, "purchases": purchases})
    return rows


def _noisy(grade: int, rng: random.Random) -> int:
    """Annotator noise: with probability ``LABEL_NOISE`` move the grade by one step (never 0 <-> 2)."""
    if rng.random() >= LABEL_NOISE:
        return grade
    if grade == 1:
        return rng.choice((0, 2))
    return 1


def _human_labels(queries: Sequence[DemoQuery], split: dict[str, str], products: Sequence[DemoProduct],
                  seed: int) -> list[dict]:
    """Judged (query, product) pairs.

    'train' queries: ~10 pairs each (up to 4 graded 2, 3 graded 1, the rest 0; topped up from other grades when a
    grade has too few products). 'eval' queries: every product of each aisle that holds a relevant product, plus
    ``EVAL_RANDOM_PRODUCTS`` random others, so every product with a true grade > 0 is judged.
    """
    rng = random.Random(f"demo-labels-{seed}")
    rows: list[dict] = []
    for q in queries:
        grades = [q.relevance(p.type.name, p.attributes) for p in products]
        if split[q.text] == "train":
            want = {2: 4, 1: 3, 0: 3}
            chosen: list[int] = []
            for g, k in want.items():
                pool = [i for i, gi in enumerate(grades) if gi == g]
                chosen += rng.sample(pool, min(k, len(pool)))
            rest = [i for i in range(len(products)) if i not in set(chosen)]
            chosen += rng.sample(rest, min(len(rest), max(0, 10 - len(chosen))))
        else:
            aisles = {products[i].type.aisle for i, g in enumerate(grades) if g > 0}
            chosen = [i for i, p in enumerate(products) if p.type.aisle in aisles]
            rest = [i for i in range(len(products)) if products[i].type.aisle not in aisles]
            chosen += rng.sample(rest, min(len(rest), EVAL_RANDOM_PRODUCTS))
        for i in sorted(chosen):
            rows.append({"query": q.text, "product_id": products[i].product_id, "label": _noisy(grades[i], rng),
                         "annotator": rng.choice(ANNOTATORS), "split": split[q.text]})
    return rows


# ---- entry point ---------------------------------------------------------------------------------------------


def generate_demo_catalog(out_dir: Path, num_products: int = 480, image_only_fraction: float = 0.12,
                          text_only_fraction: float = 0.08, seed: int = 0, image_size: int = 128) -> Path:
    """Generate the demo catalog (SQLite DB + PNG images) into ``out_dir``, or reuse an identical one.

    The folder holds ``catalog.db`` and ``images/<product_id>.png``; ``image_uri`` is relative to the folder
    ("images/p00001.png"). When ``catalog.db`` already records the same generator version and parameters in its
    ``meta`` table it is returned as is; otherwise the catalog is built in a temporary sibling folder and renamed
    into place (replacing whatever ``out_dir`` held). The result depends only on the arguments.

    Args:
        out_dir: catalog folder (e.g. ``PipelineConfig.catalog_dir()``).
        num_products: number of products; 40 or more gives every product type at least one product.
        image_only_fraction: share of products without title, description and brand (found by image alone).
        text_only_fraction: share of products without an image.
        seed: seed of every random choice (products, images, search log, labels).
        image_size: side of the square PNG images in pixels.

    Returns:
        Path of ``out_dir/catalog.db``.

    Raises:
        ValueError: an argument is out of range (names the argument, the value and the allowed range).
    """
    if num_products < 1:
        raise ValueError(f"num_products must be >= 1, got {num_products}")
    for name, value in (("image_only_fraction", image_only_fraction), ("text_only_fraction", text_only_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if image_only_fraction + text_only_fraction >= 1.0:
        raise ValueError(f"image_only_fraction + text_only_fraction must be < 1 so that some products have both "
                         f"text and image, got {image_only_fraction} + {text_only_fraction}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")

    params = {"num_products": num_products, "image_only_fraction": image_only_fraction,
              "text_only_fraction": text_only_fraction, "seed": seed, "image_size": image_size}
    meta_items = {"generator": GENERATOR, "generator_version": GENERATOR_VERSION,
                  "params": json.dumps(params, sort_keys=True)}

    def build(tmp_dir: Path) -> None:
        started = time.perf_counter()
        products = _make_products(num_products, image_only_fraction, text_only_fraction, seed)
        queries = demo_queries()
        split = query_split(queries)
        images_dir = tmp_dir / IMAGES_DIRNAME
        images_dir.mkdir()
        fonts: dict[int, ImageFont.ImageFont] = {}
        for p in products:
            if p.has_image:
                _render_image(p, image_size, seed, fonts).save(images_dir / f"{p.product_id}.png", optimize=False)
        log_rows = _simulate_search_log(queries, split, products, seed)
        label_rows = _human_labels(queries, split, products, seed)
        write_catalog_db(tmp_dir / DB_FILENAME, [p.row() for p in products], log_rows, label_rows, meta_items)
        logger.info("demo catalog: %d products, %d queries (%d eval), %d search_log rows, %d human labels in %.1fs",
                    len(products), len(queries), sum(s == "eval" for s in split.values()), len(log_rows),
                    len(label_rows), time.perf_counter() - started)

    return build_catalog_dir(Path(out_dir), meta_items, build)
