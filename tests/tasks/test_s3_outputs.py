"""Task outputs on S3 (moto's server on 127.0.0.1) with the production boto3 code unchanged."""

from __future__ import annotations

import pandas as pd

from dashclip_core.storage import is_s3
from tasks import steps


def test_extract_and_gate_write_run_scoped_outputs_to_s3(s3_endpoint, tiny_config, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="dashclip-runs")
    cfg_path = tmp_path / "s3.yaml"
    cfg_path.write_text(tiny_config.read_text() + f"storage:\n  root: s3://dashclip-runs/team\n  s3_endpoint_url: {s3_endpoint}\n"
                        f"  cache_dir: {tmp_path / 'cache'}\n")
    params = {"config_path": str(cfg_path)}
    snap = steps.extract_catalog(params=params, run_id="manual__s3:1")
    assert is_s3(snap["uri"]) and snap["uri"].startswith("s3://dashclip-runs/team/dashclip_nightly/")
    gate = steps.validate_catalog(snap, params=params, run_id="manual__s3:1")
    assert gate["passed"] and gate["n_clean"] == snap["n_products"]

    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="dashclip-runs")["Contents"]}
    prefix = snap["uri"][len("s3://dashclip-runs/"):]
    assert {f"{prefix}/products.parquet", f"{prefix}/_SUCCESS", f"{prefix}/summary.json"} <= keys
    # A retry with the same run id reads the published output instead of redoing the work.
    again = steps.extract_catalog(params=params, run_id="manual__s3:1")
    assert again == snap
    products = pd.read_parquet(tmp_path / "cache" / "s3" / "dashclip-runs" / prefix / "products.parquet")
    assert len(products) == snap["n_products"]
