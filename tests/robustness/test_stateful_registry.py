"""The registry against a model, under random sequences of operations (hypothesis).

A real Registry on a real SqliteStore in a temporary directory, driven by register,
heartbeat, deregister, the passing of time (a fake clock, then the lease sweep) and
restarts (store and registry closed and opened again on the same file). After every
step the registry's cache, the store's keys and the model must name the same
instances, each of its service and under its current lease.

The model, from the store's documentation: a lease expires when its deadline is
reached and the sweeper runs; until then its instance is still registered (and counts
against its service's limit) but can no longer be renewed; after a restart every
lease gets one full TTL of grace. ``STATEFUL_EXAMPLES`` (default 25) sets how many
random sequences run, e.g. ``STATEFUL_EXAMPLES=500 .venv/bin/pytest tests/robustness``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import duration_pb2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from flext_mesh.errors import NotFound, ResourceExhausted
from flext_mesh.registry.registry import INSTANCES, Registry, RegistrySettings
from flext_mesh.store.sqlite import SqliteStore
from tests.robustness.conftest import instance

_T = TypeVar("_T")

EXAMPLES = int(os.environ.get("STATEFUL_EXAMPLES", "25"))
LIMIT = 3  # instances per service
SERVICES = st.sampled_from(["pay", "cart"])
INSTANCE_IDS = st.sampled_from([f"i{i}" for i in range(5)])
TTLS = st.sampled_from([2, 5, 10])  # whole seconds: deadlines compare exactly
STEPS = st.sampled_from([0.5, 1.0, 2.0, 4.5, 11.0])


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Registered:
    """What the model knows of one instance."""

    lease_id: str
    ttl: float
    deadline: float


class RegistryMachine(RuleBasedStateMachine):
    """Registry + SqliteStore vs a dict of (service, instance id) -> Registered."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="stateful-registry-"))
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.model: dict[tuple[str, str], Registered] = {}
        self.old_leases: list[str] = []
        self.restarts = 0
        self._open()

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(coroutine)

    def _open(self) -> None:
        # The background sweeper is kept out of the way: sweeps happen in advance().
        self.store = SqliteStore(
            self.dir / "registry.db",
            synchronous="NORMAL",
            sweep_interval=3600,
            clock=self.clock,
        )
        self.registry = Registry(
            self.store,
            RegistrySettings(max_instances_per_service=LIMIT, refresh_interval=3600),
        )
        self._run(self.store.open())
        self._run(self.registry.start())

    def _close(self) -> None:
        self._run(self.registry.stop())
        self._run(self.store.close())

    def teardown(self) -> None:
        try:
            self._close()
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _count(self, service: str) -> int:
        return sum(1 for s, _ in self.model if s == service)

    # -- rules ---------------------------------------------------------------------

    @rule(service=SERVICES, instance_id=INSTANCE_IDS, ttl=TTLS)
    def register(self, service: str, instance_id: str, ttl: int) -> None:
        key = (service, instance_id)
        allowed = key in self.model or self._count(service) < LIMIT
        refusal = ""
        try:
            registered, lease, _ = self._run(
                self.registry.register(
                    instance(service, instance_id), duration_pb2.Duration(seconds=ttl)
                )
            )
        except ResourceExhausted as exc:
            refusal = exc.message
        if refusal:
            assert not allowed, f"refused although allowed: {refusal}"
            assert f"limit of {LIMIT} instances" in refusal
            return
        assert allowed, f"{key} registered past the limit"
        assert (registered.service_name, registered.instance_id) == key
        previous = self.model.get(key)
        if previous is not None:
            self.old_leases.append(previous.lease_id)
        self.model[key] = Registered(lease.lease_id, ttl, self.clock.now + ttl)

    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        current = [r.lease_id for r in self.model.values()]
        choices = current + self.old_leases + ["never-granted"]
        lease_id = data.draw(st.sampled_from(choices), label="lease")
        owner = next((r for r in self.model.values() if r.lease_id == lease_id), None)
        alive = owner is not None and owner.deadline > self.clock.now
        try:
            self._run(self.registry.heartbeat(lease_id))
        except NotFound:
            assert not alive, f"live lease {lease_id} refused"
            return
        assert alive, f"dead lease {lease_id} renewed"
        assert owner is not None
        owner.deadline = self.clock.now + owner.ttl

    @rule(service=SERVICES, instance_id=INSTANCE_IDS)
    def deregister(self, service: str, instance_id: str) -> None:
        key = (service, instance_id)
        try:
            self._run(self.registry.deregister(service, instance_id))
        except NotFound:
            assert key not in self.model
            return
        registered = self.model.pop(key)
        self.old_leases.append(registered.lease_id)

    @rule(seconds=STEPS)
    def advance(self, seconds: float) -> None:
        """Time passes, then the sweeper runs once."""
        self.clock.now += seconds
        self._run(self.store.expire_due())
        for key, registered in list(self.model.items()):
            if registered.deadline <= self.clock.now:
                del self.model[key]
                self.old_leases.append(registered.lease_id)

    @rule()
    def restart(self) -> None:
        """Close everything and open it again on the same file: nothing acknowledged is
        lost, and every lease gets a full TTL of grace."""
        self._close()
        self._open()
        self.restarts += 1
        for registered in self.model.values():
            registered.deadline = self.clock.now + registered.ttl

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def cache_store_and_model_agree(self) -> None:
        expected = {key: r.lease_id for key, r in self.model.items()}
        cached = {
            (service, instance_id): found.lease_id
            for (service, instance_id) in {*expected, *self._cached_keys()}
            if (found := self.registry.get(service, instance_id)) is not None
        }
        assert cached == expected, "registry cache vs model"
        stored = {}
        for kv in self._run(self.store.range(INSTANCES)):
            service, _, instance_id = kv.key[len(INSTANCES) :].partition("/")
            stored[(service, instance_id)] = kv.lease
        assert stored == expected, "store vs model"
        for service in ("pay", "cart"):
            assert self._count(service) <= LIMIT

    def _cached_keys(self) -> set[tuple[str, str]]:
        return {
            (service, f"i{i}")
            for service in ("pay", "cart")
            for i in range(5)
            if self.registry.get(service, f"i{i}") is not None
        }


RegistryMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class TestRegistryAgainstModel(RegistryMachine.TestCase):
    """Runs the state machine (pytest collects this class)."""
