"""Drill: SIGKILL a task process while it publishes its step, then retry it with the same run id.

Each case runs a real step (``tasks/steps.py``, tiny config) in its own Python process, watches for the
publication window from outside, SIGKILLs the process group there, and runs the step again with the same run
id, as an Airflow retry does:

- ``extract_catalog`` on a local root: killed once its private staging folder holds output files (the body
  has written, ``os.rename`` to ``extract_catalog/`` has not happened);
- ``extract_catalog`` on S3 (moto on 127.0.0.1, through :mod:`drills.faults` with 0.3 s per PUT, a slow
  link that makes the window between uploads wide enough to hit): killed once some objects are up and
  ``_SUCCESS`` is not;
- ``register_model`` (local root, after one uninterrupted run of the upstream steps): killed once the MLflow
  model version for the run id exists and the step's folder is not published yet.

A kill that misses its window (the process finished first) is retried with a new run id, at most
``ATTEMPTS`` times. Checks after each retry: nothing was published by the killed process; the retry
published the step, identical to an uninterrupted run of the same step (``drills.s3_faults.diff_step_folders``)
or, for ``register_model``, exactly one model version for the run id; no staging folder, lock file or
download folder is left (the retry sweeps what the killed process left).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from drills import Row
from drills.env import ROOT
from drills.faults import FaultProxy
from drills.s3_faults import diff_step_folders, moto_s3, published_copy

ATTEMPTS = 4
TASK_TIMEOUT_S = 600  # one step in one process (register_model: pyfunc logging and scoring on 2 busy cores)
UPSTREAM_TIMEOUT_S = 1200  # extract_catalog .. evaluate in one process, tiny config (two Ray Train runs)
UPSTREAM = ("extract_catalog", "validate_catalog", "label_pairs", "validate_labels", "train_stage1", "train_stage2",
            "backfill_embeddings", "validate_embeddings", "build_index", "evaluate")

# What each step takes, by the DAG's wiring (dags/dashclip_nightly.py): the names of upstream summaries.
STEP_INPUTS = {
    "extract_catalog": (),
    "validate_catalog": ("extract_catalog",),
    "label_pairs": ("extract_catalog", "validate_catalog"),
    "validate_labels": ("label_pairs",),
    "train_stage1": ("validate_catalog", "validate_labels"),
    "train_stage2": ("validate_catalog", "label_pairs", "train_stage1"),
    "backfill_embeddings": ("validate_catalog", "train_stage1"),
    "validate_embeddings": ("validate_catalog", "backfill_embeddings"),
    "build_index": ("backfill_embeddings", "validate_embeddings", "label_pairs", "train_stage2"),
    "evaluate": ("validate_catalog", "label_pairs", "backfill_embeddings", "train_stage1", "train_stage2", "build_index"),
    "register_model": ("extract_catalog", "validate_catalog", "label_pairs", "train_stage1", "train_stage2", "build_index",
                       "evaluate"),
}

# A process that runs steps in order and prints each summary as one JSON line; argv[1] is a JSON job.
_RUNNER = """
import json, sys
from tasks import steps
job = json.loads(sys.argv[1])
done = job["upstream"]
for step in job["steps"]:
    args = [done[name] for name in job["inputs"][step]]
    done[step] = getattr(steps, step)(*args, params={"config_path": job["config"]}, run_id=job["run_id"])
    print(json.dumps({"step": step, "summary": done[step]}), flush=True)
"""


def run(work: Path) -> list[Row]:
    rows = [_local_extract(work / "local"), _s3_extract(work / "s3")]
    rows.append(_register(work / "register"))  # last: needs the whole pipeline upstream
    return rows


# ---- cases ------------------------------------------------------------------------------------------


def _local_extract(work: Path) -> Row:
    runs = work / "runs"
    config = _config(work, "local", f"  root: {runs}\n")

    def staging_has_files(run_key: str) -> bool:
        run_dir = runs / "dashclip_nightly" / run_key
        return any(f.is_file() for d in run_dir.glob("extract_catalog.staging-*") if d.is_dir() for f in d.rglob("*"))

    run_key, attempts, killed_state = _kill_in_window("extract_catalog", config, {}, staging_has_files,
                                                      lambda key: _listing(runs / "dashclip_nightly" / key))
    run_dir = runs / "dashclip_nightly" / run_key
    if (run_dir / "extract_catalog").exists():
        raise AssertionError(f"the killed process published {run_dir / 'extract_catalog'}")
    retried = _run_steps(["extract_catalog"], config, run_key, {})["extract_catalog"]
    debris = [n for n in _listing(run_dir) if n != "extract_catalog"]
    ref = _run_steps(["extract_catalog"], _config(work, "reference", f"  root: {work / 'reference'}\n"), run_key, {})
    differences = diff_step_folders(Path(ref["extract_catalog"]["uri"]), Path(retried["uri"]))
    if debris or differences:
        raise AssertionError(f"after the retry: debris {debris}, differences {differences[:5]}")
    return Row(
        fault=f"SIGKILL extract_catalog mid-publish, local root (staging written, not renamed; {attempts} tries to land it)",
        what_happened=(f"killed with {killed_state}; nothing published; retry swept the dead staging + lock and published "
                       f"{_n_files(Path(retried['uri']))} files identical to an uninterrupted run"),
        data_lost=len(differences) + len(debris),
    )


def _s3_extract(work: Path) -> Row:
    import boto3
    with moto_s3() as moto_url:
        s3 = boto3.client("s3", endpoint_url=moto_url)
        s3.create_bucket(Bucket="dashclip-kill")
        cache = work / "cache"
        with FaultProxy(moto_url, delay_s=0.3, delay_methods=("PUT",)) as slow_link:
            slow = _config(work, "slow", f"  root: s3://dashclip-kill/runs\n  s3_endpoint_url: {slow_link.url}\n  cache_dir: {cache}\n")

            def some_objects_no_marker(run_key: str) -> bool:
                keys = _s3_keys(s3, f"runs/dashclip_nightly/{run_key}/extract_catalog")
                return bool(keys) and not any(k.endswith("/_SUCCESS") for k in keys)

            run_key, attempts, killed_state = _kill_in_window(
                "extract_catalog", slow, {}, some_objects_no_marker,
                lambda key: [k.rsplit("/", 1)[1] for k in _s3_keys(s3, f"runs/dashclip_nightly/{key}/extract_catalog")])
        prefix = f"runs/dashclip_nightly/{run_key}/extract_catalog"
        if any(k.endswith("/_SUCCESS") for k in _s3_keys(s3, prefix)):
            raise AssertionError(f"the killed process published s3://dashclip-kill/{prefix}")
        direct = _config(work, "direct", f"  root: s3://dashclip-kill/runs\n  s3_endpoint_url: {moto_url}\n  cache_dir: {cache}\n")
        retried = _run_steps(["extract_catalog"], direct, run_key, {})["extract_catalog"]
        reference = _config(work, "reference", f"  root: s3://dashclip-kill/reference\n  s3_endpoint_url: {moto_url}\n"
                                               f"  cache_dir: {work / 'cache-reference'}\n")
        ref = _run_steps(["extract_catalog"], reference, run_key, {})["extract_catalog"]
        differences = diff_step_folders(published_copy(s3, ref["uri"], work / "compare"),
                                        published_copy(s3, retried["uri"], work / "compare"))
        debris = [p.name for p in (cache / "staging").rglob("*")] if (cache / "staging").exists() else []
        debris = [n for n in debris if n not in ("dashclip_nightly", run_key)]
        debris += [p.name for p in cache.rglob(".download-*")]
        if debris or differences:
            raise AssertionError(f"after the retry: debris {debris}, differences {differences[:5]}")
    return Row(
        fault=f"SIGKILL extract_catalog between S3 uploads (0.3 s per PUT; {attempts} tries to land it)",
        what_happened=(f"killed with {killed_state} up and no _SUCCESS; retry uploaded every file, then _SUCCESS; "
                       f"identical to an uninterrupted run, manifest matches S3, local staging swept"),
        data_lost=len(differences) + len(debris),
    )


def _register(work: Path) -> Row:
    from mlflow import MlflowClient

    from dashclip_core.config import PipelineConfig
    from dashclip_core.registry.mlflow_registry import RUN_TAG

    runs = work / "runs"
    config = _config(work, "register", f"  root: {runs}\n")
    upstream = _run_steps(list(UPSTREAM), config, "drill__kill_register_upstream", {})
    cfg = PipelineConfig.from_file(config)
    client = MlflowClient(cfg.tracking_uri())

    def versions(run_key: str) -> list:
        return client.search_model_versions(f"name = '{cfg.registry.model_name}' AND tags.{RUN_TAG} = '{run_key}'")

    def version_exists_not_published(run_key: str) -> bool:
        return bool(versions(run_key)) and not (runs / "dashclip_nightly" / run_key / "register_model" / "_SUCCESS").exists()

    run_key, attempts, killed_state = _kill_in_window("register_model", config, upstream, version_exists_not_published,
                                                      lambda key: [f"{len(versions(key))} version(s)"], poll_s=0.05)
    if (runs / "dashclip_nightly" / run_key / "register_model").exists():
        raise AssertionError("the killed register_model published its folder")
    retried = _run_steps(["register_model"], config, run_key, upstream)["register_model"]
    found = versions(run_key)
    debris = [n for n in _listing(runs / "dashclip_nightly" / run_key) if n != "register_model"]
    duplicates = len(found) - 1
    if duplicates or debris or retried["version"] != str(found[0].version) or retried["created"]:
        raise AssertionError(f"after the retry: {len(found)} versions for {run_key} ({[v.version for v in found]}), "
                             f"summary {retried}, debris {debris}")
    return Row(
        fault=f"SIGKILL register_model after the model version was created, before publish ({attempts} tries to land it)",
        what_happened=(f"killed with {killed_state}; retry found version {retried['version']} by its run tag "
                       f"(created=false), published the step; exactly 1 version for the run"),
        data_lost=duplicates + len(debris),
    )


# ---- plumbing ----------------------------------------------------------------------------------------


def _kill_in_window(step: str, config: Path, upstream: dict, in_window: Callable[[str], bool], state: Callable[[str], list[str]],
                    poll_s: float = 0.002) -> tuple[str, int, str]:
    """Start ``step`` in a process and SIGKILL its group as soon as ``in_window(run_key)``; a new run id per miss.

    Returns (run key of the landed kill, attempts used, what ``state`` saw right after the kill).
    """
    for attempt in range(1, ATTEMPTS + 1):
        run_key = f"drill__kill_{step}_{os.getpid()}_{attempt}"
        proc = _spawn([step], config, run_key, upstream)
        deadline = time.monotonic() + TASK_TIMEOUT_S
        landed = False
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if in_window(run_key):
                    os.killpg(proc.pid, signal.SIGKILL)
                    landed = True
                    break
                time.sleep(poll_s)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        if landed:
            return run_key, attempt, ", ".join(state(run_key)) or "nothing"
        if time.monotonic() >= deadline:
            raise AssertionError(f"{step} neither finished nor reached the kill window in {TASK_TIMEOUT_S} s")
        out = proc.stdout.read() if proc.stdout else ""
        if proc.returncode != 0:
            raise AssertionError(f"{step} failed before the kill window (exit {proc.returncode}): {out[-2000:]}")
    raise AssertionError(f"{ATTEMPTS} runs of {step} finished before the kill landed in the publication window")


def _spawn(steps: list[str], config: Path, run_id: str, upstream: dict) -> subprocess.Popen:
    job = json.dumps({"steps": steps, "config": str(config), "run_id": run_id, "upstream": upstream, "inputs": STEP_INPUTS})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return subprocess.Popen([sys.executable, "-c", _RUNNER, job], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _run_steps(steps: list[str], config: Path, run_id: str, upstream: dict) -> dict[str, dict]:
    """Run ``steps`` uninterrupted in one process; their summaries by step name."""
    proc = _spawn(steps, config, run_id, upstream)
    timeout = TASK_TIMEOUT_S if len(steps) == 1 else UPSTREAM_TIMEOUT_S
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"{steps} with run id {run_id} did not finish in {timeout} s; last output: {out[-2000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{steps} with run id {run_id} failed (exit {proc.returncode}): {out[-3000:]}")
    done = dict(upstream)
    for line in out.splitlines():
        if line.startswith('{"step"'):
            record = json.loads(line)
            done[record["step"]] = record["summary"]
    return done


def _config(work: Path, name: str, storage: str) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{name}.yaml"
    path.write_text((ROOT / "configs" / "tiny.yaml").read_text() + "storage:\n" + storage)
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _n_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def _s3_keys(s3, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket="dashclip-kill", Prefix=prefix + "/").get("Contents", [])]
