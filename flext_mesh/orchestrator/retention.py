"""Retention: an ended execution is deleted ``retention`` seconds after it ended.

The ``/orchestrator/ended/END_MS/ID`` index orders ended executions by end time, so a
sweep reads only the expired ones; each goes in one transaction with its record,
definition, events and idempotency key.
"""

from __future__ import annotations

import asyncio
import logging
import time

from flext_mesh.orchestrator.records import (
    DEFINITIONS,
    ENDED,
    EVENTS,
    EXECUTIONS,
    STEP_RESULTS,
    idempotency_key,
)
from flext_mesh.orchestrator.settings import OrchestratorSettings
from flext_mesh.store import Delete, Put, Store
from flext_mesh.v1 import orchestrator_pb2

__all__ = ["Retention"]

_log = logging.getLogger("flext_mesh.orchestrator")


class Retention:
    """Deletes ended executions older than the retention, every ``sweep_interval``."""

    def __init__(self, store: Store, settings: OrchestratorSettings) -> None:
        self.store = store
        self.settings = settings

    async def sweep_forever(self) -> None:
        """Sweep every ``sweep_interval`` seconds."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                removed = await self.sweep()
            except Exception as exc:
                _log.warning(
                    "execution retention sweep failed: %s",
                    exc,
                    extra={"cause": "retention sweep failed"},
                )
                continue
            if removed:
                _log.info("retention removed executions=%d", removed)

    async def sweep(self, now: float | None = None) -> int:
        """Delete ended executions older than the retention; returns how many."""
        cutoff_ms = int(
            ((now if now is not None else time.time()) - self.settings.retention) * 1000
        )
        removed = 0
        while True:
            kvs = await self.store.range(ENDED, limit=200)
            expired = [kv for kv in kvs if int(kv.key.split("/")[3]) <= cutoff_ms]
            for kv in expired:
                execution_id = kv.key.rsplit("/", 1)[1]
                ops: list[Put | Delete] = [
                    Delete(kv.key),
                    Delete(EXECUTIONS + execution_id),
                    Delete(DEFINITIONS + execution_id),
                    Delete(f"{EVENTS}{execution_id}/", prefix=True),
                    Delete(f"{STEP_RESULTS}{execution_id}/", prefix=True),
                ]
                record = await self.store.get(EXECUTIONS + execution_id)
                if record is not None:
                    key = orchestrator_pb2.Execution.FromString(record.value).idempotency_key
                    if key:
                        ops.append(Delete(idempotency_key(key)))
                await self.store.txn((), ops)
                removed += 1
            if len(expired) < len(kvs) or len(kvs) < 200:
                return removed
