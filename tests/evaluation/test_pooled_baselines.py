"""The baselines' shared image pass gives exactly what the encoder's own product path gives."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from dashclip_core.config import PipelineConfig
from dashclip_core.evaluation.untrained import PooledImageFeatures, untrained_encoders
from dashclip_core.models.image_stem import embeddings_from_pooled
from dashclip_core.models.inputs import InputBuilder, embed_products


def test_embeddings_from_pooled_match_encode_product(tiny_config, tmp_path):
    # The photos are this test's own: evaluation reads them under the run's image policy, so they are an allowed root.
    cfg = PipelineConfig.from_file(tiny_config).with_overrides(**{"catalog.image_roots": (str(tmp_path),)})
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
    products = pd.DataFrame({
        "product_id": ["both", "image-only", "text-only", "both-2"],
        "title": ["Oat milk", None, "Kiwi", "Red pepper"],
        "description": ["Creamy.", None, None, "Sweet and crunchy."],
        "image_uri": [paths[0], paths[1], None, paths[2]],
    })
    p_enc, _ = untrained_encoders(cfg)
    builder = InputBuilder(cfg.model)
    pooled = PooledImageFeatures(p_enc, cfg, products)
    assert pooled.features.shape[0] == 3 and set(pooled.row) == {"both", "image-only", "both-2"}

    emb, image_emb = embeddings_from_pooled(p_enc, builder, products, pooled.of(["both", "image-only", "both-2"]))
    expected = embed_products(p_enc, builder, products)
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    only = embed_products(p_enc, builder, products.iloc[[0, 1, 3]].assign(title=None, description=None))
    np.testing.assert_allclose(image_emb[[0, 1, 3]], only, atol=1e-5)
    assert not image_emb[2].any()  # the text-only product has no image embedding
