"""Which batches of call records were counted already: the exactly-once ledger.

A reporter numbers its batches 1, 2, 3, ... under one reporter id and sends a batch
again, with the same number, when it did not get the acknowledgement (a stream cut, a
replica killed, a failed durable write). Its :class:`ReporterLedger` says which
sequences were counted: a *high-water mark* (every sequence up to it) and the counted
ones above it (batches may arrive out of order: two streams around a reconnect,
concurrent re-sends). At most :data:`RECENT` are kept above the mark; past that the
mark moves up to the oldest of them, and a batch that never came below the new mark
would be taken for a copy (a reporter never leaves such a gap).

Shared by every replica: one store key per reporter, ``/metrics/reporters/<id>``
(:func:`reporter_key`), that the aggregator writes in the same transaction as the
buckets holding the batch's records, guarded by the key's ``mod_revision``. Whichever
replica commits a batch first counts it; any other one, the replica a reporter failed
over to or the same one again, finds it there (or, when its guard fails, reads the key
again and finds it then). The key is written under a lease that lets it expire about
an hour after the reporter's last batch.

In memory, :class:`LedgerCache` keeps the ledgers of recently active reporters with
the revision they were read or written at: bounded (least recently used first) and
emptied of idle reporters. A cached ledger may be stale, never wrong in the unsafe
direction: sequences are only ever added, so "counted" is always true; a stale one is
caught by the guard of the next write.

Before the shared ledger, each replica kept its own in :data:`SHARDS` keys
``/metrics/reporters/<replica>/<shard>``; :func:`read_legacy` reads those (a replica
upgraded while reporters re-send batches it counted), which are deleted once idle.
"""

from __future__ import annotations

import json
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "MAX_REPORTER_ID",
    "RECENT",
    "REPORTERS",
    "SHARDS",
    "LedgerCache",
    "ReporterLedger",
    "is_legacy_key",
    "newest_legacy",
    "read_legacy",
    "reporter_key",
]

#: Store prefix of the ledgers: /metrics/reporters/<reporter id, percent-encoded>.
REPORTERS: Final = "/metrics/reporters/"
#: Keys a replica's ledger was spread over before the ledger was shared.
SHARDS: Final = 16
#: Counted sequences kept above a reporter's high-water mark, at most.
RECENT: Final = 1024
#: Longest reporter id, characters.
MAX_REPORTER_ID: Final = 256


@dataclass(slots=True)
class ReporterLedger:
    """The sequences one reporter had counted, as of a store revision."""

    high: int = 0
    """Every sequence up to this one was counted."""
    above: set[int] = field(default_factory=set)
    """Counted sequences above ``high``."""
    revision: int = 0
    """``mod_revision`` of the reporter's key when read or written here; 0: absent."""
    used: float = 0.0
    """When this replica last had a batch of the reporter (Unix seconds)."""

    def counted(self, sequence: int) -> bool:
        """Whether the batch was counted."""
        return sequence <= self.high or sequence in self.above

    def noting(self, sequences: Iterable[int]) -> ReporterLedger:
        """A copy with ``sequences`` counted too (this one is left as it is)."""
        high, above = self.high, set(self.above)
        above.update(s for s in sequences if s > high)
        while len(above) > RECENT:
            # Give up waiting for the oldest gap: the mark jumps to the lowest counted.
            lowest = min(above)
            above.discard(lowest)
            high = lowest
        while high + 1 in above:
            high += 1
            above.discard(high)
        return ReporterLedger(high, above, self.revision, self.used)

    def merged(self, other: ReporterLedger) -> ReporterLedger:
        """A copy that counts what either counts (for ledgers of the old layout)."""
        high = max(self.high, other.high)
        return ReporterLedger(high, set(), self.revision, self.used).noting(
            s for s in (*self.above, *other.above) if s > high
        )

    def encode(self, seen: float) -> bytes:
        """The stored value (JSON): the mark, the sequences above it, when last seen."""
        return json.dumps(
            {"v": 2, "high": self.high, "above": sorted(self.above), "seen": seen},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, value: bytes, revision: int) -> ReporterLedger:
        """A stored value back (ValueError when it is not one)."""
        try:
            doc = json.loads(value)
            return cls(int(doc["high"]), {int(s) for s in doc["above"]}, revision)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a reporter ledger: {exc}") from None


class LedgerCache:
    """The ledgers of recently active reporters, bounded, least recently used first."""

    def __init__(self, *, idle_ttl: float = 3600.0, max_reporters: int = 10_000) -> None:
        self.idle_ttl = idle_ttl
        self.max_reporters = max_reporters
        self._ledgers: OrderedDict[str, ReporterLedger] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ledgers)

    def __contains__(self, reporter_id: object) -> bool:
        return reporter_id in self._ledgers

    def get(self, reporter_id: str) -> ReporterLedger | None:
        """The cached ledger of a reporter, or None when it is not cached."""
        return self._ledgers.get(reporter_id)

    def counted(self, reporter_id: str, sequence: int) -> bool:
        """Whether the batch is known here to be counted (False when not cached)."""
        ledger = self._ledgers.get(reporter_id)
        return ledger is not None and ledger.counted(sequence)

    def put(self, reporter_id: str, ledger: ReporterLedger, now: float) -> None:
        """Cache (or replace) a reporter's ledger; it is the most recently used."""
        ledger.used = now
        self._ledgers[reporter_id] = ledger
        self._ledgers.move_to_end(reporter_id)
        while len(self._ledgers) > self.max_reporters:
            self._ledgers.popitem(last=False)

    def touch(self, reporter_id: str, now: float) -> None:
        """The reporter sent a batch: keep its ledger longer."""
        ledger = self._ledgers.get(reporter_id)
        if ledger is not None:
            ledger.used = now
            self._ledgers.move_to_end(reporter_id)

    def expire(self, now: float) -> int:
        """Drop ledgers idle here for longer than ``idle_ttl``; returns how many."""
        cutoff = now - self.idle_ttl
        gone = 0
        # Nearly in order of use (a wall clock may step back): stop at the first one
        # still in use, the others go at a later pass.
        while self._ledgers:
            oldest = next(iter(self._ledgers.values()))
            if oldest.used >= cutoff:
                break
            self._ledgers.popitem(last=False)
            gone += 1
        return gone


def reporter_key(reporter_id: str) -> str:
    """The store key of a reporter's ledger (the id percent-encoded: no ``/`` in it)."""
    return REPORTERS + urllib.parse.quote(reporter_id, safe="")


def is_legacy_key(key: str) -> bool:
    """Whether a key under :data:`REPORTERS` is a shard of a per-replica ledger."""
    return "/" in key[len(REPORTERS) :]


def read_legacy(values: Iterable[bytes]) -> tuple[dict[str, ReporterLedger], int]:
    """The reporters of per-replica ledger shards, each counting what any shard counts,
    and how many values were unreadable."""
    found: dict[str, ReporterLedger] = {}
    unreadable = 0
    for value in values:
        try:
            rows = [
                (str(rid), int(high), [int(s) for s in above])
                for rid, high, above, _seen in json.loads(value)["reporters"]
            ]
        except (ValueError, KeyError, TypeError):
            unreadable += 1
            continue
        for rid, high, above in rows:
            ledger = ReporterLedger(high, set(above))
            known = found.get(rid)
            found[rid] = ledger if known is None else known.merged(ledger)
    return found, unreadable


def newest_legacy(value: bytes) -> float:
    """When the most recently active reporter of a per-replica shard was last seen."""
    rows = json.loads(value)["reporters"]
    return max((float(row[3]) for row in rows), default=0.0)
