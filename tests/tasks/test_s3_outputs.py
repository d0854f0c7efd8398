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
    assert {f"{prefix}/products.parquet/part-00000.parquet", f"{prefix}/_SUCCESS", f"{prefix}/summary.json"} <= keys
    # A retry with the same run id reads the published output instead of redoing the work.
    again = steps.extract_catalog(params=params, run_id="manual__s3:1")
    assert again == snap
    products = pd.read_parquet(tmp_path / "cache" / "s3" / "dashclip-runs" / prefix / "products.parquet")
    assert len(products) == snap["n_products"]


def test_published_step_marker_is_a_manifest_of_its_objects(s3_endpoint, tiny_config, tmp_path):
    """``_SUCCESS`` lists every object of the step with its size and SHA-256 (CONTRACTS.md, publication protocol)."""
    import hashlib

    import boto3

    from dashclip_core.storage import parse_manifest

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="dashclip-manifest-task")
    cfg_path = tmp_path / "s3.yaml"
    cfg_path.write_text(tiny_config.read_text() + f"storage:\n  root: s3://dashclip-manifest-task/runs\n  s3_endpoint_url: {s3_endpoint}\n"
                        f"  cache_dir: {tmp_path / 'cache'}\n  s3_max_attempts: 3\n")
    snap = steps.extract_catalog(params={"config_path": str(cfg_path)}, run_id="manual__manifest")
    prefix = snap["uri"][len("s3://dashclip-manifest-task/"):]
    manifest = parse_manifest(s3.get_object(Bucket="dashclip-manifest-task", Key=f"{prefix}/_SUCCESS")["Body"].read().decode(), prefix)
    objects = {o["Key"][len(prefix) + 1:]: o for o in s3.list_objects_v2(Bucket="dashclip-manifest-task", Prefix=prefix + "/")["Contents"]}
    assert set(manifest["files"]) == set(objects) - {"_SUCCESS"} >= {"products.parquet/part-00000.parquet", "summary.json"}
    for rel, meta in manifest["files"].items():
        body = s3.get_object(Bucket="dashclip-manifest-task", Key=f"{prefix}/{rel}")["Body"].read()
        assert meta == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
