"""Second-stage re-ranking with the product encoder's image-grounded text encoder (ITM head).

Retrieve-then-rerank as in BLIP (Li et al. 2022, arXiv 2201.12086, Sec. 5.1: ITC picks the top-k
candidates, ITM re-ranks them) and ALBEF. Here the "text" is the shopper's query and the image is
the product photo, so the ITM head scores how well the photo matches the query.

Steps, per eval query:
  (1) take the top-k ANN candidates (query_emb . product_emb, k = ``DEFAULT_RERANK_K`` by default);
  (2) score each candidate that has an image: P(match) = softmax(itm_logits)[1] of (query text, product image);
  (3) re-order the candidates with an image by that probability (ties keep their ANN order);
      candidates without an image keep their ANN slot (see :func:`rerank_candidates` for why);
  (4) the ranks after k are the ANN ranks, unchanged, so Recall@K for K >= k equals the ANN figure.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pandas as pd

logger = logging.getLogger(__name__)

DEFAULT_RERANK_K = 20  # candidates re-scored per query; BLIP re-ranks k=256 on COCO, our catalogs are far smaller


def rerank_candidates(candidates: Sequence[str], match_prob: dict[str, float]) -> list[str]:
    """Step (3): re-order ``candidates`` by ITM match probability, keeping text-only products in place.

    Products without an image have no ITM score: the ITM head needs image tokens. Putting them all
    after (or before) the scored ones would punish (or reward) a modality, and mapping their ANN
    cosine onto the ITM probability scale mixes two uncalibrated scores. So they keep the exact
    position ANN gave them, and the scored products are permuted among the remaining positions.

    Args:
        candidates: product ids, best ANN first.
        match_prob: P(match) per product id that has an image; ids missing from it are unscored.

    Returns:
        The same ids, re-ordered (a permutation of ``candidates``).
    """
    scored = [p for p in candidates if p in match_prob]
    # Python's sort is stable: equal probabilities keep their ANN order.
    ordered = iter(sorted(scored, key=lambda p: -match_prob[p]))
    return [next(ordered) if p in match_prob else p for p in candidates]


def itm_match_probs(encoder, builder, queries: Sequence[str], candidates: Sequence[Sequence[str]], products: pd.DataFrame,
                    batch_size: int = 32, stem_store=None) -> list[dict[str, float]]:
    """Step (2): P(match) of every (query, candidate product image) pair from the ITM head.

    Each query is text-encoded once and each distinct candidate image once (image tokens are large,
    (N, H) per product, so they are computed chunk by chunk rather than kept for the whole catalog).

    Args:
        encoder: a :class:`~dashclip_core.models.encoders.ProductEncoder` (eval mode is set here).
        builder: the :class:`~dashclip_core.models.inputs.InputBuilder` of the encoder's model config.
        queries: Q query strings.
        candidates: Q lists of product ids (the ANN top-k of each query).
        products: snapshot rows with ``product_id`` and ``image_uri`` (null = no image).
        batch_size: images per encoder pass and pairs per ITM pass.

    Returns:
        Q dicts ``{product_id: P(match)}`` holding only the candidates that have an image.

    Raises:
        ValueError: ``queries`` and ``candidates`` differ in length, or a candidate id is not in ``products``.
    """
    import torch

    if len(queries) != len(candidates):
        raise ValueError(f"itm_match_probs: {len(queries)} queries but {len(candidates)} candidate lists")
    by_id = products.drop_duplicates("product_id").set_index("product_id")
    unknown = {p for c in candidates for p in c} - set(by_id.index)
    if unknown:
        raise ValueError(f"itm_match_probs: candidate product_id(s) not in the products frame, e.g. {sorted(unknown)[:5]}")
    has_image = by_id["image_uri"].notna()
    pairs = [(qi, p) for qi, cands in enumerate(candidates) for p in dict.fromkeys(cands) if has_image[p]]
    out: list[dict[str, float]] = [{} for _ in queries]
    if not pairs:
        return out
    encoder.eval()
    with torch.no_grad():
        tok = builder.queries(list(queries))
        _, text_states = encoder.encode_text(tok["input_ids"], tok["attention_mask"])  # (Q, T, H)
        image_ids = list(dict.fromkeys(p for _, p in pairs))
        for start in range(0, len(image_ids), batch_size):
            chunk = image_ids[start : start + batch_size]
            if stem_store is not None and stem_store.covers(chunk):  # the run's frozen stem: only the tower's tail runs
                _, image_tokens = encoder.encode_image(stem_store.stems(chunk), from_stem=True)  # (c, N, H)
            else:
                image_tokens = _image_tokens(encoder, builder, by_id.loc[chunk, "image_uri"].tolist())  # (c, N, H)
            local = {p: i for i, p in enumerate(chunk)}
            chunk_pairs = [(qi, p) for qi, p in pairs if p in local]
            for s in range(0, len(chunk_pairs), batch_size):
                batch = chunk_pairs[s : s + batch_size]
                qi = torch.tensor([q for q, _ in batch])
                pi = torch.tensor([local[p] for _, p in batch])
                logits = encoder.itm_logits(text_states[qi], tok["attention_mask"][qi], image_tokens[pi])  # (b, 2)
                prob = torch.softmax(logits.float(), dim=-1)[:, 1]
                for (q, p), v in zip(batch, prob.tolist()):
                    out[q][p] = v
    return out


def _image_tokens(encoder, builder, image_uris: list[str]):
    """(c, N, H) image tokens projected to the text width, as the fusion layers read them."""
    n = len(image_uris)
    batch = builder.products([None] * n, [None] * n, image_uris)
    _, tokens = encoder.encode_image(batch["pixels"])
    return tokens


def itm_rerank(encoder, builder, queries: Sequence[str], ann_rankings: Sequence[Sequence[str]], products: pd.DataFrame,
               k: int = DEFAULT_RERANK_K, stem_store=None) -> tuple[list[list[str]], dict]:
    """Steps (1)-(4): re-rank the top ``k`` of each ANN ranking with ITM; the tail stays as ANN ranked it.

    Args:
        encoder, builder: as in :func:`itm_match_probs`.
        queries: Q query strings.
        ann_rankings: Q ANN rankings (product ids, best first), at least as long as the deepest metric cut-off.
        products: snapshot rows with ``product_id`` and ``image_uri``.
        k: how many ANN candidates are re-scored (>= 1).
        stem_store: the run's frozen image stem (``models/image_stem.StemStore``), to skip the stem for the photos it covers.

    Returns:
        (Q re-ranked lists, stats) with stats ``rerank_k`` and ``rerank_scored_share`` (share of the
        candidates that had an image and so an ITM score).

    Raises:
        ValueError: ``k < 1``.
    """
    if k < 1:
        raise ValueError(f"itm_rerank: k must be >= 1, got {k}")
    heads = [list(r[:k]) for r in ann_rankings]
    probs = itm_match_probs(encoder, builder, queries, heads, products, stem_store=stem_store)
    reranked = [rerank_candidates(head, p) + list(r[k:]) for head, p, r in zip(heads, probs, ann_rankings)]
    n_candidates = sum(len(h) for h in heads)
    stats = {"rerank_k": k, "rerank_scored_share": float(sum(len(p) for p in probs) / n_candidates) if n_candidates else 0.0}
    return reranked, stats

