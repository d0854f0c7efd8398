"""ITM re-ranking: the re-order rule by hand, ITM scores against a direct forward pass, and the report's
two dashclip systems (ANN-only and re-ranked) with a scorer forced to prefer known products."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from dashclip_core.evaluation import rerank
from dashclip_core.evaluation.metrics import evaluate_rankings
from dashclip_core.evaluation.report import eval_judgments, run_evaluation
from dashclip_core.evaluation.rerank import itm_match_probs, itm_rerank, rerank_candidates


@pytest.fixture(scope="module")
def encoder_and_builder(tiny_run):
    from dashclip_core.models.encoders import load_product_encoder
    from dashclip_core.models.inputs import InputBuilder

    return load_product_encoder(tiny_run.product_dir), InputBuilder(tiny_run.cfg.model)


@pytest.fixture(scope="module")
def outputs(tiny_run):
    """One real evaluation of the tiny run (real ITM scorer, default k)."""
    from dashclip_core.models.encoders import load_product_encoder
    from dashclip_core.models.inputs import InputBuilder, embed_products

    products = tiny_run.products
    emb = embed_products(load_product_encoder(tiny_run.product_dir), InputBuilder(tiny_run.cfg.model), products)
    return run_evaluation(tiny_run.cfg, products, tiny_run.labels, products["product_id"].tolist(), emb,
                          tiny_run.query_dir, tiny_run.product_dir)


def test_rerank_candidates_sorts_scored_products_and_keeps_text_only_slots() -> None:
    # Given ANN order a, t1, b, c, t2 where t1/t2 have no image (no ITM score)
    ann = ["a", "t1", "b", "c", "t2"]
    # When ITM prefers b, then c, then a
    out = rerank_candidates(ann, {"a": 0.1, "b": 0.9, "c": 0.5})
    # Then the scored products take the scored slots in ITM order; text-only ones stay put
    assert out == ["b", "t1", "c", "a", "t2"]
    assert rerank_candidates(ann, {"a": 0.5, "b": 0.5, "c": 0.5}) == ann  # ties keep the ANN order
    assert rerank_candidates(ann, {}) == ann


def test_itm_probs_match_a_direct_forward_pass(tiny_run, encoder_and_builder) -> None:
    encoder, builder = encoder_and_builder
    products = tiny_run.products
    with_image = products.loc[products["image_uri"].notna(), "product_id"].tolist()[:3]
    text_only = products.loc[products["image_uri"].isna(), "product_id"].tolist()[:1]
    assert with_image and text_only, "the tiny demo catalog should have products with and without an image"

    probs = itm_match_probs(encoder, builder, ["red apples", "oat milk"], [with_image + text_only, with_image[:1]], products, batch_size=2)

    assert set(probs[0]) == set(with_image) and set(probs[1]) == set(with_image[:1])  # no score without an image
    assert all(0.0 < v < 1.0 for p in probs for v in p.values())
    # The same pair, one at a time, through encode_text / encode_image / itm_logits.
    row = products.set_index("product_id").loc[with_image[1]]
    tok = builder.queries(["red apples"])
    pixels = builder.products([None], [None], [row["image_uri"]])["pixels"]
    with torch.no_grad():
        _, states = encoder.encode_text(tok["input_ids"], tok["attention_mask"])
        _, image_tokens = encoder.encode_image(pixels)
        direct = torch.softmax(encoder.itm_logits(states, tok["attention_mask"], image_tokens), dim=-1)[0, 1].item()
    assert probs[0][with_image[1]] == pytest.approx(direct, abs=1e-5)


def test_itm_rerank_reverses_an_order_the_itm_head_disagrees_with(tiny_run, encoder_and_builder) -> None:
    encoder, builder = encoder_and_builder
    products = tiny_run.products
    ids = products.loc[products["image_uri"].notna(), "product_id"].tolist()[:8]
    probs = itm_match_probs(encoder, builder, ["fresh bread"], [ids], products)[0]
    assert len(set(probs.values())) > 1
    ann = sorted(ids, key=lambda p: probs[p])  # worst ITM score first: re-ranking must change it
    tail = products.loc[products["image_uri"].notna(), "product_id"].tolist()[8:12]

    reranked, stats = itm_rerank(encoder, builder, ["fresh bread"], [ann + tail], products, k=8)

    assert reranked[0][:8] == sorted(ids, key=lambda p: -probs[p]) != ann
    assert reranked[0][8:] == tail  # ranks after k are ANN's
    assert stats == {"rerank_k": 8, "rerank_scored_share": 1.0}
    with pytest.raises(ValueError, match="k must be >= 1"):
        itm_rerank(encoder, builder, ["x"], [ann], products, k=0)
    with pytest.raises(ValueError, match="not in the products frame"):
        itm_match_probs(encoder, builder, ["x"], [["no-such-product"]], products)


def test_report_keeps_ann_and_rerank_apart_with_a_forced_scorer(tiny_run, monkeypatch) -> None:
    # Given an ITM scorer forced to score the judged-relevant products 1 and every other product 0
    judgments = eval_judgments(tiny_run.labels)
    relevant = {(q, p) for q, p, lab in judgments[["query", "product_id", "label"]].itertuples(index=False) if lab >= 1}
    has_image = set(tiny_run.products.loc[tiny_run.products["image_uri"].notna(), "product_id"])
    calls = []

    def forced(encoder, builder, queries, candidates, products, batch_size=32, stem_store=None):
        calls.append(len(queries))
        return [{p: float((q, p) in relevant) for p in cands if p in has_image} for q, cands in zip(queries, candidates)]

    monkeypatch.setattr(rerank, "itm_match_probs", forced)
    from dashclip_core.models.encoders import load_product_encoder
    from dashclip_core.models.inputs import InputBuilder, embed_products

    products = tiny_run.products
    emb = embed_products(load_product_encoder(tiny_run.product_dir), InputBuilder(tiny_run.cfg.model), products)
    k = len(products)  # every product is a candidate, so each relevant product can be lifted

    # When the report is built
    out = run_evaluation(tiny_run.cfg, products, tiny_run.labels, products["product_id"].tolist(), emb,
                         tiny_run.query_dir, tiny_run.product_dir, rerank_k=k)

    # Then within each query's re-ranked list the relevant products with an image come before the
    # other products with an image, and products without one keep their ANN position
    assert calls == [out.report["n_eval_queries"]]
    for q, ann in out.rankings["dashclip"].items():
        new = out.rankings["dashclip_itm_rerank"][q]
        assert sorted(new) == sorted(ann)
        scored = [float((q, p) in relevant) for p in new if p in has_image]
        assert scored == sorted(scored, reverse=True), q
        assert [i for i, p in enumerate(new) if p not in has_image] == [i for i, p in enumerate(ann) if p not in has_image]
    systems = out.report["systems"]
    assert {"dashclip", "dashclip_itm_rerank", "untrained_encoders", "image_backbone_linear_probe", "bm25_titles"} == set(systems)
    ann_block, rerank_block = systems["dashclip"], systems["dashclip_itm_rerank"]
    assert rerank_block["rerank_k"] == k and 0.0 < rerank_block["rerank_scored_share"] < 1.0
    # An oracle re-ranker beats the untrained ANN order, and each block is the metric of its own rankings.
    assert rerank_block["ndcg@10"] > ann_block["ndcg@10"]
    ks, min_label = tiny_run.cfg.evaluation.ks, tiny_run.cfg.evaluation.min_relevant_label
    for system in ("dashclip", "dashclip_itm_rerank"):
        expected = evaluate_rankings(out.rankings[system], judgments, ks=ks, min_relevant_label=min_label)
        assert systems[system]["ndcg@10"] == pytest.approx(expected["ndcg@10"])
        assert systems[system]["recall@10"] == pytest.approx(expected["recall@10"])
    assert "zero_shot_fine_top1" in ann_block and "zero_shot_fine_top1" not in rerank_block  # zero-shot is embedding-only


def test_real_rerank_block_and_zero_shot_predictions_kept_out_of_the_report(outputs, tiny_run) -> None:
    systems = outputs.report["systems"]
    block = systems["dashclip_itm_rerank"]
    assert block["rerank_k"] == rerank.DEFAULT_RERANK_K
    for key in ("ndcg@10", "recall@10", "recall@50"):
        assert 0.0 <= block[key] <= 1.0
    # Ranks after k are ANN's, so recall at a cut-off >= k is the ANN figure.
    assert block["recall@50"] == pytest.approx(systems["dashclip"]["recall@50"])

    zs = outputs.zero_shot
    assert list(zs.columns) == ["product_id", "fine_true", "fine_pred", "coarse_true", "coarse_pred"]
    assert len(zs) == systems["dashclip"]["zero_shot_n_photos"] > 0
    assert set(zs["fine_pred"]) <= set(tiny_run.products["category"].astype(str))
    assert systems["dashclip"]["zero_shot_fine_top1"] == pytest.approx((zs["fine_pred"] == zs["fine_true"]).mean())
    # The report stays numbers only: no per-photo or per-query lists in any system block.
    assert all(isinstance(v, (int, float)) or v is None for m in systems.values() for v in m.values())
    assert len(json.dumps(outputs.report)) < 20_000
    assert isinstance(outputs.judgments, pd.DataFrame) and not outputs.judgments.empty
