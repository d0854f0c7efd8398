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


# ---- S3: concurrent readers, retries, partial publishes (moto server, real boto3, faults from drills/faults.py) ----


def _bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)


def _publish_files(paths: RunPaths, step: str, files: dict[str, bytes]) -> None:
    with paths.step_output(step) as out:
        for rel, data in files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)


def test_concurrent_readers_never_delete_a_complete_copy(s3_endpoint, tmp_path):
    """Issue 11 row 8: two readers localise one S3 prefix into one cache; the one that finishes second must not
    delete or replace the copy the first is reading."""
    import os
    import threading
    import time

    from drills.faults import FaultProxy

    _bucket(s3_endpoint, "dashclip-race")
    files = {f"product_encoder/part-{i:03d}.bin": os.urandom(2048 + i) for i in range(120)}
    writer = RunPaths("s3://dashclip-race/runs", "dag", "r1", s3_endpoint_url=s3_endpoint, cache_dir=tmp_path / "writer")
    _publish_files(writer, "train_stage1", files)

    cache = tmp_path / "shared-cache"
    with FaultProxy(s3_endpoint, delay_s=0.02, delay_methods=("GET", "HEAD")) as slow_link:
        slow = RunPaths("s3://dashclip-race/runs", "dag", "r1", s3_endpoint_url=slow_link.url, cache_dir=cache)
        fast = RunPaths("s3://dashclip-race/runs", "dag", "r1", s3_endpoint_url=s3_endpoint, cache_dir=cache)
        slow_result: dict = {}
        slow_reader = threading.Thread(target=lambda: slow_result.update(path=slow.local("train_stage1")), daemon=True)
        slow_reader.start()
        run_folder = cache / "s3" / "dashclip-race" / "runs" / "dag" / "r1"
        deadline = time.monotonic() + 30
        while not any(run_folder.glob(".download-*")) and time.monotonic() < deadline:
            time.sleep(0.005)  # until the slow reader has decided to download (no complete copy yet)
        assert any(run_folder.glob(".download-*")), "the slow reader never started downloading"

        copy = fast.local("train_stage1")  # the fast reader wins and starts reading its copy
        inode = copy.stat().st_ino
        errors, reads = [], 0
        while slow_reader.is_alive():  # keep reading while the slow one finishes its download
            for rel, data in files.items():
                try:
                    assert (copy / rel).read_bytes() == data
                    reads += 1
                except FileNotFoundError as exc:
                    errors.append(str(exc))
            time.sleep(0.002)  # let the other reader's thread have the GIL
            if time.monotonic() > deadline + 60:
                raise AssertionError("the slow reader did not finish in 90 s")
        slow_reader.join()

    assert not errors, f"{len(errors)} reads failed while the other reader finished, e.g. {errors[0]}"
    assert slow_result["path"] == copy and copy.stat().st_ino == inode  # same folder, never replaced
    assert {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()} == {*files, SUCCESS}
    assert all((copy / rel).read_bytes() == data for rel, data in files.items())
    assert sorted(p.name for p in run_folder.iterdir()) == ["train_stage1"]  # the loser's download is gone


def test_s3_client_retries_with_configured_attempts_and_timeouts(tiny_config):
    from dashclip_core.config import PipelineConfig
    from dashclip_core.storage.run_paths import s3_client
    from tasks.common import run_paths

    cfg = PipelineConfig.from_file(tiny_config).with_overrides(**{"storage.s3_max_attempts": 5})
    paths = run_paths(cfg, "manual__1")
    assert paths.s3_max_attempts == 5
    client = s3_client("http://127.0.0.1:9", paths.s3_max_attempts)
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 5}
    assert client.meta.config.connect_timeout > 0 and client.meta.config.read_timeout > 0


def test_throttling_and_dropped_connections_are_retried(s3_endpoint, tmp_path):
    from drills.faults import FaultProxy

    _bucket(s3_endpoint, "dashclip-flaky")
    files = {f"f{i}.bin": bytes([i]) * (5000 + i) for i in range(8)}
    with FaultProxy(s3_endpoint, slowdown_share=0.2, drop_share=0.1, seed=3) as proxy:
        paths = RunPaths("s3://dashclip-flaky/runs", "dag", "r1", s3_endpoint_url=proxy.url, cache_dir=tmp_path / "cache")
        _publish_files(paths, "step", files)
        local = paths.local("step")
        faults = proxy.faults()
    assert faults.get("slowdown", 0) > 0 and faults.get("drop_headers", 0) + faults.get("drop_body", 0) > 0, faults
    assert all((local / rel).read_bytes() == data for rel, data in files.items())


def test_failure_mid_upload_leaves_no_success_and_retry_uploads_everything(s3_endpoint, tmp_path):
    import boto3

    from drills.faults import FaultProxy

    _bucket(s3_endpoint, "dashclip-outage")
    files = {f"f{i}.bin": bytes([i]) * 3000 for i in range(6)}
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    with FaultProxy(s3_endpoint, outage_after_puts=3) as proxy:
        paths = RunPaths("s3://dashclip-outage/runs", "dag", "r1", s3_endpoint_url=proxy.url, cache_dir=tmp_path / "cache",
                         s3_max_attempts=2)
        with pytest.raises(Exception, match="SlowDown|reached max retries|503"):
            _publish_files(paths, "step", files)
        prefix = f"runs/dag/{paths.run_key}/step"
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="dashclip-outage", Prefix=prefix).get("Contents", [])}
        assert keys and f"{prefix}/{SUCCESS}" not in keys  # half uploaded, not published
        direct = RunPaths("s3://dashclip-outage/runs", "dag", "r1", s3_endpoint_url=s3_endpoint, cache_dir=tmp_path / "direct")
        with pytest.raises(FileNotFoundError, match="no _SUCCESS"):
            direct.local("step")  # a reader does not take the half upload for an output

        proxy.configure(outage_after_puts=None)
        since = len(proxy.log)
        _publish_files(paths, "step", files)  # the retry of the step
        put = sorted(e.key_path.rsplit("/", 1)[-1] for e in proxy.log[since:] if e.method == "PUT" and e.status == 200)
        local = paths.local("step")
    assert put == sorted([*files, SUCCESS])  # every file uploaded again, marker last
    assert [e.key_path.rsplit("/", 1)[-1] for e in proxy.log if e.method == "PUT"][-1] == SUCCESS
    assert all((local / rel).read_bytes() == data for rel, data in files.items())


def test_manifest_catches_an_object_replaced_after_publication(s3_endpoint, tmp_path):
    import boto3

    from dashclip_core.storage import IncompletePublicationError

    _bucket(s3_endpoint, "dashclip-manifest")
    paths = RunPaths("s3://dashclip-manifest/runs", "dag", "r1", s3_endpoint_url=s3_endpoint, cache_dir=tmp_path / "cache")
    _publish_files(paths, "step", {"a.bin": b"a" * 100, "b.bin": b"b" * 100})
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket="dashclip-manifest", Key=f"runs/dag/{paths.run_key}/step/b.bin",
                                                            Body=b"b" * 60)
    with pytest.raises(IncompletePublicationError, match=r"b\.bin: 60 bytes, _SUCCESS says 100"):
        paths.local("step")
    assert not (tmp_path / "cache" / "s3" / "dashclip-manifest" / "runs" / "dag" / "r1" / "step").exists()


def test_dead_writers_staging_is_swept_and_a_live_one_kept(tmp_path):
    import signal
    import subprocess
    import sys

    code = ("import sys, time; from dashclip_core.storage import RunPaths\n"
            "p = RunPaths(sys.argv[1], 'dag', 'r1')\n"
            "with p.step_output('step') as out:\n"
            "    (out / 'half.bin').write_bytes(b'x' * 100); print('staged', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "staged"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    run = tmp_path / "dag" / "r1"
    dead = [p.name for p in run.iterdir()]
    assert any(n.startswith("step.staging-") and not n.endswith(".lock") for n in dead), dead  # debris of the killed writer

    paths = RunPaths(str(tmp_path), "dag", "r1")
    with paths.step_output("other") as live:  # a live writer of another step of the run ...
        (live / "v").write_text("live")
        with paths.step_output("step") as out:  # ... and the retry of the killed step
            (out / "v").write_text("retried")
            assert live.exists()  # not swept: its owner is alive
            assert sorted(p.name for p in run.iterdir() if p.name.startswith("step.staging-")) == sorted([out.name, out.name + ".lock"])
    assert sorted(p.name for p in run.iterdir()) == ["other", "step"]
    assert (paths.local("step") / "v").read_text() == "retried"
