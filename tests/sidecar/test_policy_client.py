"""The mesh client applies the traffic policy the control plane pushes (issue 11).

Most tests feed Watch messages straight to the client (what its watch loop does with
each message) and call real ProcessorService servers in this process; one breaks a
real Watch stream, and one runs against a real control plane.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from pydantic import BaseModel

from flext_mesh import FlextResult, ServiceProcessor
from flext_mesh.errors import DeadlineExceeded, MeshError
from flext_mesh.hosting import ProcessorServicer
from flext_mesh.hosting.reporter import CallReporter
from flext_mesh.hosting.servicer import CallOutcome, add_processor_servicer
from flext_mesh.server import create_server
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from sidecar.breaker import BreakerSettings, BreakerState, CircuitBreaker
from sidecar.client import BreakersOpen, ClientSettings, MeshClient
from tests.registry.conftest import fast_config
from tests.sidecar.apps import PROCESSORS

SERVICE = "payment"
CHARGE = {"customer_id": "c", "amount": 1}
SERVING = registry_pb2.HEALTH_STATUS_SERVING
NOT_SERVING = registry_pb2.HEALTH_STATUS_NOT_SERVING
#: Breakers that never trip, for tests about something else.
NEVER_TRIP = BreakerSettings(
    consecutive_failures=1000, sliding_window_size=1000, minimum_calls=1000
)
_revisions = itertools.count(1)


class FailRequest(BaseModel):
    """Which status code to fail with."""

    code: str


class FailService(ServiceProcessor[FailRequest, None, dict[str, Any]]):
    """Always fail with the requested status code."""

    async def process(self, request: FailRequest) -> FlextResult[None]:
        return FlextResult[None].fail("failing on purpose", code=request.code)

    def build(self, domain: None, *, correlation_id: str) -> dict[str, Any]:
        return {}


@dataclass
class Backend:
    """One instance of the service: a ProcessorService server in this process."""

    instance: registry_pb2.ServiceInstance
    server: grpc.aio.Server
    servicer: ProcessorServicer


@dataclass
class Fleet:
    """Instances of ``payment`` served in this process, and which one served each call."""

    backends: dict[str, Backend] = field(default_factory=dict)
    served: list[str] = field(default_factory=list)
    clients: list[MeshClient] = field(default_factory=list)

    async def start(self, instance_id: str, *, version: str = "", zone: str = "") -> Backend:
        """Serve a new instance on 127.0.0.1 and a free port."""
        servicer = ProcessorServicer(
            {**PROCESSORS, "fail": FailService()},
            service_name=SERVICE,
            instance_id=instance_id,
            version=version,
            on_call=lambda outcome: self._served(instance_id, outcome),
        )
        server = grpc.aio.server()
        add_processor_servicer(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        instance = registry_pb2.ServiceInstance(
            service_name=SERVICE,
            instance_id=instance_id,
            endpoint=f"127.0.0.1:{port}",
            version=version,
            zone=zone,
            weight=100,
            health=SERVING,
            effective_weight=100.0,
            uptime_percentage=100.0,
        )
        self.backends[instance_id] = Backend(instance, server, servicer)
        return self.backends[instance_id]

    def _served(self, instance_id: str, outcome: CallOutcome) -> None:
        self.served.append(instance_id)

    def client(self, **kwargs: Any) -> MeshClient:
        """A client that is not started: its tests feed it Watch messages themselves."""
        client = MeshClient("127.0.0.1:1", **kwargs)
        self.clients.append(client)
        return client

    def snapshot(
        self, policies: Iterable[registry_pb2.ServicePolicy] = ()
    ) -> registry_pb2.WatchResponse:
        """The first Watch message: every instance started so far, and ``policies``."""
        return registry_pb2.WatchResponse(
            snapshot=registry_pb2.WatchSnapshot(
                instances=[b.instance for b in self.backends.values()], policies=policies
            ),
            revision=next(_revisions),
        )

    def versions(self) -> list[str]:
        """Version of the instance that served each call, in order."""
        return [self.backends[i].instance.version for i in self.served]

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
        for backend in self.backends.values():
            await backend.server.stop(0)
            backend.servicer.close()


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    result = Fleet()
    try:
        yield result
    finally:
        await result.aclose()


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


_policy_versions = itertools.count(1)


def policy(
    *,
    service: str = SERVICE,
    default_timeout: float | None = None,
    operation_timeouts: Mapping[str, float] | None = None,
    splits: Mapping[str, int] | None = None,
    **fields: Any,
) -> registry_pb2.ServicePolicy:
    """A ServicePolicy as the control plane pushes it; durations in seconds."""
    result = registry_pb2.ServicePolicy(
        service_name=service, version=next(_policy_versions), **fields
    )
    if default_timeout is not None:
        result.default_timeout.CopyFrom(_duration(default_timeout))
    for operation, seconds in (operation_timeouts or {}).items():
        result.operation_timeouts[operation].CopyFrom(_duration(seconds))
    for version, weight in (splits or {}).items():
        result.splits.add(version=version, weight=weight)
    return result


def put(new: registry_pb2.ServicePolicy) -> registry_pb2.WatchResponse:
    """A POLICY_PUT event."""
    revision = next(_revisions)
    return registry_pb2.WatchResponse(
        events=[
            registry_pb2.WatchEvent(
                revision=revision,
                type=registry_pb2.WATCH_EVENT_TYPE_POLICY_PUT,
                service_name=new.service_name,
                policy=new,
            )
        ],
        revision=revision,
    )


def deleted(service: str = SERVICE) -> registry_pb2.WatchResponse:
    """A POLICY_DELETED event."""
    revision = next(_revisions)
    return registry_pb2.WatchResponse(
        events=[
            registry_pb2.WatchEvent(
                revision=revision,
                type=registry_pb2.WATCH_EVENT_TYPE_POLICY_DELETED,
                service_name=service,
            )
        ],
        revision=revision,
    )


def health_changed(backend: Backend, **changes: Any) -> registry_pb2.WatchResponse:
    """A HEALTH_CHANGED event setting ``changes`` (health, ejected) on the instance."""
    instance = registry_pb2.ServiceInstance()
    instance.CopyFrom(backend.instance)
    for name, value in changes.items():
        setattr(instance, name, value)
    revision = next(_revisions)
    return registry_pb2.WatchResponse(
        events=[
            registry_pb2.WatchEvent(
                revision=revision,
                type=registry_pb2.WATCH_EVENT_TYPE_HEALTH_CHANGED,
                service_name=instance.service_name,
                instance=instance,
            )
        ],
        revision=revision,
    )


async def charges(client: MeshClient, count: int) -> None:
    """Make ``count`` successful charges, one after another."""
    for _ in range(count):
        assert (await client.call(SERVICE, "charge", CHARGE))["charged"] == 1


# -- deadlines -------------------------------------------------------------------------


async def test_the_deadline_is_the_calls_then_the_policys_then_the_settings(
    fleet: Fleet,
) -> None:
    await fleet.start("a")
    client = fleet.client(settings=ClientSettings(default_timeout=0.1))
    client._apply(fleet.snapshot())

    async def outcome(**kwargs: Any) -> str:
        try:
            await client.call(SERVICE, "slow", {"seconds": 0.4}, **kwargs)
        except DeadlineExceeded:
            return "deadline"
        return "done"

    assert await outcome() == "deadline", "the settings' 0.1 s"
    client._apply(put(policy(default_timeout=2.0)))
    assert await outcome() == "done", "the policy's default beats the settings"
    client._apply(put(policy(default_timeout=2.0, operation_timeouts={"slow": 0.1, "charge": 3.0})))
    assert await outcome() == "deadline", "the operation's timeout beats the policy's default"
    assert await outcome(timeout=2.0) == "done", "the call's timeout beats the policy"
    client._apply(put(policy(default_timeout=0.1, operation_timeouts={"slow": 2.0})))
    assert await outcome() == "done"
    client._apply(deleted())
    assert client.policy(SERVICE) is None
    assert await outcome() == "deadline", "a deleted policy reverts to the settings"


# -- version split ---------------------------------------------------------------------


async def test_a_90_10_split_sends_exactly_9_of_10_calls_to_the_first_version(
    fleet: Fleet,
) -> None:
    await fleet.start("a", version="v1")
    await fleet.start("b", version="v1")
    await fleet.start("c", version="v2")
    client = fleet.client()
    client._apply(fleet.snapshot([policy(splits={"v1": 90, "v2": 10})]))
    assert client.policy(SERVICE) is not None

    await charges(client, 100)
    versions = fleet.versions()
    assert versions.count("v2") == 10
    assert all(versions[k : k + 10].count("v2") == 1 for k in range(0, 100, 10)), (
        "interleaved: one v2 call in every 10, not 10 in a row"
    )
    assert fleet.served.count("a") == fleet.served.count("b") == 45, "v1's share is balanced"

    fleet.served.clear()
    for _ in range(40):  # 2,000 calls, 50 at a time
        await asyncio.gather(*(client.call(SERVICE, "charge", CHARGE) for _ in range(50)))
    share = fleet.versions().count("v2") / len(fleet.served) * 100
    assert len(fleet.served) == 2000
    assert 7 <= share <= 13
    assert not client.split_fallbacks


async def test_a_version_without_a_healthy_instance_falls_back_to_the_others(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    await fleet.start("a", version="v1")
    c = await fleet.start("c", version="v2")
    client = fleet.client()
    client._apply(fleet.snapshot([policy(splits={"v1": 90, "v2": 10})]))
    caplog.set_level(logging.INFO, logger="flext_sidecar.client")

    def warnings() -> int:
        return sum(
            r.levelno == logging.WARNING and "falls back" in r.message for r in caplog.records
        )

    client._apply(health_changed(c, health=NOT_SERVING))
    await charges(client, 100)
    assert set(fleet.served) == {"a"}
    assert client.split_fallbacks[(SERVICE, "v2")] == 10
    assert warnings() == 1, "logged once, not once per call"

    fleet.served.clear()
    client._apply(health_changed(c, health=SERVING))
    await charges(client, 100)
    assert fleet.served.count("c") == 10
    assert client.split_fallbacks[(SERVICE, "v2")] == 10
    assert any("callable again" in r.message for r in caplog.records)

    fleet.served.clear()
    client._apply(health_changed(c, ejected=True))
    await charges(client, 100)
    assert set(fleet.served) == {"a"}
    assert client.split_fallbacks[(SERVICE, "v2")] == 20
    assert warnings() == 2, "a new fallback is logged again"


async def test_a_dead_version_loses_no_call_and_falls_back_once_its_breaker_opens(
    fleet: Fleet,
) -> None:
    await fleet.start("a", version="v1")
    c = await fleet.start("c", version="v2")
    await c.server.stop(0)  # still registered and healthy: the registry has not noticed
    client = fleet.client(settings=ClientSettings(initial_backoff=0.001, max_backoff=0.002))
    client._apply(fleet.snapshot([policy(splits={"v1": 90, "v2": 10})]))

    await charges(client, 100)  # every v2 call is retried on v1
    assert fleet.served == ["a"] * 100
    assert client.breaker_state(SERVICE, "c") == "OPEN"
    # The first four v2 calls failed on c and were retried on v1 while c was still
    # callable: not a fallback. The fifth failure opened c's breaker, so that call's
    # retry and the last five v2 calls fell back.
    assert client.split_fallbacks[(SERVICE, "v2")] == 6


# -- zone preference -------------------------------------------------------------------


async def test_calls_stay_in_the_callers_zone_until_too_few_of_its_instances_are_healthy(
    fleet: Fleet,
) -> None:
    for name in "abc":
        await fleet.start(name, zone="z1")
    for name in "de":
        await fleet.start(name, zone="z2")
    client = fleet.client(zone="z1")
    prefer_zone = policy()
    prefer_zone.zone.enabled = True
    client._apply(fleet.snapshot([prefer_zone]))

    await charges(client, 60)
    assert set(fleet.served) == {"a", "b", "c"}
    assert not client.zone_spillovers

    fleet.served.clear()
    client._apply(health_changed(fleet.backends["c"], health=NOT_SERVING))  # 2/3 < 70%
    await charges(client, 60)
    assert set(fleet.served) == {"a", "b", "d", "e"}
    assert client.zone_spillovers[SERVICE] == 60

    fleet.served.clear()
    lower = policy()
    lower.zone.enabled = True
    lower.zone.min_healthy_percent = 60  # 2/3 >= 60%
    client._apply(put(lower))
    await charges(client, 60)
    assert set(fleet.served) == {"a", "b"}
    assert client.zone_spillovers[SERVICE] == 60

    fleet.served.clear()
    client._apply(put(policy()))  # zone preference off
    await charges(client, 60)
    assert set(fleet.served) == {"a", "b", "d", "e"}
    assert client.zone_spillovers[SERVICE] == 60, "no preference is no spill-over"


async def test_without_a_caller_zone_the_zone_preference_does_nothing(fleet: Fleet) -> None:
    await fleet.start("a", zone="z1")
    await fleet.start("b", zone="z2")
    client = fleet.client()
    prefer_zone = policy()
    prefer_zone.zone.enabled = True
    client._apply(fleet.snapshot([prefer_zone]))
    await charges(client, 20)
    assert fleet.served.count("a") == fleet.served.count("b") == 10
    assert not client.zone_spillovers


async def test_the_zone_preference_applies_among_the_split_versions_instances(
    fleet: Fleet,
) -> None:
    await fleet.start("v1-z1", version="v1", zone="z1")
    await fleet.start("v1-z2", version="v1", zone="z2")
    await fleet.start("v2-z2", version="v2", zone="z2")
    client = fleet.client(zone="z1")
    both = policy(splits={"v1": 50, "v2": 50})
    both.zone.enabled = True
    client._apply(fleet.snapshot([both]))
    await charges(client, 20)
    # v1's calls stay in z1; v2 has no instance in z1, so its calls spill over.
    assert fleet.served.count("v1-z1") == fleet.served.count("v2-z2") == 10
    assert client.zone_spillovers[SERVICE] == 10


# -- retries, breakers, strategy -------------------------------------------------------


class _Attempts(CallReporter):
    """Counts the Invoke attempts a client makes (never started: sends nothing).

    Counted on the client: a server reports a failed call after its status is sent.
    """

    def __init__(self) -> None:
        super().__init__(lambda: grpc.aio.insecure_channel("127.0.0.1:1"), reporter_id="test")
        self.count = 0

    def record_call(self, *args: Any, **kwargs: Any) -> None:
        self.count += 1


async def test_retries_follow_the_pushed_retryable_codes(fleet: Fleet) -> None:
    await fleet.start("a")
    made = _Attempts()
    client = fleet.client(
        settings=ClientSettings(initial_backoff=0.001, max_backoff=0.002, breaker=NEVER_TRIP),
        reporter=made,
    )
    client._apply(fleet.snapshot())

    async def attempts(code: str) -> int:
        before = made.count
        with pytest.raises(MeshError):
            await client.call(SERVICE, "fail", {"code": code})
        return made.count - before

    assert await attempts("ABORTED") == 1, "not retried by default"
    assert await attempts("UNAVAILABLE") == 3, "the settings' 3 attempts"
    assert await attempts("RESOURCE_EXHAUSTED") == 3

    fast = registry_pb2.ServicePolicy().retry
    fast.initial_backoff.CopyFrom(_duration(0.001))
    with_aborted = policy()
    with_aborted.retry.CopyFrom(fast)
    with_aborted.retry.max_attempts = 4
    with_aborted.retry.retryable_codes.extend(["UNAVAILABLE", "ABORTED"])
    client._apply(put(with_aborted))
    assert await attempts("ABORTED") == 4
    assert await attempts("UNAVAILABLE") == 4
    assert await attempts("FAILED_PRECONDITION") == 1, "business rejections are never retried"

    without_unavailable = policy()
    without_unavailable.retry.CopyFrom(fast)
    without_unavailable.retry.retryable_codes.append("DEADLINE_EXCEEDED")
    client._apply(put(without_unavailable))
    assert await attempts("UNAVAILABLE") == 1
    assert await attempts("ABORTED") == 1

    defaults = policy()
    defaults.retry.CopyFrom(fast)
    defaults.retry.max_attempts = 2
    client._apply(put(defaults))
    assert await attempts("UNAVAILABLE") == 2, "the default codes, the policy's attempts"
    assert await attempts("ABORTED") == 1

    client._apply(deleted())
    assert await attempts("UNAVAILABLE") == 3, "back to the settings"


async def test_breakers_follow_the_pushed_settings_and_keep_their_state(fleet: Fleet) -> None:
    await fleet.start("a")
    client = fleet.client(settings=ClientSettings(max_attempts=1))
    client._apply(fleet.snapshot())
    with pytest.raises(MeshError):
        await client.call(SERVICE, "fail", {"code": "UNAVAILABLE"})
    assert client.breaker_state(SERVICE, "a") == "CLOSED", "1 failure of the settings' 5"

    strict = policy()
    strict.circuit_breaker.consecutive_failures = 2
    strict.circuit_breaker.open_duration.CopyFrom(_duration(0.2))
    client._apply(put(strict))
    with pytest.raises(MeshError):
        await client.call(SERVICE, "fail", {"code": "UNAVAILABLE"})
    assert client.breaker_state(SERVICE, "a") == "OPEN", "the earlier failure still counts"
    with pytest.raises(BreakersOpen):
        await client.call(SERVICE, "charge", CHARGE)

    client._apply(deleted())
    assert client.breaker_state(SERVICE, "a") == "OPEN", "a policy change does not close it"
    await asyncio.sleep(0.25)
    assert client.breaker_state(SERVICE, "a") == "HALF_OPEN", "its open period ends as due"
    await charges(client, 3)
    assert client.breaker_state(SERVICE, "a") == "CLOSED"


def test_a_half_open_breaker_with_enough_trial_successes_closes_when_reconfigured() -> None:
    now = [0.0]
    breaker = CircuitBreaker(
        BreakerSettings(consecutive_failures=1, open_duration=1.0), clock=lambda: now[0]
    )
    permit = breaker.acquire()
    assert permit is not None
    permit.failure()
    now[0] = 1.0
    for _ in range(2):
        trial = breaker.acquire()
        assert trial is not None
        trial.success()
    assert breaker.state is BreakerState.HALF_OPEN, "2 of the 3 trial successes needed"
    breaker.reconfigure(BreakerSettings(consecutive_failures=1, half_open_max_calls=2))
    assert breaker.state is BreakerState.CLOSED


async def test_the_pushed_strategy_picks_the_instances(fleet: Fleet) -> None:
    slow = await fleet.start("slow")
    fast = await fleet.start("fast")
    slow.instance.response_time_ms = 50.0
    fast.instance.response_time_ms = 5.0
    client = fleet.client()
    client._apply(fleet.snapshot())
    await charges(client, 20)
    assert fleet.served.count("slow") == fleet.served.count("fast") == 10

    fleet.served.clear()
    client._apply(put(policy(strategy=registry_pb2.LOAD_BALANCING_STRATEGY_LEAST_RESPONSE_TIME)))
    await charges(client, 20)
    assert set(fleet.served) == {"fast"}


# -- policy life cycle -----------------------------------------------------------------


async def test_a_snapshot_replaces_every_policy(fleet: Fleet) -> None:
    client = fleet.client()
    client._apply(
        fleet.snapshot([policy(default_timeout=1.0), policy(service="ledger", default_timeout=2.0)])
    )
    assert client.policy(SERVICE) is not None
    client._apply(fleet.snapshot([policy(service="ledger", default_timeout=3.0)]))
    assert client.policy(SERVICE) is None
    ledger = client.policy("ledger")
    assert ledger is not None
    assert ledger.default_timeout.ToNanoseconds() == 3_000_000_000


async def test_an_invalid_policy_is_ignored_and_the_previous_one_stays(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    await fleet.start("a", version="v1")
    await fleet.start("c", version="v2")
    client = fleet.client()
    good = policy(splits={"v2": 100})
    client._apply(fleet.snapshot([good]))
    bad = policy(splits={"v1": 100})
    bad.retry.retryable_codes.append("INVALID_ARGUMENT")
    client._apply(put(bad))
    assert client.policy(SERVICE) == good
    assert any("ignored" in r.message and r.levelno == logging.ERROR for r in caplog.records)
    await charges(client, 10)
    assert set(fleet.served) == {"c"}


class _OneSnapshotRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """A registry whose Watch sends one snapshot, then holds the stream open."""

    def __init__(self, first: registry_pb2.WatchResponse) -> None:
        self.first = first

    async def Watch(
        self, request: registry_pb2.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[registry_pb2.WatchResponse]:
        yield self.first
        await asyncio.Event().wait()


async def test_the_last_policy_stays_when_the_watch_breaks(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    await fleet.start("a", version="v1")
    await fleet.start("c", version="v2")
    registry = grpc.aio.server()
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(
        _OneSnapshotRegistry(fleet.snapshot([policy(splits={"v1": 0, "v2": 100})])), registry
    )
    port = registry.add_insecure_port("127.0.0.1:0")
    await registry.start()
    client = MeshClient(f"127.0.0.1:{port}")
    fleet.clients.append(client)
    try:
        await client.start()
        assert client.policy(SERVICE) is not None
        await registry.stop(0)  # the control plane goes away
        for _ in range(100):
            if any("registry watch broke" in r.message for r in caplog.records):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the watch did not break")
        assert client.policy(SERVICE) is not None
        await charges(client, 10)
        assert set(fleet.served) == {"c"}, "the split still applies"
    finally:
        await registry.stop(0)


# -- against a real control plane ------------------------------------------------------


async def test_a_policy_put_on_the_control_plane_reaches_the_client(
    fleet: Fleet, tmp_path: Path
) -> None:
    plane, port = await create_server(fast_config(tmp_path))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    client = MeshClient(f"127.0.0.1:{port}")
    fleet.clients.append(client)
    try:
        for name, version in (("a", "v1"), ("c", "v2")):
            backend = await fleet.start(name, version=version)
            request = registry_pb2.RegisterRequest(
                instance=registry_pb2.ServiceInstance(
                    service_name=SERVICE,
                    instance_id=name,
                    endpoint=backend.instance.endpoint,
                    version=version,
                    health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
                )
            )
            request.ttl.FromSeconds(600)
            await stub.Register(request)
        await client.start()
        assert await client.wait_for_instances(SERVICE, 2)

        await stub.PutServicePolicy(
            registry_pb2.PutServicePolicyRequest(policy=policy(splits={"v1": 90, "v2": 10}))
        )
        for _ in range(250):
            if client.policy(SERVICE) is not None:
                break
            await asyncio.sleep(0.02)
        pushed = client.policy(SERVICE)
        assert pushed is not None
        assert pushed.version >= 1
        await charges(client, 100)
        assert fleet.versions().count("v2") == 10

        await stub.DeleteServicePolicy(
            registry_pb2.DeleteServicePolicyRequest(service_name=SERVICE)
        )
        for _ in range(250):
            if client.policy(SERVICE) is None:
                break
            await asyncio.sleep(0.02)
        assert client.policy(SERVICE) is None
        fleet.served.clear()
        await charges(client, 100)
        assert 40 <= fleet.versions().count("v2") <= 60, "no split: weighted round robin"
    finally:
        await channel.close()
        await plane.stop(0.2)
