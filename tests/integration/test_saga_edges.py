"""Saga edge cases across real processes, counting the side effects in the sidecars.

Every test runs `flext-mesh serve` and `flext-sidecar` processes hosting the step
processors of tests/orchestrator/apps.py, which record each side effect they really
perform in a per-process ledger. The step whose answer gets lost is served by two
instances, and the ledgers of both are summed: "exactly once" means once over the
service, not once per instance. What is asserted is what a user sees: the execution's
final state, each step's state, the history (STEP_OUTCOME_RESOLVED, at_least_once) and
the work done.

- A CancelExecution or a step timeout cuts off a call the instance goes on with: the
  orchestrator asks that instance what became of it before compensating, so the work
  done unseen is undone, once.
- kill -9 of the control plane (SQLite) or of the replica owning the execution (etcd):
  the step in flight is sent again to the instance that got it, with the same key,
  and runs once.
- That instance died too and its registration lapsed: the resend goes to the other
  instance and the history says the step may have run twice (at_least_once).
- That instance died and is still registered (a restarted SQLite store gives every
  lease one more TTL): the resend to it is refused, and what became of the first
  attempt is still unknown, so a later attempt elsewhere is at-least-once and a step
  that fails is settled (and compensated anyway) like any lost answer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.orchestrator.formats import workflow_from_dict
from flext_mesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from tests.conftest import ServeProcess, start_serve
from tests.etcd_server import EtcdServer
from tests.integration.saga_fleet import (
    Fleet,
    SidecarSpec,
    cancel,
    events_of,
    healthy_instances,
    state_name,
    step,
    step_states,
    until,
)
from tests.integration.test_workflows import Mesh

# "saga_edges" shares one control plane (killed and restarted on its port by the
# SQLite loop) and its sidecars; "saga_edges_replicas" has an etcd and three replicas
# of its own; each "saga_edges_lost_instance" test has its own plane and sidecars. The
# groups run beside each other (nothing shared), their tests one after another.
SHARED = pytest.mark.xdist_group("saga_edges")
REPLICAS = pytest.mark.xdist_group("saga_edges_replicas")
LOST_INSTANCE = pytest.mark.xdist_group("saga_edges_lost_instance")

_E = orchestrator_pb2
STARTED = _E.EXECUTION_EVENT_TYPE_STEP_STARTED
RESOLVED = _E.EXECUTION_EVENT_TYPE_STEP_OUTCOME_RESOLVED
RESUMED = _E.EXECUTION_EVENT_TYPE_EXECUTION_RESUMED
CANCELLED_STEP = _E.EXECUTION_EVENT_TYPE_STEP_CANCELLED
SUCCEEDED = _E.EXECUTION_EVENT_TYPE_STEP_SUCCEEDED
#: STEP_SUCCEEDED's message when the callee answered from its idempotency cache.
REPLAYED = "replayed by the callee"

#: charge -> reserve -> ship, the first two undone by refund and release.
CHECKOUT = {
    "name": "edge_checkout",
    "steps": [
        {"name": "charge", "service": "payment", "compensation": "refund"},
        {
            "name": "reserve",
            "service": "inventory",
            "depends_on": ["charge"],
            "compensation": "release",
        },
        {"name": "ship", "service": "shipping", "depends_on": ["reserve"]},
    ],
}

#: The same, with a reservation timeout shorter than the work and one retry.
CHECKOUT_TIMEOUT = {
    "name": "edge_checkout_step_timeout",
    "steps": [
        {"name": "charge", "service": "payment", "compensation": "refund"},
        {
            "name": "reserve",
            "service": "inventory",
            "depends_on": ["charge"],
            "timeout": "0.5s",
            "retry": {"max_attempts": 2, "initial_backoff": "50ms", "jitter": 0},
            "compensation": "release",
        },
        {"name": "ship", "service": "shipping", "depends_on": ["reserve"]},
    ],
}

#: a -> slow -> c: the middle step is the one in flight when something is killed.
A_SLOW_C = {
    "name": "edge_a_slow_c",
    "steps": [
        {"name": "a", "service": "payment", "operation": "charge"},
        {"name": "slow", "service": "inventory", "operation": "reserve", "depends_on": ["a"]},
        {"name": "c", "service": "shipping", "operation": "ship", "depends_on": ["slow"]},
    ],
}

#: One payment and one shipping instance; the slow step's service has two.
SIDECARS = (
    SidecarSpec("payment", "payment-1"),
    SidecarSpec("inventory", "inventory-1"),
    SidecarSpec("inventory", "inventory-2"),
    SidecarSpec("shipping", "shipping-1"),
)
INVENTORY = {"inventory-1", "inventory-2"}
#: Flags of a control plane on a SQLite store under the test's directory.
SQLITE = ("--health-check-interval", "0.5")

#: The slow step's instances with a short lease: a dead one's registration lapses soon.
LAPSING = (
    SidecarSpec("payment", "payment-1", ttl=30),
    SidecarSpec("inventory", "inventory-1", ttl=3),
    SidecarSpec("inventory", "inventory-2", ttl=3),
    SidecarSpec("shipping", "shipping-1", ttl=30),
)

#: a -> slow -> c, the slow step patient enough to outlast a dead instance's
#: health checks (6 attempts over about 7 s).
A_SLOW_C_PATIENT = {
    "name": "edge_a_slow_c_patient",
    "steps": [
        {"name": "a", "service": "payment", "operation": "charge"},
        {
            "name": "slow",
            "service": "inventory",
            "operation": "reserve",
            "depends_on": ["a"],
            "retry": {"max_attempts": 6, "initial_backoff": "0.5s", "jitter": 0},
        },
        {"name": "c", "service": "shipping", "operation": "ship", "depends_on": ["slow"]},
    ],
}

#: a -> slow -> c, a and slow undone by refund and release, slow resent only once.
A_SLOW_C_UNDONE = {
    "name": "edge_a_slow_c_undone",
    "steps": [
        {"name": "a", "service": "payment", "operation": "charge", "compensation": "refund"},
        {
            "name": "slow",
            "service": "inventory",
            "operation": "reserve",
            "depends_on": ["a"],
            "retry": {"max_attempts": 2, "initial_backoff": "50ms", "jitter": 0},
            "compensation": "release",
        },
        {"name": "c", "service": "shipping", "operation": "ship", "depends_on": ["slow"]},
    ],
}


def _put(address: str, *workflows: dict[str, Any]) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        for workflow in workflows:
            stub.PutWorkflow(
                orchestrator_pb2.PutWorkflowRequest(workflow=workflow_from_dict(workflow)),
                timeout=10,
            )


def _wait_serving(address: str, fleet: Fleet) -> None:
    """Until the control plane at ``address`` would call every sidecar of ``fleet``."""

    def all_of(service: str) -> bool:
        return healthy_instances(address, service) >= fleet.instance_ids(service)

    for service in fleet.sidecars:
        until(partial(all_of, service), 15, f"every {service} instance registered at {address}")


def _step_running(mesh: Mesh, execution_id: str, name: str) -> bool:
    try:
        execution = mesh.get(execution_id).execution
    except grpc.RpcError:
        return False
    return step_states(execution)[name] == "RUNNING"


def _history(events: Sequence[orchestrator_pb2.ExecutionEvent]) -> str:
    """The events as lines, for assertion messages."""
    kind = orchestrator_pb2.ExecutionEventType.Name
    return "\n".join(
        f"{e.index} {kind(e.type).removeprefix('EXECUTION_EVENT_TYPE_')} {e.step_name}"
        f" attempt={e.attempt} instance={e.instance_id}"
        f" at_least_once={e.at_least_once} {e.error.code_name} {e.message}"
        for e in events
    )


@dataclass
class Plane:
    """One control plane, restarted in place after a kill, and the sidecars it knows."""

    mesh: Mesh
    fleet: Fleet
    #: ``flext-mesh serve`` flags besides --listen, the same at every restart.
    args: tuple[str, ...]

    def restart(self) -> None:
        """Start a control plane on the last one's port and store (after it was killed)."""
        address = self.mesh.plane.address
        self.mesh.plane = start_serve(self.mesh.tmp, "--listen", address, *self.args)

    def lose_the_slow_step(self, execution_id: str) -> tuple[str, str]:
        """While ``slow`` runs: kill -9 the control plane and the inventory instance
        working on it, then restart the plane. Returns (that instance, the other)."""
        mesh = self.mesh
        until(lambda: _step_running(mesh, execution_id, "slow"), 10, "slow running")
        first = step(mesh.get(execution_id).execution, "slow").instance_id
        assert first in INVENTORY
        (other,) = INVENTORY - {first}
        time.sleep(0.3)  # the call is under way on its instance
        mesh.plane.kill()
        dead = self.fleet.instance(first).proc
        dead.kill()  # the work it was doing is lost with it
        dead.wait(10)
        self.restart()
        return first, other


@contextlib.contextmanager
def _plane(
    tmp: Path, args: tuple[str, ...], sidecars: Sequence[SidecarSpec], *workflows: dict[str, Any]
) -> Iterator[Plane]:
    """A control plane started with ``args``, its sidecars, the workflows stored;
    every process stopped on the way out."""
    plane = start_serve(tmp, *args)
    running = Plane(Mesh(tmp, plane, {}), Fleet(), args)
    try:
        running.fleet = Fleet.start(tmp, plane.address, sidecars)
        _wait_serving(plane.address, running.fleet)
        _put(plane.address, *workflows)
        yield running
    finally:
        running.fleet.stop()
        if running.mesh.plane.proc.poll() is None:
            running.mesh.plane.kill()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    tmp = tmp_path_factory.mktemp("saga-edges")
    with _plane(tmp, SQLITE, SIDECARS, CHECKOUT, CHECKOUT_TIMEOUT, A_SLOW_C) as plane:
        yield plane


@SHARED
def test_a_cancel_during_a_slow_step_releases_what_it_reserved_once(shared: Plane) -> None:
    mesh, fleet = shared.mesh, shared.fleet
    key = "cancel-slow"
    execution_id = mesh.start(
        "edge_checkout", {"key": key, "behaviour": {"reserve": {"sleep": 2.0}}}
    )
    until(lambda: _step_running(mesh, execution_id, "reserve"), 10, "reserve running")
    time.sleep(0.5)  # the reservation is under way on its instance
    cancel(mesh.address, execution_id, "the customer changed their mind")

    done = mesh.wait(execution_id, within=45)
    assert state_name(done) == "CANCELLED", done
    assert step_states(done) == {
        "charge": "COMPENSATED",
        "reserve": "COMPENSATED",
        "ship": "SKIPPED",
    }
    events = mesh.get(execution_id).events
    reserved_on = events_of(events, STARTED, "reserve")[0].instance_id
    assert reserved_on in INVENTORY
    cut_off = events_of(events, CANCELLED_STEP, "reserve")
    assert [e.instance_id for e in cut_off] == [reserved_on]
    # The instance said the reservation it went on with succeeded: then it is undone.
    resolved = events_of(events, RESOLVED, "reserve")
    assert [(e.step_state, e.instance_id) for e in resolved] == [
        (_E.STEP_STATE_SUCCEEDED, reserved_on)
    ], resolved
    assert not step(done, "reserve").outcome_unknown
    # Over both inventory instances: reserved once, released once; refunded once.
    assert fleet.operations("inventory", key) == ["release", "reserve"]
    assert fleet.operations("payment", key) == ["charge", "refund"]
    assert fleet.operations("shipping", key) == []


@SHARED
def test_a_step_timeout_shorter_than_the_work_joins_it_then_releases_it_once(
    shared: Plane,
) -> None:
    mesh, fleet = shared.mesh, shared.fleet
    key = "timeout-slow"
    execution_id = mesh.start(
        "edge_checkout_step_timeout", {"key": key, "behaviour": {"reserve": {"sleep": 2.0}}}
    )

    done = mesh.wait(execution_id, within=45)
    assert state_name(done) == "COMPENSATED", done
    assert done.failed_step == "reserve"
    assert done.error.code_name == "DEADLINE_EXCEEDED"
    assert step_states(done) == {
        "charge": "COMPENSATED",
        "reserve": "COMPENSATED",
        "ship": "SKIPPED",
    }
    reserve = step(done, "reserve")
    assert reserve.attempts == 2
    assert not reserve.at_least_once
    events = mesh.get(execution_id).events
    # The retry went back to the instance still working on the first attempt.
    started = events_of(events, STARTED, "reserve")
    assert [(e.attempt, e.at_least_once) for e in started] == [(1, False), (2, False)]
    assert started[0].instance_id == started[1].instance_id
    assert started[0].instance_id in INVENTORY
    resolved = events_of(events, RESOLVED, "reserve")
    assert [(e.step_state, e.instance_id) for e in resolved] == [
        (_E.STEP_STATE_SUCCEEDED, started[0].instance_id)
    ], resolved
    # Two attempts, one reservation (the retry joined the first call), one release.
    assert fleet.operations("inventory", key) == ["release", "reserve"]
    assert fleet.operations("payment", key) == ["charge", "refund"]
    assert fleet.operations("shipping", key) == []


@SHARED
@pytest.mark.timeout(150)
def test_ten_kill_9s_of_the_control_plane_during_a_slow_step_do_each_step_once(
    shared: Plane,
) -> None:
    mesh, fleet = shared.mesh, shared.fleet
    began = time.monotonic()
    served_by: list[str] = []
    for round_ in range(10):
        key = f"kill9-{round_}"
        execution_id = mesh.start(
            "edge_a_slow_c", {"key": key, "behaviour": {"reserve": {"sleep": 1.5}}}
        )
        until(partial(_step_running, mesh, execution_id, "slow"), 10, "slow running")
        time.sleep(0.2)  # the call is under way on its instance
        mesh.plane.kill()  # SIGKILL: the answer to that call is lost
        shared.restart()

        done = mesh.wait(execution_id, within=30)
        where = f"round {round_}"
        assert state_name(done) == "SUCCEEDED", (where, done)
        events = mesh.get(execution_id).events
        started = events_of(events, STARTED, "slow")
        resumed = events_of(events, RESUMED)
        assert len(resumed) == 1, where
        assert [e.attempt for e in started] == [1, 2], (where, started)
        assert started[0].index < resumed[0].index < started[1].index, where
        # Sent again to the instance that got it, same key: its cache joined or replayed.
        assert started[1].instance_id == started[0].instance_id, (where, started)
        assert not started[1].at_least_once, where
        assert not step(done, "slow").at_least_once, where
        succeeded = events_of(events, SUCCEEDED, "slow")
        assert [e.message for e in succeeded] == [REPLAYED], (where, succeeded)
        served_by.append(started[0].instance_id)
        assert fleet.operations("payment", key) == ["charge"], where
        assert fleet.operations("inventory", key) == ["reserve"], where
        assert fleet.operations("shipping", key) == ["ship"], where
    assert set(served_by) <= INVENTORY
    print(f"10 kill -9 rounds took {time.monotonic() - began:.1f} s; slow step on {served_by}")


def _start_replica(
    tmp: Path, etcd: EtcdServer, name: str, listen: str = "127.0.0.1:0"
) -> ServeProcess:
    return start_serve(
        tmp,
        "--listen",
        listen,
        "--store",
        etcd.url,
        "--node-name",
        name,
        "--health-check-interval",
        "0.5",
    )


@REPLICAS
@pytest.mark.timeout(200)
def test_five_kills_of_the_owning_replica_during_a_slow_step_do_each_step_once(
    tmp_path: Path,
) -> None:
    etcd = EtcdServer.start(tmp_path)
    replicas: dict[str, ServeProcess] = {}
    fleet = Fleet()
    try:
        for name in ("cp-a", "cp-b", "cp-c"):
            replicas[name] = _start_replica(tmp_path, etcd, name)
        addresses = ",".join(plane.address for plane in replicas.values())
        fleet = Fleet.start(tmp_path, addresses, SIDECARS)
        for plane in replicas.values():
            _wait_serving(plane.address, fleet)
        _put(replicas["cp-a"].address, A_SLOW_C)

        takeovers: list[float] = []
        for round_, owner in enumerate(("cp-a", "cp-b", "cp-c", "cp-a", "cp-b")):
            where = f"round {round_} (owner {owner})"
            key = f"takeover-{round_}"
            mesh = Mesh(tmp_path, replicas[owner], {})
            execution_id = mesh.start(
                "edge_a_slow_c", {"key": key, "behaviour": {"reserve": {"sleep": 1.5}}}
            )
            until(partial(_step_running, mesh, execution_id, "slow"), 10, where)
            assert mesh.get(execution_id).execution.owner == owner, where
            time.sleep(0.2)  # the call is under way on its instance
            killed_at = time.time()
            replicas[owner].kill()

            survivor = Mesh(tmp_path, next(p for n, p in replicas.items() if n != owner), {})
            done = survivor.wait(execution_id, within=40)
            assert state_name(done) == "SUCCEEDED", (where, done)
            assert done.owner != owner, where
            events = survivor.get(execution_id).events
            resumed = events_of(events, RESUMED)
            assert len(resumed) == 1, (where, resumed)
            takeover = resumed[0].time.ToNanoseconds() / 1e9 - killed_at
            takeovers.append(takeover)
            assert takeover < 15, f"{where}: taken over {takeover:.1f} s after the kill"
            started = events_of(events, STARTED, "slow")
            assert [e.attempt for e in started] == [1, 2], (where, started)
            assert started[1].instance_id == started[0].instance_id, (where, started)
            assert not started[1].at_least_once, where
            succeeded = events_of(events, SUCCEEDED, "slow")
            assert [e.message for e in succeeded] == [REPLAYED], (where, succeeded)
            assert fleet.operations("payment", key) == ["charge"], where
            assert fleet.operations("inventory", key) == ["reserve"], where
            assert fleet.operations("shipping", key) == ["ship"], where
            # The killed replica comes back on its port (the sidecars list it).
            replicas[owner] = _start_replica(tmp_path, etcd, owner, listen=replicas[owner].address)
        print("takeover after kill -9 of the owner, s:", [round(t, 2) for t in takeovers])
    finally:
        fleet.stop()
        for plane in replicas.values():
            if plane.proc.poll() is None:
                plane.kill()
        etcd.stop()


@LOST_INSTANCE
@pytest.mark.timeout(120)
def test_a_resend_goes_elsewhere_at_least_once_when_its_instance_is_gone(
    tmp_path: Path,
) -> None:
    # On etcd the dead sidecar's lease runs out while the control plane is down (a
    # SQLite store gives every lease one more TTL at start), and the restarted plane
    # resumes only once its dead predecessor's ownership lease is gone (about 8 s):
    # by then the instance that got the attempt is no longer registered.
    etcd = EtcdServer.start(tmp_path)
    args = ("--store", etcd.url, "--node-name", "solo", "--health-check-interval", "0.5")
    try:
        with _plane(tmp_path, args, LAPSING, A_SLOW_C) as plane:
            mesh, fleet = plane.mesh, plane.fleet
            key = "instance-gone"
            execution_id = mesh.start(
                "edge_a_slow_c", {"key": key, "behaviour": {"reserve": {"sleep": 2.0}}}
            )
            first, other = plane.lose_the_slow_step(execution_id)

            done = mesh.wait(execution_id, within=40)
            events = mesh.get(execution_id).events
            assert state_name(done) == "SUCCEEDED", _history(events)
            assert first not in healthy_instances(mesh.address, "inventory")
            slow = step(done, "slow")
            assert (slow.instance_id, slow.at_least_once) == (other, True), _history(events)
            started = events_of(events, STARTED, "slow")
            resumed = events_of(events, RESUMED)
            assert len(resumed) == 1
            assert [(e.attempt, e.instance_id, e.at_least_once) for e in started] == [
                (1, first, False),
                (2, other, True),
            ], _history(events)
            assert started[1].index > resumed[0].index
            # The other instance did the work (the dead one's ledger died with it).
            assert fleet.operations("inventory", key) == ["reserve"]
            assert fleet.operations("payment", key) == ["charge"]
            assert fleet.operations("shipping", key) == ["ship"]
    finally:
        etcd.stop()


@LOST_INSTANCE
@pytest.mark.timeout(120)
def test_a_resend_refused_by_its_dead_instance_then_sent_elsewhere_is_at_least_once(
    tmp_path: Path,
) -> None:
    # On SQLite a restarted plane gives the dead instance's lease one more TTL: the
    # resend goes to it (it is still registered), is refused (UNAVAILABLE: nobody
    # listens), and a later attempt goes to the other instance once health checks
    # took the dead one out. The first attempt's outcome was never learnt, so that
    # attempt may run the step a second time: it is at-least-once.
    with _plane(tmp_path, SQLITE, LAPSING, A_SLOW_C_PATIENT) as plane:
        mesh, fleet = plane.mesh, plane.fleet
        key = "dead-but-registered"
        execution_id = mesh.start(
            "edge_a_slow_c_patient", {"key": key, "behaviour": {"reserve": {"sleep": 2.0}}}
        )
        first, other = plane.lose_the_slow_step(execution_id)

        done = mesh.wait(execution_id, within=40)
        events = mesh.get(execution_id).events
        assert state_name(done) == "SUCCEEDED", _history(events)
        started = events_of(events, STARTED, "slow")
        assert (started[0].instance_id, started[1].instance_id) == (first, first)
        elsewhere = [e for e in started if e.instance_id != first]
        assert [e.instance_id for e in elsewhere] == [other], _history(events)
        assert fleet.operations("inventory", key) == ["reserve"]
        slow = step(done, "slow")
        assert slow.instance_id == other
        assert elsewhere[0].at_least_once, (
            "the attempt sent to another instance than the one whose answer was lost "
            "is not marked at_least_once:\n" + _history(events)
        )
        assert slow.at_least_once, _history(events)


@LOST_INSTANCE
@pytest.mark.timeout(120)
def test_a_step_whose_lost_attempt_cannot_be_resent_is_settled_and_compensated(
    tmp_path: Path,
) -> None:
    # The same dead-but-registered instance; the resend (the last attempt) is refused
    # and the step fails. Its first attempt was in flight when the plane died: the
    # instance may have applied it, so the step is settled like any lost answer
    # before compensating (the instance cannot say: its release runs anyway).
    with _plane(tmp_path, SQLITE, LAPSING, A_SLOW_C_UNDONE) as plane:
        mesh, fleet = plane.mesh, plane.fleet
        key = "lost-then-refused"
        execution_id = mesh.start(
            "edge_a_slow_c_undone", {"key": key, "behaviour": {"reserve": {"sleep": 2.0}}}
        )
        first, _ = plane.lose_the_slow_step(execution_id)

        done = mesh.wait(execution_id, within=60)
        events = mesh.get(execution_id).events
        started = events_of(events, STARTED, "slow")
        assert [(e.attempt, e.instance_id) for e in started] == [(1, first), (2, first)]
        assert state_name(done) == "COMPENSATED", _history(events)
        assert done.failed_step == "slow"
        assert step_states(done) == {
            "a": "COMPENSATED",
            "slow": "COMPENSATED",
            "c": "SKIPPED",
        }, _history(events)
        resolved = events_of(events, RESOLVED, "slow")
        assert [e.step_state for e in resolved] == [_E.STEP_STATE_COMPENSATING], _history(events)
        assert fleet.operations("payment", key) == ["charge", "refund"]
        assert fleet.operations("inventory", key) == ["release"]  # reserve died with it
