"""A tiny DAG-run folder for the evaluation tests, built without Airflow or Ray.

The demo catalog (96 products, as configs/tiny.yaml) is extracted like ``extract_catalog`` does, its
human labels become ``label_pairs/labels.parquet``, and the tiny encoders at initialisation are saved
where ``train_stage1`` / ``train_stage2`` put them. Untrained weights are enough: these tests check
the evaluation plumbing, not model quality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from dashclip_core.config import PipelineConfig


@dataclass
class TinyRun:
    cfg: PipelineConfig
    run_dir: Path
    products: pd.DataFrame
    labels: pd.DataFrame
    product_dir: Path
    query_dir: Path


@pytest.fixture(scope="session")
def tiny_run(tiny_config, tmp_path_factory) -> TinyRun:
    from dashclip_core.catalog.demo import generate_demo_catalog
    from dashclip_core.catalog.snapshot import extract_snapshot
    from dashclip_core.labeling.pairs import combine_labels
    from dashclip_core.layout import PRODUCT_ENCODER, QUERY_ENCODER
    from dashclip_core.models.encoders import QueryEncoder, save_encoder
    from dashclip_core.training.stage1 import build_stage1

    root = tmp_path_factory.mktemp("eval-run")
    # The catalog lives outside the config's own catalog folder, so its photo folder is listed as a root,
    # as an operator would for a catalog DB the config does not name (CONTRACTS "Image policy").
    cfg = PipelineConfig.from_file(tiny_config).with_overrides(**{"catalog.image_roots": (str(root / "catalog"),)})
    db = generate_demo_catalog(root / "catalog", num_products=cfg.catalog.demo_num_products, seed=cfg.catalog.seed)
    run_dir = root / "dashclip_nightly" / "run-1"
    for step in ("extract_catalog", "validate_catalog", "label_pairs", "train_stage1", "train_stage2"):
        (run_dir / step).mkdir(parents=True)
    (run_dir / "validate_catalog" / "clean.parquet").mkdir()  # a partitioned table, as the gate writes it
    extract_snapshot(cfg, f"sqlite:///{db}", run_dir / "extract_catalog")
    products = pd.read_parquet(run_dir / "extract_catalog" / "products.parquet")
    products.to_parquet(run_dir / "validate_catalog" / "clean.parquet" / "part-00000.parquet", index=False)
    human = pd.read_parquet(run_dir / "extract_catalog" / "human_labels.parquet")
    labels = combine_labels(human, human.iloc[:0])
    labels.to_parquet(run_dir / "label_pairs" / "labels.parquet", index=False)

    encoder = build_stage1(cfg).encoder.eval()
    product_dir = save_encoder(encoder, cfg.model, run_dir / "train_stage1" / PRODUCT_ENCODER)
    query_dir = save_encoder(QueryEncoder.from_product_encoder(encoder, 0), cfg.model, run_dir / "train_stage2" / QUERY_ENCODER)
    return TinyRun(cfg, run_dir, products, labels, product_dir, query_dir)
