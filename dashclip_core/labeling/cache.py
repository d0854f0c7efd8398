"""Content-addressed label cache: a retried or re-run labelling step never pays twice for a pair.

The key of a pair is ``sha256`` over what the labeler sees and who labels it:
``(query, title, description, category, aisle, labeler_id)``. The ``product_id`` is deliberately not
part of it: two products with the same text get the same grade from the same labeler, so the second
one is free. ``labeler_id`` names the model *and* the prompt version (see ``base.py``), so bumping
either changes every key and nothing stale is served.

Only ``status == "ok"`` results are stored. A failed pair leaves no entry and is sent again on the
next run.

The cache is one SQLite file in WAL mode (stdlib ``sqlite3``): readers do not block the writer, and
several processes (Airflow retries, Ray workers, a dry run next to a real run) can share the file.
Writes use ``BEGIN IMMEDIATE`` so two writers queue on ``busy_timeout`` instead of failing when a
read lock is upgraded. WAL needs a local filesystem (not NFS), so keep the file on local disk, e.g.
``<DASHCLIP_HOME>/cache/labels.sqlite``. Open one :class:`LabelCache` per process or thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

from dashclip_core.labeling.base import LabelRequest, LabelResult

logger = logging.getLogger(__name__)

KEY_VERSION = "v1"  # bump if the key recipe changes; old entries then simply stop matching
_SQL_BATCH = 500  # keys per IN (...) query; well under SQLite's 32766 bound-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    key           BLOB PRIMARY KEY,   -- the 32 bytes of the sha256 of LabelCache.key (half the size of hex)
    labeler_id    TEXT NOT NULL,
    label         INTEGER NOT NULL,   -- 0/1/2; only ok results are cached
    reason        TEXT,
    input_tokens  INTEGER NOT NULL,   -- what the label cost when it was made
    output_tokens INTEGER NOT NULL,
    query         TEXT NOT NULL,      -- first pair that produced the entry (for inspection only)
    product_id    TEXT NOT NULL,
    created_at    TEXT NOT NULL       -- ISO 8601 UTC
) WITHOUT ROWID;  -- no secondary index: lookups are by key only, and stats() may scan
"""


@dataclass(frozen=True)
class CacheStats:
    """Entries in the file and the traffic seen by this :class:`LabelCache` instance."""

    path: str
    n_entries: int
    n_by_labeler: dict[str, int]
    size_bytes: int  # database file + WAL
    hits: int  # lookups answered by this instance
    misses: int
    writes: int  # new entries written by this instance

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class LabelCache:
    """SQLite-backed cache of ok labels, keyed by :meth:`key`.

    Args:
        path: the SQLite file; its folder is created. Keep it on a local disk (WAL needs shared memory).
        timeout_s: how long a write waits for another process's write to finish before raising.
    """

    def __init__(self, path: str | Path, timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (BEGIN IMMEDIATE for writes).
        self._conn = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); put the label cache on a local disk")
        # NORMAL is durable across process crashes in WAL mode (only an OS crash may lose the last commits).
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        self._conn.executescript(_SCHEMA)
        self._hits = self._misses = self._writes = 0

    # ---- keys -----------------------------------------------------------------------------------

    @staticmethod
    def key(request: LabelRequest, labeler_id: str) -> str:
        """sha256 hex of (query, title, description, category, aisle, labeler_id).

        Fields are stripped and None counts as "" (a prompt renders both the same); JSON encoding keeps
        field boundaries unambiguous ("a b" + "c" differs from "a" + "b c").
        """
        fields = [KEY_VERSION, request.query.strip(), labeler_id]
        fields += [(v or "").strip() for v in (request.title, request.description, request.category, request.aisle)]
        return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest()

    def keys(self, requests: Iterable[LabelRequest], labeler_id: str) -> list[str]:
        return [self.key(r, labeler_id) for r in requests]

    # ---- reading --------------------------------------------------------------------------------

    def get_many(self, requests: Sequence[LabelRequest], labeler_id: str, keys: Sequence[str] | None = None) -> dict[str, LabelResult]:
        """Cached results of ``requests`` by key (misses are absent), marked ``cached=True``.

        A result carries the query and product_id of the first request with that key, and the token
        counts the label cost when it was made (``cached=True`` tells that nothing was paid now).

        Args:
            requests: the pairs to look up.
            labeler_id: whose labels to look up.
            keys: ``self.keys(requests, labeler_id)`` if the caller already has them (saves hashing twice).
        """
        if keys is None:
            keys = self.keys(requests, labeler_id)
        elif len(keys) != len(requests):
            raise ValueError(f"get_many: {len(keys)} keys for {len(requests)} requests")
        first: dict[str, LabelRequest] = {}
        for k, r in zip(keys, requests):
            first.setdefault(k, r)
        out: dict[str, LabelResult] = {}
        for key, label, reason, n_in, n_out, row_labeler in self._select(list(first)):
            key = key.hex()
            r = first[key]
            out[key] = LabelResult(r.query, r.product_id, label, "ok", row_labeler, reason, n_in, n_out, cached=True)
        hits = sum(1 for k in keys if k in out)
        self._hits += hits
        self._misses += len(keys) - hits
        return out

    def _select(self, keys: list[str]) -> Iterator[tuple]:
        sql = "SELECT key, label, reason, input_tokens, output_tokens, labeler_id FROM labels WHERE key IN ({})"
        for start in range(0, len(keys), _SQL_BATCH):
            batch = [bytes.fromhex(k) for k in keys[start : start + _SQL_BATCH]]
            yield from self._conn.execute(sql.format(",".join("?" * len(batch))), batch)

    # ---- writing --------------------------------------------------------------------------------

    def put_many(self, results: Iterable[LabelResult], requests: Iterable[LabelRequest], created_at: datetime | None = None) -> int:
        """Store the ok, non-cached results; return how many new entries were written.

        Results are matched to their request by (query, product_id), because the key needs the product
        text the labeler saw. A key that is already present keeps its first label (a content-addressed
        entry does not change), so two processes labelling the same pair agree on what is served.

        Args:
            results: labeler output; failed and ``cached`` results are skipped.
            requests: the requests those results answer.
            created_at: timestamp to record (UTC); defaults to the current time.

        Raises:
            ValueError: an ok result has no matching request.
        """
        by_pair = {(r.query, r.product_id): r for r in requests}
        stamp = (created_at or datetime.now(UTC)).astimezone(UTC).isoformat()
        rows = []
        for res in results:
            if res.status != "ok" or res.cached:
                continue
            req = by_pair.get((res.query, res.product_id))
            if req is None:
                raise ValueError(f"put_many: result for ({res.query!r}, {res.product_id!r}) has no matching request; "
                                 "pass the requests the labeler was given")
            rows.append((bytes.fromhex(self.key(req, res.labeler_id)), res.labeler_id, res.label, res.reason, res.input_tokens,
                         res.output_tokens, res.query, res.product_id, stamp))
        if not rows:
            return 0
        before = self._conn.total_changes
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.executemany("INSERT OR IGNORE INTO labels VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        written = self._conn.total_changes - before
        self._writes += written
        return written

    # ---- housekeeping ---------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        by_labeler = dict(self._conn.execute("SELECT labeler_id, COUNT(*) FROM labels GROUP BY labeler_id").fetchall())
        size = sum(p.stat().st_size for p in (self.path, self.path.with_name(self.path.name + "-wal")) if p.exists())
        return CacheStats(str(self.path), sum(by_labeler.values()), by_labeler, size, self._hits, self._misses, self._writes)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
