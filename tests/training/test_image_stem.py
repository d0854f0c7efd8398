"""Partial unfreezing of the EfficientNet-Lite tower and the cached frozen stem that stage 1 trains from."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dashclip_core.config import ImageTowerConfig, PipelineConfig
from dashclip_core.models.image_stem import StemStore, build_stem_store
from dashclip_core.models.inputs import InputBuilder
from dashclip_core.models.towers import EfficientNetLiteTower
from dashclip_core.training.stage1 import build_stage1, flip_horizontally, text_views

SIZE = 64  # small photos: the tower is the real pretrained Lite0, only the input is small


def lite0(trainable_blocks: int, freeze: bool = True) -> PipelineConfig:
    base = PipelineConfig.from_file("configs/tiny.yaml")
    image = ImageTowerConfig(backbone="efficientnet-lite0", pretrained=True, image_size=SIZE, freeze_backbone=freeze, trainable_blocks=trainable_blocks)
    return replace(base, model=replace(base.model, image=image))


@pytest.mark.parametrize("n", [0, 3, 16])
def test_only_the_last_blocks_and_head_train(n):
    tower = EfficientNetLiteTower(lite0(n).model.image)
    blocks = tower.backbone._blocks
    trains = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    assert trains == [False] * (len(blocks) - n) + [True] * n
    assert tower.backbone._conv_head.weight.requires_grad == (n > 0)
    assert not tower.backbone._conv_stem.weight.requires_grad
    assert not any(p.requires_grad for p in tower.backbone._fc.parameters())  # ImageNet classifier unused


def test_out_of_range_trainable_blocks_is_a_config_error():
    with pytest.raises(ValueError, match="trainable_blocks must be in 0..16"):
        EfficientNetLiteTower(lite0(17).model.image)


def test_batchnorm_keeps_imagenet_statistics_in_train_mode():
    tower = EfficientNetLiteTower(lite0(4).model.image).train()
    before = tower.backbone._bn1.running_mean.clone()
    tower(torch.randn(4, 3, SIZE, SIZE))
    assert torch.equal(tower.backbone._bn1.running_mean, before)
    assert all(not m.training for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_stem_then_tail_equals_the_whole_tower_and_gradients_stop_at_the_stem():
    cfg = lite0(4)
    model = build_stage1(cfg).eval()
    enc = model.encoder
    pixels = torch.randn(3, 3, SIZE, SIZE)
    full_emb, full_tokens = enc.encode_image(pixels)
    stem = enc.image_stem(pixels)
    assert stem.shape[1] == enc.image_tower.backbone._blocks[12]._block_args.input_filters
    emb, tokens = enc.encode_image(stem, from_stem=True)
    assert torch.allclose(emb, full_emb, atol=1e-5) and torch.allclose(tokens, full_tokens, atol=1e-5)

    enc.train()
    emb, _ = enc.encode_image(stem.requires_grad_(False), from_stem=True)
    emb.sum().backward()
    assert enc.image_tower.backbone._blocks[-1]._project_conv.weight.grad is not None
    assert enc.image_tower.backbone._blocks[0]._project_conv.weight.grad is None


@pytest.mark.parametrize("cfg", [lite0(2), lite0(0, freeze=False), PipelineConfig.from_file("configs/tiny.yaml")], ids=["frozen", "trainable", "vit"])
def test_the_config_alone_tells_whether_a_tower_has_a_frozen_stem(cfg):
    """train_stage1 decides whether to start the stem task from the config, without building the model."""
    from dashclip_core.models.towers import has_frozen_stem

    assert has_frozen_stem(cfg.model.image) == build_stage1(cfg).encoder.has_frozen_image_stem


def test_a_fully_trainable_tower_has_no_frozen_stem():
    enc = build_stage1(lite0(0, freeze=False)).encoder
    assert not enc.has_frozen_image_stem
    with pytest.raises(ValueError, match="no frozen stem"):
        enc.image_stem(torch.randn(1, 3, SIZE, SIZE))


def test_stem_store_rows_match_a_live_stem_and_is_reused_only_for_the_same_tower(tmp_path, demo_photos):
    cfg = lite0(2).with_overrides(**{"ray.num_cpus": 1, **_allowed(demo_photos)})
    products = pd.concat([demo_photos, pd.DataFrame({"product_id": ["text-only"], "title": ["t"], "description": ["d"], "image_uri": [None]})])
    enc = build_stage1(cfg).encoder
    store = build_stem_store(enc, cfg.model, products, tmp_path / "stem", threads=1, batch_size=2)  # 2 + 2 + 1: partial last batch
    assert store.array.dtype == np.float16 and store.array.shape[0] == 5 and "text-only" not in store.row
    live = enc.eval().image_stem(InputBuilder(cfg.model).images(demo_photos["image_uri"].tolist()))
    order = demo_photos["product_id"].tolist()[::-1]
    assert torch.allclose(store.stems(order), live.flip(0), atol=2e-2, rtol=1e-2)  # float16 storage; rows follow the ids asked
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically

    # The tail from the stored stem gives the tower's pooled output.
    pooled = store.pooled(enc.image_tower, demo_photos["product_id"])
    np.testing.assert_allclose(pooled, enc.image_tower(InputBuilder(cfg.model).images(demo_photos["image_uri"].tolist()))[1].detach().numpy(), atol=5e-2)

    mtime = (tmp_path / "stem.npy").stat().st_mtime_ns
    again = build_stem_store(enc, cfg.model, products, tmp_path / "stem", threads=1)
    assert (tmp_path / "stem.npy").stat().st_mtime_ns == mtime and again.row == store.row  # reused, not recomputed
    other = lite0(3)
    assert StemStore.open(tmp_path / "stem", other.model) is None  # a different split of the tower never reads it
    assert build_stem_store(build_stage1(lite0(0, freeze=False)).encoder, lite0(0, freeze=False).model, products, tmp_path / "x", threads=1) is None


def test_flip_mirrors_the_chosen_rows_only():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3)
    assert torch.equal(flip_horizontally(x, 0.0, torch.Generator()), x)
    out = flip_horizontally(x, 1.0, torch.Generator())
    assert torch.equal(out, x.flip(-1))
    assert torch.equal(out[0, 0, 0], torch.tensor([2.0, 1.0, 0.0]))


def test_title_only_view_drops_descriptions_but_never_leaves_a_row_without_text():
    rows = pd.DataFrame({"title": ["Oat Milk", None, "Kiwi"], "description": ["Creamy oat drink.", "Only a description.", "Green."]})
    titles, desc = text_views(rows, 1.0, torch.Generator())
    assert titles[0] == "Oat Milk" and not isinstance(titles[1], str)
    assert desc == [None, "Only a description.", None]  # a row without a title keeps its description
    assert text_views(rows, 0.0, torch.Generator())[1] == rows["description"].tolist()


def _allowed(photos: pd.DataFrame) -> dict:
    """The photos' folder as an allowed image root (it is not the config's catalog folder)."""
    return {"catalog.image_roots": tuple(sorted({str(Path(u).parent) for u in photos["image_uri"].dropna()}))}


@pytest.fixture(scope="module")
def demo_photos(tmp_path_factory) -> pd.DataFrame:
    """A few real PNG product photos from the demo catalog generator."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        p = folder / f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return pd.DataFrame({"product_id": [f"p{i}" for i in range(5)], "title": ["t"] * 5, "description": ["d"] * 5, "image_uri": paths})


def test_stage2_anchor_embeddings_from_the_stem_match_the_photo_path(tmp_path, demo_photos):
    from dashclip_core.layout import IMAGE_STEM
    from dashclip_core.models.inputs import embed_products
    from dashclip_core.training.stage1 import image_stem_store
    from dashclip_core.training.stage2 import anchor_embeddings

    cfg = lite0(2).with_overrides(**{"ray.num_cpus": 1, **_allowed(demo_photos)})
    products = pd.concat([demo_photos, pd.DataFrame({"product_id": ["text-only"], "title": ["Kiwi"], "description": [None], "image_uri": [None]})],
                         ignore_index=True)
    enc = build_stage1(cfg).encoder.eval()
    from_photos = anchor_embeddings(enc, cfg, products, tmp_path)  # no store yet: decodes the photos
    np.testing.assert_allclose(from_photos, embed_products(enc, InputBuilder(cfg.model), products), atol=1e-6)
    assert image_stem_store(cfg, products, tmp_path) is not None and (tmp_path / f"{IMAGE_STEM}.npy").exists()
    from_stem = anchor_embeddings(enc, cfg, products, tmp_path)
    np.testing.assert_allclose(from_stem, from_photos, atol=2e-2)  # float16 stem
    assert (np.abs(from_stem - from_photos).max(axis=1) > 0).any()  # really took the stem path


def test_backfill_actor_uses_the_stem_store_and_matches_the_photo_path(tmp_path, demo_photos):
    from dashclip_core.backfill.embed import ProductEmbedder
    from dashclip_core.layout import IMAGE_STEM
    from dashclip_core.models.encoders import save_encoder
    from dashclip_core.training.stage1 import image_stem_store

    cfg = lite0(2).with_overrides(**{"ray.num_cpus": 1, **_allowed(demo_photos)})
    products = pd.concat([demo_photos, pd.DataFrame({"product_id": ["text-only"], "title": ["Kiwi"], "description": [None], "image_uri": [None]})],
                         ignore_index=True)
    save_encoder(build_stage1(cfg).encoder, cfg.model, tmp_path / "enc")
    plain = ProductEmbedder(str(tmp_path / "enc"))(products).to_pandas()  # the actor returns an Arrow table
    assert image_stem_store(cfg, products, tmp_path) is not None
    actor = ProductEmbedder(str(tmp_path / "enc"), stem_path=str(tmp_path / IMAGE_STEM))
    assert actor.stem is not None
    cached = actor(products).to_pandas()
    assert cached["product_id"].tolist() == products["product_id"].tolist()
    np.testing.assert_allclose(np.stack(cached["embedding"]), np.stack(plain["embedding"]), atol=2e-2)
    new_photo = products.iloc[[0]].assign(product_id="not-in-store")  # a product the store lacks: decoded from its photo
    np.testing.assert_allclose(np.stack(actor(new_photo).to_pandas()["embedding"]), np.stack(plain["embedding"])[[0]], atol=1e-6)


def test_itm_rerank_scores_from_the_stem_match_the_photo_path(tmp_path, demo_photos):
    from dashclip_core.evaluation.rerank import itm_match_probs
    from dashclip_core.training.stage1 import image_stem_store

    cfg = lite0(2).with_overrides(**{"ray.num_cpus": 1, **_allowed(demo_photos)})
    enc = build_stage1(cfg).encoder.eval()
    store = image_stem_store(cfg, demo_photos, tmp_path)
    builder = InputBuilder(cfg.model)
    ids = demo_photos["product_id"].tolist()
    plain = itm_match_probs(enc, builder, ["red apple", "oat milk"], [ids, ids[:2]], demo_photos)
    cached = itm_match_probs(enc, builder, ["red apple", "oat milk"], [ids, ids[:2]], demo_photos, stem_store=store)
    for a, b in zip(plain, cached):
        assert a.keys() == b.keys()
        assert all(abs(a[p] - b[p]) < 2e-2 for p in a)


def test_stem_rows_read_what_numpy_saved_in_the_order_asked(tmp_path):
    """The stem cache is read row by row with pread (no memory map, so no worker keeps the file's pages in its RSS):
    any rows, repeated and out of order, come back exactly as saved; a row past the end is an error naming the file."""
    from dashclip_core.models.image_stem import StemRows

    rng = np.random.default_rng(0)
    saved = rng.standard_normal((9, 3, 4, 5)).astype(np.float16)
    np.save(tmp_path / "stem.npy", saved)
    rows = StemRows(tmp_path / "stem.npy")
    assert len(rows) == 9 and rows.shape == saved.shape and rows.dtype == np.float16
    order = [7, 0, 7, 3, 8]
    np.testing.assert_array_equal(rows[order], saved[order])
    assert rows[[]].shape == (0, 3, 4, 5)
    with pytest.raises(IndexError, match="stem.npy"):
        rows[[9]]


def test_the_stem_built_in_a_ray_task_equals_the_in_process_one_and_its_worker_exits(tmp_path, demo_photos, caplog):
    """train_stage1 builds the stem in a one-shot Ray task, so decoding every photo does not grow the Airflow process
    for the rest of training: same rows as the in-process build, the task's worker gone afterwards, and a store that
    already covers the products is reopened without a task."""
    import logging
    import re
    import time

    import psutil
    import ray

    from dashclip_core.training.stage1 import image_stem_store, image_stem_store_in_ray

    cfg = lite0(2).with_overrides(**{"ray.num_cpus": 1, **_allowed(demo_photos)})
    local = image_stem_store(cfg, demo_photos, tmp_path / "local")
    try:
        with caplog.at_level(logging.INFO, logger="dashclip_core.training.stage1"):
            remote = image_stem_store_in_ray(cfg, demo_photos, tmp_path / "ray")
        assert remote.row == local.row
        np.testing.assert_array_equal(remote.array[range(len(demo_photos))], local.array[range(len(demo_photos))])
        pid = int(re.search(r"Ray worker pid (\d+)", caplog.text).group(1))
        assert pid != os.getpid()

        def alive(pid: int) -> bool:
            try:
                return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:  # gone (also between a check and a read: no pid_exists-then-Process race)
                return False

        deadline = time.time() + 30
        while alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive(pid), "the stem task's worker is still alive"
        ray.shutdown()  # a store that already covers the products needs no Ray at all
        assert image_stem_store_in_ray(cfg, demo_photos, tmp_path / "ray").row == local.row
        assert not ray.is_initialized()
    finally:
        ray.shutdown()
