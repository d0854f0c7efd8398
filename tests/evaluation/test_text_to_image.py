"""Text -> image metrics on hand-made photos and scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dashclip_core.evaluation.text_to_image import taxonomy_judgments, text_to_image_metrics

CATALOG = pd.DataFrame({"category": ["Granny-Smith", "Pink-Lady", "Oat-Milk"], "aisle": ["Apple", "Apple", "Oat-Drink"]})
PHOTOS = pd.DataFrame({"product_id": ["g1", "g2", "p1", "o1"],
                       "category": ["Granny-Smith", "Granny-Smith", "Pink-Lady", "Oat-Milk"],
                       "aisle": ["Apple", "Apple", "Apple", "Oat-Drink"]})
CLASSES = ["Granny-Smith", "Pink-Lady", "Oat-Milk"]
PROMPTS = ["granny smith", "pink lady", "oat milk"]


def test_judgments_grade_fine_2_coarse_siblings_1():
    j = taxonomy_judgments(CLASSES, PROMPTS, PHOTOS, {"Granny-Smith": "Apple", "Pink-Lady": "Apple", "Oat-Milk": "Oat-Drink"})
    got = {(q, p): lab for q, p, lab in j.itertuples(index=False)}
    assert got == {("granny smith", "g1"): 2, ("granny smith", "g2"): 2, ("granny smith", "p1"): 1,
                   ("pink lady", "g1"): 1, ("pink lady", "g2"): 1, ("pink lady", "p1"): 2, ("oat milk", "o1"): 2}


def test_perfect_scores_give_ndcg_1_and_a_bad_order_less():
    perfect = np.array([[2, 2, 1, 0], [1, 1, 2, 0], [0, 0, 0, 1]], float)
    m = text_to_image_metrics(perfect, CLASSES, PROMPTS, PHOTOS, CATALOG, ks=(2,))
    assert m["t2i_ndcg@2"] == pytest.approx(1.0) and m["t2i_recall@2"] == pytest.approx(1.0) and m["t2i_n_queries"] == 3
    wrong = np.array([[0, 0, 1, 2], [1, 1, 2, 0], [0, 0, 0, 1]], float)  # granny smith: oat milk first, then pink lady
    bad = text_to_image_metrics(wrong, CLASSES, PROMPTS, PHOTOS, CATALOG, ks=(2,))
    # granny smith's top 2 = o1 (0), p1 (1): DCG = 1/log2(3); ideal = 3 + 3/log2(3); recall of the two grade-2 photos = 0
    g_ndcg = (1 / np.log2(3)) / (3 + 3 / np.log2(3))
    assert bad["t2i_ndcg@2"] == pytest.approx((g_ndcg + 1 + 1) / 3)
    assert bad["t2i_recall@2"] == pytest.approx((0 + 1 + 1) / 3)


def test_classes_without_a_photo_are_not_asked_and_shapes_are_checked():
    m = text_to_image_metrics(np.zeros((3, 1)), CLASSES, PROMPTS, PHOTOS.iloc[[3]], CATALOG, ks=(1,))
    assert m["t2i_n_queries"] == 1
    with pytest.raises(ValueError, match="does not match"):
        text_to_image_metrics(np.zeros((2, 4)), CLASSES, PROMPTS, PHOTOS, CATALOG)
