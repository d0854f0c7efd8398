"""MLflow pyfunc holding both DashCLIP encoders, so query and product spaces always ship together.

Models-from-code (MLflow's recommended form): this file is logged as the model's code and ends with
``set_model``. Artifacts: ``product_encoder`` and ``query_encoder`` folders (weights + model config).

``predict`` takes a DataFrame:
- with a ``query`` column (and optional ``query_id``): query embeddings;
- else product rows with ``product_id`` and any of ``title``, ``description``, ``image_path``
  (each may be null: image-only and text-only products both work): product embeddings.
It returns the id column plus ``embedding`` (list of float32, L2-normalised).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd


class DashclipEncoders(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from dashclip_core.layout import PRODUCT_ENCODER, QUERY_ENCODER
        from dashclip_core.models.encoders import load_product_encoder, load_query_encoder
        from dashclip_core.models.inputs import InputBuilder

        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.product_encoder = load_product_encoder(Path(context.artifacts[PRODUCT_ENCODER]))
        self.query_encoder = load_query_encoder(Path(context.artifacts[QUERY_ENCODER]))
        self.builder = InputBuilder(self.product_encoder.cfg)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from dashclip_core.models.inputs import embed_products, embed_queries

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
        empty = rows["title"].isna() & rows["description"].isna() & rows["image_uri"].isna()
        if empty.any():
            bad = rows.loc[empty, "product_id"].tolist()[:10]
            raise ValueError(f"products {bad}: no title, description or image_path; a product needs at least one")
        emb = embed_products(self.product_encoder, self.builder, rows)
        return pd.DataFrame({"product_id": rows["product_id"].to_numpy(), "embedding": [e.tolist() for e in emb]})


mlflow.models.set_model(DashclipEncoders())
