"""Shared inputs of the training tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def stage2_data(tmp_path_factory, tiny_config):
    """(products, labels) of a 48-product demo catalog snapshot with its human labels: what stage 2 trains on."""
    import pandas as pd

    from dashclip_core.catalog.demo import generate_demo_catalog
    from dashclip_core.catalog.snapshot import extract_snapshot
    from dashclip_core.config import PipelineConfig
    from dashclip_core.labeling.pairs import combine_labels

    tmp = tmp_path_factory.mktemp("stage2-data")
    db = generate_demo_catalog(tmp / "cat", num_products=48, seed=1)
    snap = tmp / "snap"
    snap.mkdir()
    extract_snapshot(PipelineConfig.from_file(tiny_config), f"sqlite:///{db}", snap)
    products = pd.read_parquet(snap / "products.parquet")
    human = pd.read_parquet(snap / "human_labels.parquet")
    return products, combine_labels(human, human.iloc[:0][["query", "product_id", "label"]])


@pytest.fixture(scope="session")
def photo_roots():
    """``photo_roots(products)``: the override that allows the photo folders of ``products`` (catalogs these
    tests generate live outside the config's own catalog folder, so their folder is listed as an operator
    would, CONTRACTS "Image policy")."""
    from pathlib import Path

    def overrides(products) -> dict:
        folders = sorted({str(Path(u).parent) for u in products["image_uri"].dropna()})
        return {"catalog.image_roots": tuple(folders)}

    return overrides
