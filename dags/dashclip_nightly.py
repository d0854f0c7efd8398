"""DashCLIP nightly retrain: wiring only (schedule, params, retries, gates). Imports no torch/ray/mlflow/faiss/GX."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from dashclip_core.config import DEFAULT_CONFIG
from dashclip_core.layout import DAG_ID
from tasks import steps

# Gates and training fail fast on bad data (AirflowFailException skips retries); I/O hiccups retry.
DEFAULT_ARGS = {"retries": 1, "retry_delay": timedelta(minutes=2)}


@dag(
    dag_id=DAG_ID,
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["dashclip", "training"],
    params={
        "config_path": Param(DEFAULT_CONFIG, type="string", description="Pipeline config (YAML), relative to the project root"),
        "sample_size": Param(None, type=["null", "integer"], minimum=0, description="Products to sample from the catalog (empty = config)"),
        "epochs": Param(None, type=["null", "integer"], minimum=0, description="Epochs of both training stages (empty = config)"),
        "num_workers": Param(None, type=["null", "integer"], minimum=1, description="Ray Train workers (empty = config)"),
        "use_gpu": Param(None, type=["null", "boolean"], description="Train on GPUs (empty = config)"),
        "promote": Param(None, type=["null", "boolean"], description="Move `champion` when the new model wins (empty = config)"),
        "labeler": Param(None, type=["null", "string"], enum=[None, "softmax", "cross_encoder", "openai"],
                         description="Who grades the candidate pairs (empty = config)"),
        "llm_model": Param(None, type=["null", "string"], description="openai labeler: model id, e.g. ft:... (empty = config)"),
        "max_cost_usd": Param(None, type=["null", "number"], minimum=0, description="Stop labelling at this spend (empty = config)"),
        "labeling_dry_run": Param(None, type=["null", "boolean"], description="Only estimate the labelling cost, then stop (empty = config)"),
    },
    doc_md=__doc__,
)
def dashclip_nightly():
    """### DashCLIP nightly
    extract catalog → **catalog gate** → label pairs (teacher scored on held-out human labels: **quality gate**;
    cache, budget) → **label gate** → stage 1 (ITC+ITM, Ray) →
    stage 2 (QCC, Ray) ‖ embedding backfill (Ray Data) → **embedding gate** → FAISS index → evaluate →
    register in MLflow (`challenger`, `champion` when it wins).
    """
    # Each step gets the summaries (XComs) of the outputs it reads: their `uri` is the handle to the folder.
    catalog = task(steps.extract_catalog)()
    clean = task(steps.validate_catalog)(catalog)
    labels = task(steps.label_pairs)(catalog, clean)
    labels_ok = task(steps.validate_labels)(labels)
    stage1 = task(steps.train_stage1)(clean, labels_ok)
    stage2 = task(steps.train_stage2)(clean, labels, stage1)
    embeddings = task(steps.backfill_embeddings)(clean, stage1)
    embeddings_ok = task(steps.validate_embeddings)(clean, embeddings)
    index = task(steps.build_index)(embeddings, embeddings_ok, labels, stage2)
    evaluation = task(steps.evaluate)(clean, labels, embeddings, stage1, stage2, index)
    task(steps.register_model)(catalog, clean, labels, stage1, stage2, index, evaluation)


dashclip_nightly()
