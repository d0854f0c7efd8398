"""MLflow pyfunc holding both DashCLIP encoders, so query and product spaces always ship together.

Models-from-code (MLflow's recommended form): this file is logged as the model's code and ends with
``set_model``. Artifacts: ``product_encoder`` and ``query_encoder`` folders (weights + model config).

``predict`` takes a DataFrame:
- with a ``query`` column (and optional ``query_id``): query embeddings;
- else product rows with ``product_id`` and any of ``title``, ``description``, ``image_path`` or
  ``image_b64`` (each may be null: image-only and text-only products both work): product embeddings.
It returns the id column plus ``embedding`` (list of float32, L2-normalised).

Images: a caller must not make the serving host open arbitrary files. ``image_b64`` (the image file's
bytes, base64) always works, within the byte and pixel caps. ``image_path`` (a local path or ``s3://``
URI) is read only under the roots the operator allows: ``$DASHCLIP_SERVING_IMAGE_ROOTS``
(``os.pathsep``-separated local folders and ``s3://bucket/prefix``) or the ``image_roots`` list of the
load-time ``model_config`` (``mlflow.pyfunc.load_model(uri, model_config={"image_roots": [...]})``);
with neither, every ``image_path`` is refused with an error naming the rows. ``model_config`` may also set
``max_image_bytes``, ``max_image_pixels`` and ``image_read_timeout_s``.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import mlflow
import pandas as pd

LIMIT_KEYS = {"max_image_bytes": "max_bytes", "max_image_pixels": "max_pixels", "image_read_timeout_s": "timeout_s"}


def serving_image_policy(model_config: dict | None):
    """The policy of a served model: roots from ``$DASHCLIP_SERVING_IMAGE_ROOTS`` and ``model_config["image_roots"]``
    (none = no path may be read), limits from ``model_config`` (else the defaults)."""
    from dashclip_core.storage.images import ImagePolicy

    conf = dict(model_config or {})
    roots = conf.get("image_roots") or []
    if isinstance(roots, str):
        roots = [roots]
    limits = {field: (float if field == "timeout_s" else int)(conf[key]) for key, field in LIMIT_KEYS.items()
              if conf.get(key) is not None}
    return ImagePolicy.for_serving(extra_roots=roots, **limits)


class DashclipEncoders(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from dashclip_core.layout import PRODUCT_ENCODER, QUERY_ENCODER
        from dashclip_core.models.encoders import load_product_encoder, load_query_encoder
        from dashclip_core.models.inputs import InputBuilder

        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.product_encoder = load_product_encoder(Path(context.artifacts[PRODUCT_ENCODER]))
        self.query_encoder = load_query_encoder(Path(context.artifacts[QUERY_ENCODER]))
        self.images = serving_image_policy(getattr(context, "model_config", None))
        self.builder = InputBuilder(self.product_encoder.cfg, images=self.images)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from dashclip_core.models.inputs import embed_products, embed_queries
        from dashclip_core.storage.images import ImageRejected

        df = model_input
        if "query" in df.columns:
            bad = [i for i, q in enumerate(df["query"]) if not isinstance(q, str) or not q.strip()]
            if bad:
                raise ValueError(f"rows {bad[:10]}: field 'query' is empty or not text")
            emb = embed_queries(self.query_encoder, self.builder, df["query"].tolist())
            ids = df["query_id"] if "query_id" in df.columns else pd.Series(range(len(df)))
            return pd.DataFrame({"query_id": ids.to_numpy(), "embedding": [e.tolist() for e in emb]})
        if "product_id" not in df.columns:
            raise ValueError(f"input needs a 'query' column (queries) or a 'product_id' column (products); got {list(df.columns)}")
        rows = pd.DataFrame({
            "product_id": df["product_id"],
            "title": df["title"] if "title" in df.columns else None,
            "description": df["description"] if "description" in df.columns else None,
            "image_uri": df["image_path"] if "image_path" in df.columns else (df["image_uri"] if "image_uri" in df.columns else None),
        })
        inline = df["image_b64"] if "image_b64" in df.columns else pd.Series([None] * len(df), index=df.index)
        empty = rows["title"].isna() & rows["description"].isna() & rows["image_uri"].isna() & inline.isna().to_numpy()
        if empty.any():
            bad = rows.loc[empty, "product_id"].tolist()[:10]
            raise ValueError(f"products {bad}: no title, description, image_path or image_b64; a product needs at least one")
        rows["image_uri"] = self._image_sources(rows["product_id"].tolist(), rows["image_uri"].tolist(), inline.tolist())
        try:
            emb = embed_products(self.product_encoder, self.builder, rows)
        except ImageRejected as err:  # name the product(s), not only the path
            named = [f"product {p!r} (row {i})" for i, (p, src) in enumerate(zip(rows["product_id"], rows["image_uri"]))
                     if isinstance(src, str) and src == err.uri]
            raise ValueError(f"{', '.join(named[:10]) or err.uri}: {err}") from None
        return pd.DataFrame({"product_id": rows["product_id"].to_numpy(), "embedding": [e.tolist() for e in emb]})

    def _image_sources(self, ids: list, paths: list, inline: list) -> list:
        """Per row: None, an allowed ``image_path``, or the decoded ``image_b64`` bytes. Every refused row is
        named in one ``ValueError`` before any image is read."""
        from dashclip_core.storage.images import SERVING_ROOTS_ENV, ImageRejected, InlineImage

        policy, sources, problems = self.images, [], []
        for i, (pid, path, data) in enumerate(zip(ids, paths, inline)):
            path, data = _present(path), _present(data)
            where = f"product {pid!r} (row {i})"
            if path is not None and data is not None:
                problems.append(f"{where}: give image_path or image_b64, not both")
                sources.append(None)
            elif data is not None:
                if not isinstance(data, str | bytes) or len(data) > 4 * (policy.max_bytes // 3 + 1) + 4:
                    problems.append(f"{where}: field image_b64 is not base64 text of at most {policy.max_bytes} bytes")
                    sources.append(None)
                    continue
                try:
                    sources.append(InlineImage(base64.b64decode(data, validate=True), f"{where} field image_b64"))
                except (binascii.Error, ValueError) as err:
                    problems.append(f"{where}: field image_b64 is not valid base64 ({err})")
                    sources.append(None)
            elif path is not None:
                try:
                    policy.locate(str(path))
                    sources.append(str(path))
                except ImageRejected as err:
                    hint = (f"; this model reads image_path only under ${SERVING_ROOTS_ENV} or the load-time model_config "
                            f"image_roots (now: {policy.describe_roots()}); send the image inline as image_b64"
                            if err.reason_code == "image_outside_roots" else "")
                    problems.append(f"{where}: field image_path {str(path)!r} refused ({err.reason_code}){hint}")
                    sources.append(None)
            else:
                sources.append(None)
        if problems:
            raise ValueError(f"{len(problems)} product row(s) refused: " + " | ".join(problems[:10]))
        return sources


def _present(value):
    """None for a missing cell (None, NaN, pd.NA, blank string), else the value."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return None if pd.isna(value) else value
    except (TypeError, ValueError):  # array-like cells: present
        return value


mlflow.models.set_model(DashclipEncoders())
