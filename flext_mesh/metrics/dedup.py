"""Which batches of call records were counted already: exactly-once reporting.

A reporter numbers its batches 1, 2, 3, ... under one reporter id, and sends a batch
again, with the same number, when it did not get the answer (a stream cut, a lost
reply, a failed durable write). The :class:`BatchLedger` remembers, per reporter id,
a *high-water mark* (every sequence up to it was counted) and the counted sequences
above it: batches may arrive out of order (two streams of one reporter around a
reconnect, concurrent re-sends). At most :data:`RECENT` sequences are kept above the
mark; past that the mark moves up to the oldest of them, and a batch that never came
below the new mark would be taken for a copy (a reporter never leaves such a gap).

Bounded: a reporter idle for ``idle_ttl`` (1 h by default) is forgotten, and at most
``max_reporters`` (10,000) are kept, the least recently active dropped first. A batch
of a forgotten reporter that is sent again is counted again.

Durable: the aggregator writes the ledger in the same store transaction as the
buckets it protects (its checkpoint), so after a restart, ``kill -9`` included, a
batch is known as counted exactly when its records are in the store. The ledger
lives in :data:`SHARDS` keys per replica, ``/metrics/reporters/<replica>/<shard>``
(``<replica>`` empty for a lone control plane): a checkpoint writes at most that many
keys however many reporters sent, which keeps it within etcd's operations per
transaction. Each replica keeps its own ledger: a batch re-sent to *another* replica
after a failover may be counted twice (once by each).
"""

from __future__ import annotations

import json
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "MAX_REPORTER_ID",
    "RECENT",
    "REPORTERS",
    "SHARDS",
    "BatchLedger",
    "shard_key",
    "shard_of",
]

#: Store prefix of the ledgers: /metrics/reporters/<replica>/<shard, 2 digits>.
REPORTERS: Final = "/metrics/reporters/"
#: Keys one replica's ledger is spread over.
SHARDS: Final = 16
#: Counted sequences kept above a reporter's high-water mark, at most.
RECENT: Final = 1024
#: Longest reporter id, characters.
MAX_REPORTER_ID: Final = 256


@dataclass(slots=True)
class _Reporter:
    """What one reporter had counted."""

    high: int = 0
    above: set[int] = field(default_factory=set)
    seen: float = 0.0


class BatchLedger:
    """Counted (reporter id, batch sequence) pairs, bounded, in shards to persist."""

    def __init__(self, *, idle_ttl: float = 3600.0, max_reporters: int = 10_000) -> None:
        self.idle_ttl = idle_ttl
        self.max_reporters = max_reporters
        #: Shards changed since the aggregator last took them for a checkpoint.
        self.dirty: set[int] = set()
        self._shards: list[dict[str, _Reporter]] = [{} for _ in range(SHARDS)]
        # Least recently active first: reporter id -> shard.
        self._lru: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def counted(self, reporter_id: str, sequence: int) -> bool:
        """Whether this batch was counted before."""
        shard = self._lru.get(reporter_id)
        if shard is None:
            return False
        reporter = self._shards[shard][reporter_id]
        return sequence <= reporter.high or sequence in reporter.above

    def record(self, reporter_id: str, sequence: int, now: float) -> None:
        """Note that the batch was counted (its shard is then dirty)."""
        shard = self._lru.get(reporter_id)
        if shard is None:
            shard = shard_of(reporter_id)
            reporter = self._shards[shard][reporter_id] = _Reporter()
            self._lru[reporter_id] = shard
            while len(self._lru) > self.max_reporters:
                self._forget(next(iter(self._lru)))
        else:
            reporter = self._shards[shard][reporter_id]
            self._lru.move_to_end(reporter_id)
        reporter.seen = now
        self.dirty.add(shard)
        if sequence <= reporter.high or sequence in reporter.above:
            return
        above = reporter.above
        above.add(sequence)
        if len(above) > RECENT:
            # Give up waiting for the oldest gap: the mark jumps to the lowest counted.
            lowest = min(above)
            above.discard(lowest)
            reporter.high = lowest
        while reporter.high + 1 in above:
            reporter.high += 1
            above.discard(reporter.high)

    def touch(self, reporter_id: str, now: float) -> None:
        """The reporter is active (it re-sent a batch): keep it; not worth a write."""
        shard = self._lru.get(reporter_id)
        if shard is not None:
            self._lru.move_to_end(reporter_id)
            self._shards[shard][reporter_id].seen = now

    def expire(self, now: float) -> int:
        """Forget reporters idle for longer than ``idle_ttl``; returns how many."""
        cutoff = now - self.idle_ttl
        gone = 0
        # Nearly in order of last activity (a wall clock may step back): stop at the
        # first one still active, the others go at a later pass.
        while self._lru:
            oldest = next(iter(self._lru))
            if self._shards[self._lru[oldest]][oldest].seen >= cutoff:
                break
            self._forget(oldest)
            gone += 1
        return gone

    def _forget(self, reporter_id: str) -> None:
        shard = self._lru.pop(reporter_id)
        del self._shards[shard][reporter_id]
        self.dirty.add(shard)

    # -- persistence --------------------------------------------------------------------

    def take_dirty(self) -> set[int]:
        """The shards to write now (no longer dirty; give them back if the write fails)."""
        dirty, self.dirty = self.dirty, set()
        return dirty

    def encode(self, shard: int) -> bytes | None:
        """A shard's stored value; None when it is empty (delete the key)."""
        reporters = self._shards[shard]
        if not reporters:
            return None
        rows = [[rid, r.high, sorted(r.above), r.seen] for rid, r in reporters.items()]
        return json.dumps({"v": 1, "reporters": rows}, separators=(",", ":")).encode()

    def load(self, values: Iterable[bytes], now: float) -> int:
        """Take stored shards back (at start): idle reporters are left out. Returns how
        many values were unreadable (skipped: their reporters' batches count again)."""
        cutoff = now - self.idle_ttl
        rows: list[tuple[float, str, int, list[int]]] = []
        unreadable = 0
        for value in values:
            try:
                stored = [
                    (float(seen), str(rid), int(high), [int(s) for s in above])
                    for rid, high, above, seen in json.loads(value)["reporters"]
                ]
            except (ValueError, KeyError, TypeError):
                unreadable += 1
                continue
            for row in stored:
                if row[0] >= cutoff:
                    rows.append(row)
                else:
                    self.dirty.add(shard_of(row[1]))
        rows.sort()
        for seen, rid, high, above in rows:
            shard = shard_of(rid)
            self._shards[shard][rid] = _Reporter(high, set(above), seen)
            self._lru[rid] = shard
            self._lru.move_to_end(rid)
        while len(self._lru) > self.max_reporters:
            self._forget(next(iter(self._lru)))
        return unreadable

    @staticmethod
    def newest(value: bytes) -> float:
        """When the most recently active reporter of a stored shard was last seen."""
        rows = json.loads(value)["reporters"]
        return max((float(row[3]) for row in rows), default=0.0)


def shard_of(reporter_id: str) -> int:
    """The shard of a reporter id (stable across processes, unlike ``hash``)."""
    return zlib.crc32(reporter_id.encode()) % SHARDS


def shard_key(replica: str, shard: int) -> str:
    """The store key of one shard of a replica's ledger."""
    return f"{REPORTERS}{replica}/{shard:02d}"
