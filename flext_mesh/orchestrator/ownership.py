"""Which replica drives which execution, and the fence on the owner's writes.

Every active execution has an owner key (``/orchestrator/owners/ID``) holding the name
of the replica that drives it, under that replica's ownership lease, so the key goes
when the replica dies (or stops cleanly and revokes its lease). A run's write commits
only while its owner key still has the revision this replica wrote (:meth:`Ownership.fence`):
a replica that paused past its lease and lost the execution to another cannot write.
A replica takes over an active execution whose owner key is gone: at start (every one,
on an exclusive store), whenever an owner key is deleted, and every ``claim_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from flext_mesh.errors import MeshError
from flext_mesh.orchestrator.records import ACTIVE, CANCELS, OWNERS
from flext_mesh.orchestrator.settings import OrchestratorSettings
from flext_mesh.store import Compare, Delete, Event, EventType, LeaseNotFound, Put, Store

__all__ = ["Ownership"]

_log = logging.getLogger("flext_mesh.orchestrator")


class Ownership:
    """This replica's ownership lease and the executions it has claimed."""

    def __init__(
        self,
        store: Store,
        settings: OrchestratorSettings,
        *,
        resume: Callable[[str], Awaitable[None]],
        skip: Callable[[str], bool],
        abandon: Callable[[], None],
    ) -> None:
        """``resume(id)`` drives a claimed execution; ``skip(id)`` is True for one not to
        claim now (a run here drives it, or this replica is stopping); ``abandon()``
        cancels every run here (the lease lapsed: their claims are gone)."""
        self.store = store
        self.settings = settings
        self._resume = resume
        self._skip = skip
        self._abandon = abandon
        # This replica's lease, and the mod revision of each owner key it wrote (a
        # write by a run is committed only while its owner key is unchanged).
        self.lease: str | None = None
        self.claims: dict[str, int] = {}
        self._wakeup = asyncio.Event()
        self._unlisten: Callable[[], None] | None = None

    async def start(self) -> None:
        """Take a lease and watch for owner keys that go."""
        self.lease = (await self.store.grant_lease(self.settings.ownership_ttl)).lease_id
        self._unlisten = self.store.listen(OWNERS, self._on_owner_events)

    def stop_listening(self) -> None:
        """Stop watching owner keys (the first step of a stop)."""
        if self._unlisten is not None:
            self._unlisten()
        self._unlisten = None

    async def release(self) -> None:
        """Revoke the lease: a clean stop hands the executions over at once rather than
        at lease expiry."""
        lease, self.lease = self.lease, None
        self.claims.clear()
        if lease is not None:
            with contextlib.suppress(Exception):
                await self.store.revoke_lease(lease)

    def owner_ops(self, execution_id: str) -> list[Put | Delete]:
        """Operations that make this replica the owner of a new execution."""
        return [Put(OWNERS + execution_id, self.settings.owner.encode(), lease=self.lease)]

    def fence(self, execution_id: str) -> Compare | None:
        """The guard of a run's write: its owner key is still the one this replica wrote."""
        revision = self.claims.get(execution_id)
        return None if revision is None else Compare(OWNERS + execution_id, revision)

    def claimed(self, execution_id: str, revision: int) -> None:
        """Record that the owner key of ``execution_id`` was written at ``revision``."""
        self.claims[execution_id] = revision

    async def claim(self, execution_id: str, *, force: bool = False) -> bool:
        """Write the owner key (only if absent, unless ``force``); True when this won."""
        if self.lease is None:
            return False
        key = OWNERS + execution_id
        result = await self.store.txn(
            () if force else (Compare(key, 0),),
            [Put(key, self.settings.owner.encode(), lease=self.lease)],
        )
        if result.succeeded:
            self.claims[execution_id] = result.revision
        return result.succeeded

    async def drop_active(self, execution_id: str) -> None:
        """Forget an execution nobody should drive (ended, or its record is gone)."""
        await self.store.txn(
            (),
            [
                Delete(ACTIVE + execution_id),
                Delete(OWNERS + execution_id),
                Delete(CANCELS + execution_id),
            ],
        )
        self.claims.pop(execution_id, None)

    async def claim_orphans(self, *, force: bool = False) -> int:
        """Take over and resume active executions without a live owner; how many."""
        owned = {kv.key.removeprefix(OWNERS) for kv in await self.store.range(OWNERS)}
        resumed = 0
        for kv in await self.store.range(ACTIVE):
            execution_id = kv.key.removeprefix(ACTIVE)
            if self._skip(execution_id):
                continue
            if not force and execution_id in owned:
                continue
            if not await self.claim(execution_id, force=force):
                continue
            try:
                await self._resume(execution_id)
                resumed += 1
            except MeshError as exc:  # a damaged execution must not stop the plane
                _log.error("cannot resume execution=%s: %s", execution_id, exc.message)
        return resumed

    def _on_owner_events(self, events: list[Event]) -> None:
        """Store listener: an owner key another replica held went (it died, or ended
        the execution): look now. The keys of executions this replica drives go when it
        ends them, which is no news; an exclusive store has no other replica (the
        periodic look and a lapsed lease cover it). Every execution's end used to start
        two scans of every active execution here: O(active) work per end."""
        if self.settings.exclusive_store:
            return
        for event in events:
            if event.type == EventType.DELETE and not self._skip(event.key.removeprefix(OWNERS)):
                self._wakeup.set()
                return

    async def claim_forever(self) -> None:
        """Look for executions to take over: when an owner key goes, and periodically."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.claim_interval):
                    await self._wakeup.wait()
            self._wakeup.clear()
            try:
                taken = await self.claim_orphans()
            except Exception as exc:
                _log.warning(
                    "looking for executions to take over failed: %s",
                    exc,
                    extra={"cause": "takeover scan failed"},
                )
                continue
            if taken:
                _log.info("took over executions=%d", taken)

    async def keep_lease_forever(self) -> None:
        """Renew the ownership lease; if it lapsed, every run here has lost its claim."""
        while True:
            await asyncio.sleep(self.settings.ownership_ttl / 4)
            lease = self.lease
            if lease is None:
                continue
            try:
                await self.store.keep_alive(lease)
            except LeaseNotFound:
                _log.error("ownership lease lapsed; executions here stop and are taken over again")
                self.claims.clear()  # the runs' next writes fail: they stop
                self._abandon()
                self.lease = (await self.store.grant_lease(self.settings.ownership_ttl)).lease_id
                self._wakeup.set()
            except Exception as exc:
                _log.warning(
                    "renewing the ownership lease failed: %s",
                    exc,
                    extra={"cause": "ownership renewal failed"},
                )
