"""Incremental backfill (issue 12 item 4): only new or changed products are embedded; a new model embeds all."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow  # three Ray Data backfills on a local Ray (~1 min on 2 cores)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_config):
    from dashclip_core.catalog.demo import generate_demo_catalog
    from dashclip_core.catalog.snapshot import extract_snapshot
    from dashclip_core.config import PipelineConfig
    from dashclip_core.models.encoders import save_encoder
    from dashclip_core.training.stage1 import build_stage1

    tmp = tmp_path_factory.mktemp("incremental")
    db = generate_demo_catalog(tmp / "cat", num_products=30, seed=4)
    cfg = PipelineConfig.from_file(tiny_config).with_overrides(**{
        "catalog.image_roots": (str(tmp / "cat"),), "ray.backfill_actors": 2, "ray.backfill_batch_size": 8,
        "catalog.chunk_rows": 8, "ray.num_cpus": 2})  # as many actors as CPUs (the read/write must not starve); 30 products: the backfill reads and looks up 4 chunks
    (tmp / "snap").mkdir()
    extract_snapshot(cfg, f"sqlite:///{db}", tmp / "snap")
    products = pd.read_parquet(tmp / "snap" / "products.parquet")
    model_a = save_encoder(build_stage1(cfg).encoder, cfg.model, tmp / "model-a")
    import torch

    other = build_stage1(cfg).encoder
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))  # another model: retrained weights
    model_b = save_encoder(other, cfg.model, tmp / "model-b")
    return cfg, products, model_a, model_b, tmp


def _backfill(setup, products, model, name):
    from dashclip_core.backfill.embed import backfill_embeddings, read_embeddings

    cfg, _, _, _, tmp = setup
    out = tmp / f"{name}.parquet"
    info = backfill_embeddings(cfg, products, model, out, store_dir=tmp / "store")
    ids, matrix = read_embeddings(out)
    wanted = products["product_id"].astype(str).tolist()
    assert sorted(ids) == sorted(wanted) and len(set(ids)) == len(ids)  # one row per product, any order
    assert out.is_dir() and info["n_parts"] >= 1
    row = {p: i for i, p in enumerate(ids)}
    return info, matrix[[row[p] for p in wanted]]  # in the products' order


def test_unchanged_rerun_embeds_nothing_and_a_change_embeds_only_that_row(setup):
    _, products, model_a, _, _ = setup
    first, emb = _backfill(setup, products, model_a, "first")
    assert first["n_embedded"] == len(products) and first["n_reused"] == 0

    again, emb_again = _backfill(setup, products, model_a, "again")
    assert again["n_embedded"] == 0 and again["n_reused"] == len(products)
    np.testing.assert_array_equal(emb_again, emb)

    changed = products.copy()
    changed.loc[3, "title"] = "a brand new title"  # text changed
    photo_row = next(i for i in changed.index if i > 5 and pd.notna(changed.at[i, "image_uri"]))
    photo = changed.at[photo_row, "image_uri"]
    st = os.stat(photo)
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # photo replaced in place (new mtime)
    expected_changed = {changed.at[3, "product_id"], changed.at[photo_row, "product_id"], "brand-new"}
    new_product = changed.iloc[[0]].assign(product_id="brand-new", title="oat milk barista")
    deleted = changed.at[5, "product_id"]
    changed = pd.concat([changed.drop(index=5), new_product], ignore_index=True)  # one deleted, one added

    inc, emb_inc = _backfill(setup, changed, model_a, "changed")
    assert inc["n_embedded"] == 3 and inc["n_reused"] == len(changed) - 3
    assert deleted not in set(changed["product_id"])  # a deleted product is not in the output (nor the index)
    reference = dict(zip(products["product_id"], emb))
    for i, pid in enumerate(changed["product_id"]):
        if pid not in expected_changed:
            np.testing.assert_array_equal(emb_inc[i], reference[pid])


def test_a_new_model_embeds_everything(setup):
    _, products, model_a, model_b, _ = setup
    _backfill(setup, products, model_a, "a")
    info, emb_b = _backfill(setup, products, model_b, "b")
    assert info["n_embedded"] == len(products) and info["n_reused"] == 0
    _, emb_a = _backfill(setup, products, model_a, "a-again")
    assert not np.allclose(emb_a, emb_b)


def test_stores_of_old_models_are_pruned_and_a_vanished_part_is_re_embedded(tmp_path):
    from dashclip_core.backfill.incremental import EmbeddingStore

    stores = [EmbeddingStore(tmp_path / f"model-{i}") for i in range(5)]
    for i, store in enumerate(stores):
        store.add([f"k{i}"], np.ones((1, 4), np.float32))
        store.touch()
        os.utime(store.folder, (1_000_000 + i, 1_000_000 + i))  # used in order 0..4
    current = stores[1]
    current.touch()

    removed = current.prune_others(keep=3)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-1", "model-3", "model-4"]
    assert sorted(p.name for p in removed) == ["model-0", "model-2"]
    assert set(current.lookup(["k1", "k0"])) == {"k1"}
    listed = current.parts()
    for part in listed:
        part.unlink()  # pruned by another run between the listing and the read
    current.parts = lambda: listed
    assert current.lookup(["k1"]) == {}
