"""A promotion lock on the MLflow registry, so that promotion is compare-and-set.

MLflow has no compare-and-set for aliases: two runs that read ``champion``, score it and then set it can
both win, and the last writer keeps ``champion`` even when it is the worse model. The lock is a
registered model named ``<model>.promotion-lock``. ``create_registered_model`` is atomic on every
registry backend: the SQL store's primary key on the name and the REST server, which uses a SQL store
behind it, both answer ``RESOURCE_ALREADY_EXISTS`` to the second caller. The holder, a random token and
the lease expiry are tags written in the same call, so a lock that exists always has them.

- Held: others poll until it is released, for at most ``registry.promotion_lock_timeout_s``, then fail
  with the holder named in the error.
- Crashed holder: a lock whose lease (``registry.promotion_lock_lease_s``) has expired is broken by the
  next promoter. Breaking is itself exclusive: the breaker first creates
  ``<lock>.broken-<stale token>`` (tags: who broke it, when, whose lock, when it expired), so that two
  waiters never both delete the lock, and that model stays as the record.
- Re-entry by the same holder: the holder is the Airflow run id, and Airflow runs one attempt of a task at
  a time, so a lock that names our own holder was left by an earlier attempt that was killed before its
  ``finally``; the retry breaks it at once (with the same record) instead of waiting out the lease.
- Release in ``finally``: the lock is deleted only while its token is still ours.

What the lock cannot rule out: a holder that runs past its lease, checks that it still holds the lock,
and is then broken before its next registry call. :meth:`HeldLock.check_held` right before setting the
alias keeps that window to one call. Keep the lease well above the time a promotion takes (scoring the
champion); a promoter that finds its lock gone raises :class:`PromotionLockLost` and sets nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"
_ALREADY_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")
_POLL_S = 0.5
_BREAKER_GRACE_S = 30.0  # a breaker takes milliseconds between its marker and the delete


class PromotionLockTimeout(TimeoutError):
    """Another promoter held the lock for longer than the configured wait."""


class PromotionLockLost(RuntimeError):
    """Our lease expired and another promoter broke the lock: nothing may be set under it any more."""


def lock_name(model_name: str) -> str:
    return f"{model_name}{LOCK_SUFFIX}"


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class HeldLock:
    """The lock while we hold it, and what acquiring it took (recorded in the promotion decision)."""

    client: object
    name: str
    holder: str
    token: str
    waited_s: float
    acquired_at: float  # epoch seconds: orders promoters in the decisions
    broken: list[dict] = field(default_factory=list)  # stale locks this promoter broke on its way in

    def check_held(self) -> None:
        """Raise :class:`PromotionLockLost` unless the lock is still ours."""
        tags = _lock_tags(self.client, self.name)
        if tags is None or tags.get("token") != self.token:
            raise PromotionLockLost(f"promotion lock {self.name!r} is no longer held by {self.holder} (token {self.token}): "
                                    f"the lease expired and {tags.get('holder') if tags else 'nobody'} holds it now; "
                                    "raise registry.promotion_lock_lease_s above the time a promotion takes")

    def record(self) -> dict:
        return {"name": self.name, "holder": self.holder, "token": self.token, "waited_s": round(self.waited_s, 2),
                "acquired_at": round(self.acquired_at, 3), "broken_stale_locks": self.broken}


@contextlib.contextmanager
def promotion_lock(client, model_name: str, timeout_s: float, lease_s: float, holder: str | None = None) -> Iterator[HeldLock]:
    """Hold ``<model_name>.promotion-lock`` for the body; wait at most ``timeout_s`` for it.

    Raises:
        PromotionLockTimeout: the lock stayed held (and unexpired) for ``timeout_s``; names the holder.
    """
    name, holder = lock_name(model_name), holder or default_holder()
    token = uuid.uuid4().hex
    started = time.monotonic()
    broken: list[dict] = []
    while True:
        now = time.time()
        if _try_create(client, name, {"holder": holder, "token": token, "acquired_at": f"{now:.3f}",
                                      "expires_at": f"{now + lease_s:.3f}"}):
            break
        held = _lock_tags(client, name)
        if held is not None and (_expired(held, now) or held.get("holder") == holder):
            # Expired, or left by an earlier attempt of this same holder (an Airflow retry of the run's own
            # register_model after its process was killed): nobody else can be promoting under it.
            record = _break_stale(client, name, held, holder)
            if record is not None:
                broken.append(record)
            continue
        waited = time.monotonic() - started
        if waited >= timeout_s:
            who = f"{held.get('holder')} since {_iso(held.get('acquired_at'))}, lease until {_iso(held.get('expires_at'))}" \
                if held else "a promoter that keeps re-taking it"
            raise PromotionLockTimeout(f"promotion lock {name!r} is held by {who}; waited {waited:.0f} s "
                                       f"(registry.promotion_lock_timeout_s = {timeout_s:g})")
        time.sleep(min(_POLL_S, max(timeout_s - waited, 0.01)))
    lock = HeldLock(client, name, holder, token, time.monotonic() - started, now, broken)
    try:
        yield lock
    finally:
        _release(lock)


def _try_create(client, name: str, tags: dict[str, str]) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags=tags, description="dashclip promotion lock (see registry/promotion_lock.py)")
        return True
    except MlflowException as err:
        if err.error_code in _ALREADY_EXISTS:
            return False
        raise


def _lock_tags(client, name: str) -> dict[str, str] | None:
    """The lock's tags, or None when it does not exist (released meanwhile)."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(name).tags or {})
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _expired(tags: dict[str, str], now: float) -> bool:
    try:
        return float(tags["expires_at"]) < now
    except (KeyError, ValueError):  # not written by promotion_lock: never break what we cannot read
        return False


def _break_stale(client, name: str, stale: dict[str, str], holder: str) -> dict | None:
    """Delete the expired lock ``stale`` if we win the right to break it; return the record, or None."""
    record = {"stale_holder": stale.get("holder", "?"), "stale_token": stale.get("token", "?"),
              "acquired_at": stale.get("acquired_at", "?"), "expired_at": stale.get("expires_at", "?"),
              "broken_by": holder, "broken_at": f"{time.time():.3f}"}
    marker = f"{name}.broken-{stale.get('token', 'unknown')}"
    if not _try_create(client, marker, record):
        # Another promoter is breaking (or broke) this same stale lock. If it died between its marker and the
        # delete, the lock would stay forever: finish its job once the marker is old enough.
        marker_tags = _lock_tags(client, marker) or {}
        if time.time() - float(marker_tags.get("broken_at", "inf")) < _BREAKER_GRACE_S:
            return None
        current = _lock_tags(client, name)
        if current is not None and current.get("token") == stale.get("token"):
            client.delete_registered_model(name)
            logger.warning("finished breaking the promotion lock %s (its breaker %s left it at %s)", name,
                           marker_tags.get("broken_by"), marker)
        return None
    current = _lock_tags(client, name)
    if current is not None and current.get("token") == stale.get("token"):
        client.delete_registered_model(name)
    logger.warning("broke the promotion lock %s of %s (lease expired %s); record kept as registered model %s",
                   name, record["stale_holder"], _iso(record["expired_at"]), marker)
    return {**record, "marker": marker}


def _release(lock: HeldLock) -> None:
    tags = _lock_tags(lock.client, lock.name)
    if tags is not None and tags.get("token") == lock.token:
        lock.client.delete_registered_model(lock.name)
    else:
        logger.warning("promotion lock %s was no longer ours at release (now held by %s)", lock.name,
                       tags.get("holder") if tags else "nobody")


def _iso(ts: str | None) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(ts)))
    except (TypeError, ValueError):
        return str(ts)
