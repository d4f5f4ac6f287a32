"""The orchestrator's tunables, and this replica's default name."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

__all__ = ["OrchestratorSettings", "default_owner"]


def default_owner() -> str:
    """This replica's name in Execution.owner: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, kw_only=True)
class OrchestratorSettings:
    """Tunables of the orchestrator (the server maps its flags onto these)."""

    #: Name of this control-plane replica, recorded as the owner of what it drives.
    owner: str = field(default_factory=default_owner)
    #: Seconds an ended execution (record, events) is kept before it is deleted.
    retention: float = 7 * 24 * 3600.0
    #: Seconds between retention sweeps.
    sweep_interval: float = 60.0
    #: Seconds CancelExecution waits for running steps to stop before answering.
    cancel_wait: float = 5.0
    #: Seconds before a run that lost its store is resumed from the store.
    resume_delay: float = 1.0
    #: Seconds between flushes of execution and step durations to the metrics service.
    metrics_flush_interval: float = 0.5
    #: True when this replica is the only one on its store (SQLite): it drives every
    #: active execution at start without waiting for a dead owner's lease to expire.
    exclusive_store: bool = True
    #: TTL of this replica's ownership lease, seconds: a dead replica's executions are
    #: taken over at most this long (plus ``claim_interval``) after it died.
    ownership_ttl: float = 8.0
    #: Seconds between scans for active executions nobody owns.
    claim_interval: float = 2.0
    #: Seconds to wait for the instance that got a step attempt whose answer was lost
    #: (cancelled in flight, timed out) to say what became of it, before compensating.
    resolve_timeout: float = 30.0
