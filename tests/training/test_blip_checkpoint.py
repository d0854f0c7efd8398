"""A BLIP ITM checkpoint folder loads through from_pretrained, trains a step, and saves self-contained."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import torch
from PIL import Image

from dashclip_core.config import ImageTowerConfig, ModelConfig, PipelineConfig, TextTowerConfig
from dashclip_core.models.encoders import (
    ProductEncoder,
    QueryEncoder,
    load_product_encoder,
    load_query_encoder,
    save_encoder,
)
from dashclip_core.models.inputs import InputBuilder, embed_products, embed_queries
from dashclip_core.models.towers import minilm_path


def _tiny_blip_checkpoint(path):
    from transformers import AutoTokenizer, BlipConfig, BlipForImageTextRetrieval

    conf = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "encoder_hidden_size": 32, "vocab_size": 30524},
        image_text_hidden_size=16,
    )
    torch.manual_seed(0)
    BlipForImageTextRetrieval(conf).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return BlipForImageTextRetrieval.from_pretrained(path)


def test_blip_checkpoint_round_trip(tmp_path):
    ckpt = tmp_path / "blip-itm"
    blip = _tiny_blip_checkpoint(ckpt)
    cfg = ModelConfig(embed_dim=16, blip_checkpoint=str(ckpt),
                      image=ImageTowerConfig(image_size=32, freeze_backbone=False), text=TextTowerConfig(trainable_layers=-1))
    enc = ProductEncoder(cfg)
    # The towers and ITC projections carry the checkpoint's weights.
    assert torch.equal(enc.image_tower.vision_model.embeddings.patch_embedding.weight, blip.vision_model.embeddings.patch_embedding.weight)
    assert torch.equal(enc.text_proj.weight, blip.text_proj.weight)

    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "a.png")
    products = pd.DataFrame({"product_id": ["a", "b"], "title": [None, "oat milk"], "description": [None, None],
                             "image_uri": [str(tmp_path / "a.png"), None]})
    builder = InputBuilder(cfg)
    before = embed_products(enc, builder, products)
    q_enc = QueryEncoder.from_product_encoder(enc, trainable_layers=-1)
    q_before = embed_queries(q_enc, builder, ["oat milk"])

    out = tmp_path / "saved"
    save_encoder(enc, cfg, out / "product")
    save_encoder(q_enc, cfg, out / "query")
    shutil.rmtree(ckpt)  # the saved folders must not need the original checkpoint
    loaded = load_product_encoder(out / "product")
    builder2 = InputBuilder(loaded.cfg)
    assert np.allclose(embed_products(loaded, builder2, products), before, atol=1e-6)
    assert np.allclose(embed_queries(load_query_encoder(out / "query"), builder2, ["oat milk"]), q_before, atol=1e-6)


def test_stage1_step_on_blip_towers(tmp_path):
    from dashclip_core.training.stage1 import Stage1Model

    ckpt = tmp_path / "blip-itm"
    _tiny_blip_checkpoint(ckpt)
    cfg = PipelineConfig().with_overrides(**{
        "model.embed_dim": 16, "model.blip_checkpoint": str(ckpt),
        "model.image": ImageTowerConfig(image_size=32, freeze_backbone=False), "model.text": TextTowerConfig(trainable_layers=-1),
    })
    model = Stage1Model(cfg)
    loss, _ = model(torch.randn(4, 3, 32, 32), torch.randint(1000, 2000, (4, 6)), torch.ones(4, 6, dtype=torch.long),
                    torch.arange(4), torch.Generator().manual_seed(0))
    loss.backward()
    idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert torch.isfinite(loss) and idle == []
