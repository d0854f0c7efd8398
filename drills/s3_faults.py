"""Drill: S3 throttling (503 SlowDown), dropped connections and an outage in the middle of a publish.

Real steps (``tasks/steps.py`` ``extract_catalog`` and ``validate_catalog``, tiny config) write to
``s3://<bucket>/faulty`` on moto's S3 server on 127.0.0.1, through the fault-injecting proxy of
:mod:`drills.faults`:

1. a fault-free run of the same steps with the same run id to ``s3://<bucket>/clean`` (no proxy): the reference;
2. an outage after 2 uploaded objects of ``extract_catalog`` (every request then gets 503, and the config
   allows only 2 tries per request): the step must fail and leave no ``_SUCCESS``;
3. the retry of both steps with 503 SlowDown on ~15% of requests and ~7% of connections dropped
   mid-response (retries on, ``storage.s3_max_attempts: 8``).

Checks: faults were injected (counted by the proxy) and the steps still succeeded; every published step has
``_SUCCESS`` and exactly the objects its manifest lists, with the listed sizes; each file equals the
fault-free run's (byte for byte, ``summary.json`` except its ``seconds``); no object under a step prefix was
read before that step's ``_SUCCESS`` was written; no staging or download folder is left behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from drills import Row
from drills.env import ROOT
from drills.faults import FaultProxy

RUN_ID = "drill__s3_faults"
BUCKET = "dashclip-drill"
STEPS = ("extract_catalog", "validate_catalog")
VOLATILE_JSON_KEYS = {"summary.json": {"seconds"}}  # wall time of the step: differs between any two runs
# Great Expectations Data Docs: HTML renderings of report.json whose file names and pages carry the validation
# time, so two runs never match byte for byte; compared by their number of files (report.json is compared exactly).
VOLATILE_FOLDERS = ("data_docs/",)


def run(work: Path) -> Row:
    from tasks import steps

    with moto_s3() as moto_url:
        s3 = _client(moto_url)
        s3.create_bucket(Bucket=BUCKET)
        with FaultProxy(moto_url, seed=11) as proxy:
            clean = _config(work, "clean", f"s3://{BUCKET}/clean", moto_url, work / "cache-clean", attempts=8)
            outage = _config(work, "outage", f"s3://{BUCKET}/faulty", proxy.url, work / "cache-faulty", attempts=2)
            faulty = _config(work, "faulty", f"s3://{BUCKET}/faulty", proxy.url, work / "cache-faulty", attempts=8)

            # 1. the reference
            ref = _run_steps(steps, clean)

            # 2. an outage mid-publish: fails, nothing published
            proxy.configure(outage_after_puts=2)
            try:
                steps.extract_catalog(params={"config_path": str(outage)}, run_id=RUN_ID)
            except Exception as exc:  # noqa: BLE001 (any error is the expected outcome; checked below)
                outage_error = f"{type(exc).__name__}"
            else:
                raise AssertionError("extract_catalog succeeded although S3 failed every request after 2 uploads")
            prefix = ref["extract_catalog"]["uri"].replace("/clean/", "/faulty/")[len(f"s3://{BUCKET}/"):]
            half = _keys(s3, prefix)
            if f"{prefix}/_SUCCESS" in half:
                raise AssertionError(f"the outage left {prefix}/_SUCCESS: a half upload is published")
            if not half:
                raise AssertionError("the outage hit before any upload; the drill did not test a half publish")
            outage_faults = proxy.faults().get("outage", 0)

            # 3. the retry under throttling and dropped connections
            proxy.configure(slowdown_share=0.15, drop_share=0.07, outage_after_puts=None)
            since = len(proxy.log)
            got = _run_steps(steps, faulty)
            faults = proxy.faults(since)
            log = proxy.log
        if faults.get("slowdown", 0) == 0 or faults.get("drop_headers", 0) + faults.get("drop_body", 0) == 0:
            raise AssertionError(f"too few faults injected to test anything: {faults}")

        differences = []
        n_files = 0
        for step in STEPS:
            ref_dir = published_copy(s3, ref[step]["uri"], work / "compare")
            got_dir = published_copy(s3, got[step]["uri"], work / "compare")
            differences += diff_step_folders(ref_dir, got_dir)
            n_files += sum(1 for p in got_dir.rglob("*") if p.is_file())
        extract_prefix = got["extract_catalog"]["uri"][len(f"s3://{BUCKET}/"):]
        reuploaded = {e.key_path.split(f"{extract_prefix}/", 1)[1] for e in log[since:]
                      if e.method == "PUT" and e.status == 200 and f"/{extract_prefix}/" in e.key_path}
        listed = {p.relative_to(d).as_posix() for d in [published_copy(s3, got["extract_catalog"]["uri"], work / "compare")]
                  for p in d.rglob("*") if p.is_file()}
        if reuploaded != listed:
            raise AssertionError(f"the retry uploaded {sorted(reuploaded)}, the step has {sorted(listed)}: not a complete re-upload")
        early_reads = _reads_before_publication(log, {got[s]["uri"][len(f"s3://{BUCKET}/"):] for s in STEPS})
        debris = [p.name for d in (work / "cache-faulty",) for p in d.rglob("*") if ".staging-" in p.name or p.name.startswith(".download-")]
        if differences or early_reads or debris:
            raise AssertionError(f"differences {differences[:5]}; read before _SUCCESS: {early_reads[:5]}; debris: {debris[:5]}")
    injected = ", ".join(f"{n} {k}" for k, n in sorted(faults.items()))
    return Row(
        fault=f"S3 via fault proxy: outage after 2 PUTs ({outage_faults} refused), then {injected} over {len(log) - since} requests",
        what_happened=(f"outage: step failed ({outage_error}), {len(half)} objects up, no _SUCCESS; retry re-uploaded all and "
                       f"published {len(STEPS)} steps ({n_files} files) identical to a fault-free run, manifests match, "
                       f"nothing read before _SUCCESS, no debris"),
        data_lost=len(differences),
    )


def diff_step_folders(ref: Path, got: Path) -> list[str]:
    """Differences between two published step folders (empty = none): missing/extra files, differing bytes.

    ``_SUCCESS`` holds a manifest (sizes and SHA-256) that differs exactly when a listed file does, so it is
    compared through the files; JSON files named in ``VOLATILE_JSON_KEYS`` are compared without those keys,
    and ``VOLATILE_FOLDERS`` by file count.
    """
    def files(folder: Path) -> set[str]:
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"_SUCCESS"}

    def stamped(names: set[str]) -> dict[str, int]:
        return {d: sum(1 for n in names if n.startswith(d)) for d in VOLATILE_FOLDERS}

    out = []
    a, b = files(ref), files(got)
    if stamped(a) != stamped(b):
        out.append(f"{got.name}: {stamped(b)} Data Docs files, the uninterrupted run has {stamped(a)}")
    a, b = ({n for n in names if not n.startswith(VOLATILE_FOLDERS)} for names in (a, b))
    out += [f"{ref.name}/{rel}: missing after recovery" for rel in sorted(a - b)]
    out += [f"{got.name}/{rel}: not in the uninterrupted run" for rel in sorted(b - a)]
    for rel in sorted(a & b):
        x, y = (ref / rel).read_bytes(), (got / rel).read_bytes()
        if x == y:
            continue
        volatile = VOLATILE_JSON_KEYS.get(Path(rel).name)
        if volatile is not None:
            jx, jy = json.loads(x), json.loads(y)
            if {k: v for k, v in jx.items() if k not in volatile} == {k: v for k, v in jy.items() if k not in volatile}:
                continue
        out.append(f"{got.name}/{rel}: content differs from the uninterrupted run")
    return out


def _run_steps(steps, config: Path) -> dict[str, dict]:
    params = {"config_path": str(config)}
    snap = steps.extract_catalog(params=params, run_id=RUN_ID)
    gate = steps.validate_catalog(snap, params=params, run_id=RUN_ID)
    return {"extract_catalog": snap, "validate_catalog": gate}


def published_copy(s3, uri: str, cache: Path) -> Path:
    """The step's files, downloaded without the proxy, after checking S3 holds exactly what ``_SUCCESS`` lists."""
    from dashclip_core.storage import localize, parse_manifest
    from dashclip_core.storage.run_paths import split_s3

    bucket, prefix = split_s3(uri)
    manifest = parse_manifest(s3.get_object(Bucket=bucket, Key=f"{prefix}/_SUCCESS")["Body"].read().decode(), uri)
    if manifest is None:
        raise AssertionError(f"{uri}/_SUCCESS holds no manifest")
    sizes = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        sizes.update({o["Key"][len(prefix) + 1:]: o["Size"] for o in page.get("Contents", [])})
    sizes.pop("_SUCCESS")
    listed = {rel: meta["size"] for rel, meta in manifest["files"].items()}
    if sizes != listed:
        raise AssertionError(f"{uri}: objects on S3 {sizes} are not the manifest's {listed}")
    return localize(uri, s3.meta.endpoint_url, cache)  # checks every file's SHA-256 against the manifest


def _reads_before_publication(log, prefixes: set[str]) -> list[str]:
    """GETs of a step's objects (not its ``_SUCCESS``) logged before a PUT of its ``_SUCCESS`` succeeded."""
    published: set[str] = set()
    early = []
    for entry in log:
        key = entry.key_path.lstrip("/").partition("/")[2]  # without the bucket
        step_prefix = next((p for p in prefixes if key.startswith(p + "/")), None)
        if step_prefix is None or "list-type" in entry.path:
            continue
        if key == f"{step_prefix}/_SUCCESS":
            if entry.method == "PUT" and entry.status == 200:
                published.add(step_prefix)
        elif entry.method == "GET" and entry.status == 200 and step_prefix not in published:
            early.append(key)
    return early


def _config(work: Path, name: str, root: str, endpoint: str, cache: Path, attempts: int) -> Path:
    path = work / f"{name}.yaml"
    path.write_text((ROOT / "configs" / "tiny.yaml").read_text()
                    + f"storage:\n  root: {root}\n  s3_endpoint_url: {endpoint}\n  cache_dir: {cache}\n  s3_max_attempts: {attempts}\n")
    return path


def _keys(s3, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])]


def _client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (test credentials, its request log quiet) for the body; yields its URL."""
    from moto.server import ThreadedMotoServer

    aws_test_credentials()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def aws_test_credentials() -> None:
    """moto accepts any credentials; never let a drill pick up real ones."""
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ[key] = value
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
