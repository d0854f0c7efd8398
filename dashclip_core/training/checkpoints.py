"""Training checkpoints that are safe to load and that know what they were trained from.

A checkpoint folder holds two files:

- ``checkpoint.pt``: tensors and plain containers only (model and optimizer ``state_dict``, the loss-scale
  state), read with ``torch.load(..., weights_only=True)``. Such a load never runs code from the file: a
  pickle that names any other object (a class, ``os.system``, ...) raises instead. Nothing in a
  checkpoint needs more: random streams restart from ``(seed, rank, epoch)`` (:func:`epoch_seed`), the
  learning rate is a function of the step.
- ``checkpoint.json``: everything else, as JSON: epoch, step, the epoch it resumed from, and the
  :class:`Fingerprint` of the config and data the run was trained from.

A run resumes only from checkpoints with its own fingerprint (:func:`choose_run_name`): other inputs mean
a new Ray run, the old checkpoints stay where they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dashclip_core.config import PipelineConfig

logger = logging.getLogger(__name__)

STATE_FILE = "checkpoint.pt"
META_FILE = "checkpoint.json"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's reported checkpoints
FORMAT = 2  # 1 = HEAD's single pickled checkpoint.pt (no sidecar): never resumed from

# Config fields that decide how the work is spread or when it gives up, not what a finished epoch holds.
# - num_workers: the global batch is fixed (per-worker = global // workers) and ITC/ITM gather it across
#   workers; the checkpoint holds the unwrapped model and optimizer, the same for any world size, so a
#   retry on fewer (or more) workers may resume. Only per-rank random draws (dropout, ITM negatives) differ.
# - use_gpu, torch_threads_per_worker: the device and CPU threads; numerics only (train.amp stays in).
# - max_nonfinite_steps, max_failures: when a run stops, not what it computes while it runs.
RESULT_NEUTRAL_TRAIN_FIELDS = frozenset({"num_workers", "use_gpu", "torch_threads_per_worker", "max_nonfinite_steps", "max_failures"})
_STAGE_PREFIXES = ("stage1_", "stage2_")


@dataclass(frozen=True)
class Fingerprint:
    """What a training run is trained from: the result-relevant config and a digest per data input.

    Attributes:
        config: ``model`` and ``loss`` sections, and the ``train`` fields of this stage (the other stage's
            ``stageN_*`` fields and :data:`RESULT_NEUTRAL_TRAIN_FIELDS` left out).
        data: input name -> sha256 hex of its content (see :func:`frame_digest`, :func:`file_digest`).
    """

    config: dict
    data: dict[str, str]

    @property
    def digest(self) -> str:
        blob = json.dumps({"config": self.config, "data": self.data}, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_json(self) -> dict:
        return {"digest": self.digest, **asdict(self)}

    def differences(self, recorded: dict | None) -> list[str]:
        """Readable ``field: old -> new`` lines against a checkpoint's recorded fingerprint (JSON form)."""
        if not recorded or "config" not in recorded or "data" not in recorded:
            return ["no fingerprint recorded (a checkpoint written before checkpoints had one)"]
        mine = json.loads(json.dumps(self.to_json(), default=str))
        lines = [f"config {key}: {old!r} -> {new!r}" for key, old, new in _dict_diff(recorded["config"], mine["config"])]
        lines += [f"data {key}: sha256 {str(old)[:12]} -> {str(new)[:12]}" for key, old, new in _dict_diff(recorded["data"], mine["data"])]
        return lines or ([] if recorded.get("digest") == self.digest else ["digest differs"])


def stage_fingerprint(cfg: PipelineConfig, stage: str, data: dict[str, str]) -> Fingerprint:
    """The fingerprint of ``stage`` ("stage1" / "stage2") trained with ``cfg`` on ``data`` digests."""
    full = cfg.to_dict()
    own = f"{stage}_"
    train = {k: v for k, v in full["train"].items()
             if k not in RESULT_NEUTRAL_TRAIN_FIELDS and (k.startswith(own) or not k.startswith(_STAGE_PREFIXES))}
    return Fingerprint(config={"model": full["model"], "loss": full["loss"], "train": train}, data=dict(data))


def frame_digest(frame: pd.DataFrame, columns: list[str]) -> str:
    """sha256 of these columns' values, row by row in order (JSON, so the same for any pandas version)."""
    return StreamedFrameDigest(columns).update(frame).hexdigest()


class StreamedFrameDigest:
    """:func:`frame_digest` of a table given chunk by chunk: the same digest as of the chunks concatenated, whatever
    the chunking (each chunk's JSON rows without their outer brackets, joined by commas inside one pair)."""

    def __init__(self, columns: list[str]) -> None:
        self.columns, self.sha, self.rows = list(columns), hashlib.sha256(b"["), 0

    def update(self, frame: pd.DataFrame) -> StreamedFrameDigest:
        if len(frame):
            rows = frame[self.columns].to_json(orient="values", date_format="iso")[1:-1]
            self.sha.update((b"," if self.rows else b"") + rows.encode())
            self.rows += len(frame)
        return self

    def hexdigest(self) -> str:
        final = self.sha.copy()
        final.update(b"]")
        return final.hexdigest()


def file_digest(path: Path) -> str:
    from dashclip_core.storage.run_paths import file_sha256

    return file_sha256(path)


def epoch_seed(seed: int, rank: int, epoch: int, stream: int) -> int:
    """Seed of random stream ``stream`` of ``rank`` in ``epoch``: a run resumed at an epoch draws what an
    uninterrupted run draws there, so no generator state needs to be checkpointed."""
    return int(np.random.SeedSequence([seed, rank, epoch, stream]).generate_state(1)[0])


# ---- files -------------------------------------------------------------------------------------


def write_checkpoint(folder: Path, state: dict, meta: dict) -> None:
    """``state`` (tensors / plain containers) to ``checkpoint.pt``, ``meta`` (JSON-able) to ``checkpoint.json``."""
    torch.save(state, folder / STATE_FILE)
    (folder / META_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=2, default=str))


def read_meta(folder: Path) -> dict | None:
    """The checkpoint's ``checkpoint.json``, or None when it has none (an older checkpoint) or it is unreadable."""
    try:
        return json.loads((Path(folder) / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def read_checkpoint(folder: Path) -> tuple[dict, dict]:
    """(state, meta) of a checkpoint folder. The state is loaded with ``weights_only=True``: a file that
    would unpickle anything but tensors and plain containers raises, naming the file."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta is None:
        raise ValueError(f"{folder / META_FILE}: missing or not JSON; this checkpoint has no metadata and is not loaded")
    path = folder / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for a forbidden global; others for a truncated file
        raise ValueError(f"{path}: not a tensors-only checkpoint, refused ({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from exc
    return state, meta


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Ray Train's checkpoint folders of a run (``checkpoint_<timestamp>``), oldest first."""
    return sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())


def choose_run_name(storage: Path, name: str, fingerprint: Fingerprint, stage: str) -> str:
    """The Ray run name to train under: ``name`` when its checkpoints (if any) carry ``fingerprint``.

    When they were trained from other inputs (or carry no fingerprint), resuming them would silently mix
    two trainings, so the run starts from scratch under ``<name>-<digest[:12]>`` instead (a retry with the
    same new inputs resumes that one) and a WARNING names what differed. The old checkpoints are kept.
    """
    mismatch = _mismatch(Path(storage) / name, fingerprint)
    if not mismatch:
        return name
    fresh = f"{name}-{fingerprint.digest[:12]}"
    logger.warning("%s: not resuming the checkpoints in %s: they were trained from other inputs (%s); training from "
                   "scratch as Ray run %r instead (the old checkpoints are kept)", stage, Path(storage) / name, "; ".join(mismatch), fresh)
    again = _mismatch(Path(storage) / fresh, fingerprint)
    if again:
        raise RuntimeError(f"{stage}: the checkpoints in {Path(storage) / fresh} do not match this run's inputs either ({'; '.join(again)}); "
                           "move that folder away to train again")
    return fresh


def registered_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint Ray Train has registered last for a run: ``latest_checkpoint_result`` of its
    ``checkpoint_manager_snapshot.json`` (Ray 2.60). A folder written by a worker that died before Ray
    registered its report (or half-copied) is never named there. None when there is none or it is unreadable."""
    latest = (_ray_snapshot(run_dir) or {}).get("latest_checkpoint_result")
    return Path(run_dir) / latest["checkpoint_dir_name"] if isinstance(latest, dict) and "checkpoint_dir_name" in latest else None


def resumable_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder Ray Train would hand a re-created run: :func:`registered_checkpoint`. Without a
    readable snapshot, the newest ``checkpoint_*`` folder, so a folder of unknown standing is still checked."""
    if _ray_snapshot(run_dir) is not None:
        return registered_checkpoint(run_dir)
    folders = checkpoint_folders(run_dir)
    return folders[-1] if folders else None


def _ray_snapshot(run_dir: Path) -> dict | None:
    try:
        snapshot = json.loads((Path(run_dir) / RAY_SNAPSHOT).read_text())
    except (OSError, ValueError):
        return None
    return snapshot if isinstance(snapshot, dict) and "latest_checkpoint_result" in snapshot else None


def _mismatch(run_dir: Path, fingerprint: Fingerprint) -> list[str]:
    """What differs between ``fingerprint`` and the checkpoint ``run_dir`` would resume from ([] when none)."""
    folder = resumable_checkpoint(run_dir)
    if folder is None:
        return []
    diff = fingerprint.differences((read_meta(folder) or {}).get("fingerprint"))
    return [f"{folder.name}: {d}" for d in diff[:8]] + ([f"... {len(diff) - 8} more"] if len(diff) > 8 else [])


def _dict_diff(old: dict, new: dict, prefix: str = ""):
    """(dotted key, old, new) for every leaf that differs; a missing side is None."""
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _dict_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix}{key}", a, b
