"""build.py and budget.budget_for: which labeler and which budget a config gives."""

from __future__ import annotations

import pandas as pd
import pytest

from dashclip_core.config import LabelingConfig
from dashclip_core.labeling.budget import budget_for
from dashclip_core.labeling.build import build_labeler

PRODUCTS = pd.DataFrame({"product_id": ["p1"], "title": ["Oat Milk"], "description": [None], "category": ["Milk"],
                         "aisle": ["Dairy"]})


def test_budget_only_for_llms_or_explicit_limits():
    assert budget_for(LabelingConfig()) is None
    assert budget_for(LabelingConfig(labeler="openai")).max_tokens is None  # prices the run, no limit
    assert budget_for(LabelingConfig(max_cost_usd=5.0, price_per_1k_input=0.1)).max_cost_usd == 5.0


def test_unknown_kinds_and_incomplete_llm_configs_raise():
    with pytest.raises(ValueError, match="labeling.labeler must be one of"):
        build_labeler(LabelingConfig(labeler="gpt"), pd.DataFrame(), PRODUCTS, seed=0)
    with pytest.raises(ValueError, match="needs an API base URL"):
        build_labeler(LabelingConfig(labeler="openai", llm_model="m"), pd.DataFrame(), PRODUCTS, seed=0)
