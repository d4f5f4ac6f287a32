"""Three real sidecars in a chain, A -> B -> C, on a real ``flext-mesh serve``.

``hop-a`` calls ``hop-b`` through its sidecar's mesh client, ``hop-b`` calls ``hop-c``
(``tests.sidecar.hops_app``). What a user of the first hop notices: a rejection at C
reaches them as C's own status, message and field violation, every operation runs
exactly once, the id they sent is the id every hop sees, and business rejections leave
A's and B's weights, breakers and ejection alone.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.errors import FailedPrecondition, FieldViolation, InvalidArgument
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.v1 import (
    metrics_pb2,
    metrics_pb2_grpc,
    processor_pb2,
    processor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from sidecar.client import MeshClient
from tests.conftest import ServeProcess, start_serve
from tests.sidecar.test_sidecar_process import SidecarProcess, start_sidecar

pytestmark = pytest.mark.xdist_group("hops")

HOPS = ("a", "b", "c")
BASE_WEIGHT = 100
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class Chain:
    """The control plane, the three sidecars and the files their processors log runs to."""

    plane: ServeProcess
    sidecars: dict[str, SidecarProcess]
    runs: dict[str, Path]

    def seen(self, hop: str) -> list[dict[str, Any]]:
        """Every run of a hop's processor so far, oldest first."""
        text = self.runs[hop].read_text() if self.runs[hop].exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    def counts(self) -> dict[str, int]:
        return {hop: len(self.seen(hop)) for hop in HOPS}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    tmp = tmp_path_factory.mktemp("hops")
    plane = start_serve(tmp, "--health-check-interval", "0.5")
    sidecars: dict[str, SidecarProcess] = {}
    runs = {hop: tmp / f"{hop}.runs" for hop in HOPS}
    try:
        for hop in HOPS:
            sidecars[hop] = start_sidecar(
                tmp,
                plane.address,
                "--service",
                f"hop-{hop}",
                "--instance-id",
                f"hop-{hop}-1",
                app=f"tests.sidecar.hops_app:HOP_{hop.upper()}",
                env={"HOPS_RUNS": str(runs[hop])},
            )
        chain = Chain(plane, sidecars, runs)
        # Each sidecar's client must know the next hop before the first call.
        _wait(lambda: all(_instances(plane.address, f"hop-{h}") for h in HOPS))
        yield chain
    finally:
        for sidecar in sidecars.values():
            sidecar.proc.send_signal(signal.SIGTERM)
        for sidecar in sidecars.values():
            try:
                sidecar.proc.wait(15)
            except Exception:
                sidecar.proc.kill()
        plane.kill()


@pytest.fixture
async def client(chain: Chain) -> AsyncIterator[MeshClient]:
    """A mesh client of the first caller (outside the mesh: it hosts nothing)."""
    mesh = MeshClient(chain.plane.address, caller_service="ux")
    await mesh.start()
    try:
        assert await mesh.wait_for_instances("hop-a", within=10)
        yield mesh
    finally:
        await mesh.aclose()


def _wait(check: Callable[[], bool], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def _instances(address: str, service: str) -> list[registry_pb2.ServiceInstance]:
    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        reply = stub.Discover(
            registry_pb2.DiscoverRequest(service_name=service, healthy_only=False), timeout=5
        )
    return list(reply.instances)


def _report(address: str, service: str) -> metrics_pb2.CallStats:
    with grpc.insecure_channel(address) as channel:
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        try:
            reply = stub.GetServiceReport(
                metrics_pb2.GetServiceReportRequest(service_name=service), timeout=5
            )
        except grpc.RpcError:
            return metrics_pb2.CallStats()
    return reply.report.summary


async def test_a_rejection_two_hops_away_reaches_the_caller_as_itself_once(
    chain: Chain, client: MeshClient
) -> None:
    before = chain.counts()
    with pytest.raises(InvalidArgument) as raised:
        await client.call(
            "hop-a", "a", {"mode": "raise", "amount": -5}, correlation_id="ux-cid-1", timeout=5
        )
    assert raised.value.message == "amount must be positive"
    assert raised.value.violations == (FieldViolation("amount", "must be > 0"),)
    assert chain.counts() == {hop: before[hop] + 1 for hop in HOPS}, "each hop ran once"

    # Returned (not raised) by C, handed on as a FlextResult by B: the same.
    with pytest.raises(FailedPrecondition) as returned:
        await client.call("hop-a", "a", {"mode": "return"}, correlation_id="ux-cid-2", timeout=5)
    assert returned.value.message == "card expired"
    assert chain.counts() == {hop: before[hop] + 2 for hop in HOPS}

    reply = await client.call("hop-a", "a", {"amount": 12.5}, timeout=5)
    assert reply == {"a": {"b": {"charged": 12.5}}}
    assert chain.counts() == {hop: before[hop] + 3 for hop in HOPS}

    # The first hop's processor read the caller's id (self.correlation_id) and the
    # served call's context, from a task it started as well.
    first = [run for run in chain.seen("a") if run["correlation_id"] in ("ux-cid-1", "ux-cid-2")]
    assert [run["correlation_id"] for run in first] == ["ux-cid-1", "ux-cid-2"]
    assert all(run["context_correlation_id"] == run["correlation_id"] for run in first)
    # The caller's 5 s, give or take gRPC's coarse clock on either side (a few ms).
    assert all(0 < run["deadline_left"] <= 5.05 for run in first), first


async def test_business_rejections_leave_weights_breakers_and_ejection_alone(
    chain: Chain, client: MeshClient
) -> None:
    address = chain.plane.address
    burst = 30
    for i in range(burst):
        mode = "raise" if i % 2 else "return"
        expected = InvalidArgument if mode == "raise" else FailedPrecondition
        # An open breaker in A's client (for B) or B's (for C) would answer UNAVAILABLE.
        with pytest.raises(expected):
            await client.call("hop-a", "a", {"mode": mode, "amount": -1}, timeout=5)

    # The control plane counted every run of every hop once (the runs files hold every
    # run since the sidecars started), none of them as a fault.
    made = chain.counts()
    assert min(made.values()) >= burst

    def counted() -> bool:
        return all(_report(address, f"hop-{hop}").total_calls >= made[hop] for hop in HOPS)

    _wait(counted)
    for hop in HOPS:
        report = _report(address, f"hop-{hop}")
        assert (report.total_calls, report.infrastructure_failures) == (made[hop], 0), hop

    # Control: a few real faults at C (fewer than the 5 in a row that eject) lower its
    # weight. Once that shows, the feedback that carried A's and B's rejections has
    # been applied too.
    with grpc.insecure_channel(chain.sidecars["c"].address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        for _ in range(3):
            request = processor_pb2.InvokeRequest(operation="c")
            request.payload.update({"mode": "crash"})
            with pytest.raises(grpc.RpcError) as fault:
                stub.Invoke(request, timeout=5)
            assert fault.value.code() is grpc.StatusCode.INTERNAL

    _wait(
        lambda: _instances(address, "hop-c")[0].effective_weight < BASE_WEIGHT * 0.95,
        within=25,
    )
    for hop in ("a", "b"):
        (instance,) = _instances(address, f"hop-{hop}")
        assert instance.health == registry_pb2.HEALTH_STATUS_SERVING
        assert not instance.ejected
        assert instance.effective_weight == BASE_WEIGHT, f"hop-{hop}: {instance}"


def test_one_correlation_id_and_the_trace_headers_end_to_end(chain: Chain) -> None:
    with grpc.insecure_channel(chain.sidecars["a"].address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        request = processor_pb2.InvokeRequest(operation="a", correlation_id="ux-e2e-1")
        request.payload.update({"mode": "raise", "amount": -1})
        with pytest.raises(grpc.RpcError) as raised:
            stub.Invoke(
                request,
                timeout=4,
                metadata=(("traceparent", TRACEPARENT), ("tracestate", "ux=1")),
            )
    error = from_rpc_error(raised.value)
    assert isinstance(error, InvalidArgument)
    for hop in HOPS:
        runs = [run for run in chain.seen(hop) if run["correlation_id"] == "ux-e2e-1"]
        assert len(runs) == 1, f"hop {hop} saw the caller's id {len(runs)} times"
        (run,) = runs
        assert run["context_correlation_id"] == "ux-e2e-1"
        assert (run["traceparent"], run["tracestate"]) == (TRACEPARENT, "ux=1")
        assert 0 < run["deadline_left"] <= 4.05, "the inbound deadline travels too"
