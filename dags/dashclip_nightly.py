"""DashCLIP nightly retrain: wiring only (schedule, params, retries, gates). Imports no torch/ray/mlflow/faiss/GX."""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task

from dashclip_core.config import DEFAULT_CONFIG, PipelineConfig
from dashclip_core.layout import DAG_ID, Step
from tasks import steps

# Timeouts and concurrency are fixed when the DAG is parsed: from the operator's config, not a run's params.
RUNNER = PipelineConfig.from_file(os.environ.get("DASHCLIP_DAG_CONFIG") or DEFAULT_CONFIG).airflow
LONG_STEPS = {Step.TRAIN_STAGE1: RUNNER.training_timeout_minutes, Step.TRAIN_STAGE2: RUNNER.training_timeout_minutes,
              Step.BACKFILL_EMBEDDINGS: RUNNER.training_timeout_minutes, Step.LABEL_PAIRS: RUNNER.label_timeout_minutes}

# Gates and training fail fast on bad data (AirflowFailException skips retries); I/O hiccups retry.
# Every task has an execution_timeout: a read that hangs (a FIFO, a stuck mount, a silent server) fails the task.
DEFAULT_ARGS = {"retries": 1, "retry_delay": timedelta(minutes=2), "execution_timeout": timedelta(minutes=RUNNER.task_timeout_minutes)}


def step(fn):
    """The TaskFlow task of a step function, with the step's execution_timeout."""
    minutes = LONG_STEPS.get(Step(fn.__name__), RUNNER.task_timeout_minutes)
    return task(fn, execution_timeout=timedelta(minutes=minutes))


@dag(
    dag_id=DAG_ID,
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=RUNNER.max_active_runs,
    default_args=DEFAULT_ARGS,
    tags=["dashclip", "training"],
    params={
        "config_path": Param(DEFAULT_CONFIG, type="string", description="Pipeline config (YAML): a file under the project's configs/ or a folder in DASHCLIP_CONFIG_DIRS"),
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
    catalog = step(steps.extract_catalog)()
    clean = step(steps.validate_catalog)(catalog)
    labels = step(steps.label_pairs)(catalog, clean)
    labels_ok = step(steps.validate_labels)(labels)
    stage1 = step(steps.train_stage1)(clean, labels_ok)
    stage2 = step(steps.train_stage2)(clean, labels, stage1)
    embeddings = step(steps.backfill_embeddings)(clean, stage1)
    embeddings_ok = step(steps.validate_embeddings)(clean, embeddings)
    index = step(steps.build_index)(embeddings, embeddings_ok, labels, stage2)
    evaluation = step(steps.evaluate)(clean, labels, embeddings, stage1, stage2, index)
    step(steps.register_model)(catalog, clean, labels, stage1, stage2, index, evaluation)


dashclip_nightly()
