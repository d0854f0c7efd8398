"""RunPaths: run-scoped, atomic, idempotent step outputs on a local folder and on S3 (moto server)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dashclip_core.storage import SUCCESS, RunPaths, safe_run_id


@given(st.text(min_size=1, max_size=200).filter(lambda s: s.strip()))
def test_safe_run_id_is_one_safe_deterministic_segment(run_id):
    key = safe_run_id(run_id)
    assert key == safe_run_id(run_id)
    assert "/" not in key and key not in (".", "..") and all(c.isalnum() or c in "._-" for c in key)
    assert len(key) <= 160


def test_distinct_run_ids_stay_distinct():
    a, b = "manual__2026-01-01T00:00:00+00:00", "manual__2026-01-01T00_00_00_00_00"
    assert safe_run_id(a) != safe_run_id(b)


def test_step_output_publishes_atomically(tmp_path):
    paths = RunPaths(str(tmp_path), "dag", "scheduled__2026-01-01T00:00:00+00:00")
    assert not paths.is_done("step")
    with paths.step_output("step") as out:
        (out / "a.txt").write_text("1")
        assert not paths.is_done("step")  # nothing visible before the block ends
    assert paths.is_done("step")
    final = paths.local("step")
    assert (final / "a.txt").read_text() == "1" and (final / SUCCESS).exists()
    assert [p.name for p in final.parent.iterdir()] == ["step"]  # no staging debris


def test_failed_step_publishes_nothing_and_keeps_earlier_outputs(tmp_path):
    paths = RunPaths(str(tmp_path), "dag", "r1")
    with paths.step_output("good") as out:
        (out / "x").write_text("kept")
    with pytest.raises(RuntimeError), paths.step_output("bad") as out:
        (out / "half").write_text("partial")
        raise RuntimeError("boom")
    assert not paths.is_done("bad")
    assert (paths.local("good") / "x").read_text() == "kept"
    assert sorted(p.name for p in (tmp_path / "dag" / "r1").iterdir()) == ["good"]


def test_second_writer_does_not_replace_first(tmp_path):
    paths = RunPaths(str(tmp_path), "dag", "r1")
    with paths.step_output("s") as out:
        (out / "v").write_text("first")
    with paths.step_output("s") as out:
        (out / "v").write_text("second")
    assert (paths.local("s") / "v").read_text() == "first"


def test_s3_root_round_trip(s3_endpoint, tmp_path):
    import boto3

    s3_server = s3_endpoint
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="dashclip-test")
    paths = RunPaths("s3://dashclip-test/prefix", "dag", "manual__x:y+z", s3_endpoint_url=s3_server, cache_dir=tmp_path / "cache")
    assert not paths.is_done("extract")
    with pytest.raises(ValueError), paths.step_output("extract") as out:
        (out / "partial").write_text("x")
        raise ValueError("bad input")
    assert not paths.is_done("extract")
    with paths.step_output("extract") as out:
        (out / "sub").mkdir()
        (out / "sub" / "data.txt").write_text("hello")
    assert paths.is_done("extract")
    keys = sorted(o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket="dashclip-test")["Contents"])
    assert keys == [f"prefix/dag/{paths.run_key}/extract/_SUCCESS", f"prefix/dag/{paths.run_key}/extract/sub/data.txt"]
    local = paths.local("extract")
    assert (local / "sub" / "data.txt").read_text() == "hello"
    assert paths.uri("extract").startswith("s3://dashclip-test/prefix/dag/")
