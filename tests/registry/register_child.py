"""Child process of test_registration_crash.py: register one run's model, as the register_model task does.

    python register_child.py TMP RUN_ID

The parent kills it at a chosen moment (a row appearing in the MLflow DB) to leave a real crash behind.
"""

from __future__ import annotations

import sys
from pathlib import Path

tmp, run_id = Path(sys.argv[1]), sys.argv[2]
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dashclip_core.config import PipelineConfig
from dashclip_core.registry import mlflow_registry as reg

cfg = PipelineConfig().with_overrides(**{
    "registry.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
    "registry.artifact_root": (tmp / "artifacts").as_uri(),
    "registry.model_name": "crash-test",
})
mlflow_run_id = reg.pipeline_run(cfg, run_id, "dashclip_nightly")
print(reg.register_model(cfg, mlflow_run_id, run_id, tmp / "product_encoder", tmp / "query_encoder", {"dag_id": "dashclip_nightly"}),
      flush=True)
