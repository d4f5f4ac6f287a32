"""Fuzz every RPC of the control plane (and a real ProcessorServicer) over gRPC.

Requests are random but well typed: strategies are derived from the message
descriptors (any unicode, empty and > 64 KiB strings, integers at their type's bounds,
NaN/inf/-0.0, unknown enum numbers, long repeated fields, maps, Struct values, Durations
and Timestamps at and past their extremes), with field-name hints (valid service names,
endpoints, lease and execution ids the server handed out) so that many requests get
past validation. The property: every answer is OK or a deliberate error status, never
INTERNAL, UNKNOWN or a hang (5 s deadline per call); after each batch the server still
answers its health check SERVING and its listings agree with each other.

One control plane serves the whole module (a module-scoped event loop). The example
counts are small so that CI stays fast and reproducible (``derandomize=True``); raise
them for a longer local run with ``FUZZ_EXAMPLES``, e.g.
``FUZZ_EXAMPLES=200 .venv/bin/pytest tests/fuzz``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pydantic
import pytest
import pytest_asyncio
from google.protobuf import descriptor, duration_pb2, message_factory, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flext_mesh import FlextResult, ServiceProcessor
from flext_mesh.hosting import ProcessorServicer
from flext_mesh.hosting.servicer import add_processor_servicer
from flext_mesh.server import ControlPlane, create_server
from flext_mesh.v1 import (
    common_pb2,
    metrics_pb2,
    orchestrator_pb2,
    processor_pb2,
    registry_pb2,
)
from tests.registry.conftest import fast_config

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.xdist_group("fuzz")]

FD = descriptor.FieldDescriptor
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
CALL_TIMEOUT = 5.0
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.function_scoped_fixture,
    ],
)

# Statuses that always mean a bug: the server failed rather than answered. A unary RPC
# of the control plane never waits for anything slow, so a DEADLINE_EXCEEDED is a hang.
BUG_CODES = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
# UNAVAILABLE from a local control plane means it is down, except where an RPC reaches
# out to instances (PutServicePolicy asks them for their operations).
UNAVAILABLE_OK = {"PutServicePolicy"}

SERVICES = {
    "RegistryService": registry_pb2.DESCRIPTOR.services_by_name["RegistryService"],
    "MetricsService": metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"],
    "OrchestratorService": orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"],
    "ProcessorService": processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"],
}
METHODS: dict[str, descriptor.MethodDescriptor] = {
    f"{service}.{method.name}": method
    for service, desc in SERVICES.items()
    for method in desc.methods
}
UNARY = sorted(
    name for name, m in METHODS.items() if not m.client_streaming and not m.server_streaming
)
STREAMING = sorted(set(METHODS) - set(UNARY))


# -- values the server handed out, reused in later requests -----------------------------

POOL: dict[str, list[str]] = {
    "lease_id": [],
    "execution_id": [],
    "next_page_token": [],
    "instance_id": [],
    "endpoint": ["127.0.0.1:1", "localhost:2", "[::1]:3"],
}
_POOL_CAP = 64


def remember(key: str, value: str) -> None:
    """Keep ``value`` (handed out by the server) for later requests."""
    values = POOL.setdefault(key, [])
    if value and value not in values:
        values.append(value)
        del values[:-_POOL_CAP]


def harvest(reply: Message) -> None:
    """Remember ids and tokens found anywhere in a reply (Structs are not walked)."""
    for fd, value in reply.ListFields():
        if fd.type == FD.TYPE_STRING and fd.name in POOL:
            for item in value if fd.is_repeated else [value]:
                remember(fd.name, item)
        elif fd.type == FD.TYPE_MESSAGE and not fd.message_type.full_name.startswith("google."):
            if fd.message_type.GetOptions().map_entry:
                continue
            for item in value if fd.is_repeated else [value]:
                harvest(item)


def pooled(key: str) -> st.SearchStrategy[str]:
    """One of the values the server handed out for ``key`` (empty before any)."""

    def pick(i: int) -> str:
        values = POOL.get(key) or [""]
        return values[i % len(values)]

    return st.integers(0, 1 << 16).map(pick)


# -- strategies ----------------------------------------------------------------------------


def weighted(*pairs: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Pick a branch with the given relative weights (shrinking goes to the first)."""
    branches: list[st.SearchStrategy[Any]] = []
    for weight, strategy in pairs:
        branches += [strategy] * weight
    return st.one_of(branches)


TEXT = st.text(st.characters(codec="utf-8"), max_size=70)
HUGE_TEXT = st.tuples(st.characters(codec="utf-8"), st.integers(65_537, 300_000)).map(
    lambda t: t[0] * t[1]
)
NAMES = [
    "svc-a",
    "svc-b",
    "fuzz-proc",
    "wf.one",
    "step_1",
    "step-2",
    "echo",
    "echo_async",
    "typed",
    "a",
    "A" * 63,
    "B" * 64,
    "-bad",
    "bad name",
]
STATUS_NAMES = [code.name for code in grpc.StatusCode] + ["NOPE", "unavailable"]
REFERENCES = [
    "${input}",
    "${input.a.b}",
    "${steps.step_1.output}",
    "${steps.step-2.output.a}",
    "${steps.nope.output}",
    "${execution.id}",
    "${execution.correlation_id}",
    "x ${input.key} y",
    "${input",
    "${}",
    "$${input}",
]
NAME_FIELDS = {
    "service_name",
    "service",
    "name",
    "operation",
    "workflow_name",
    "depends_on",
    "step_name",
    "type",
    "zone",
    "version",
    "caller_service",
    "service_names",
    "reporter_id",
    "capabilities",
}
POOLED_FIELDS = {"lease_id": "lease_id", "lease_ids": "lease_id", "execution_id": "execution_id"}
POOLED_FIELDS |= {"page_token": "next_page_token", "instance_id": "instance_id"}


def strings(name: str) -> st.SearchStrategy[str]:
    """Strings for a field called ``name``: random, empty, huge, or plausible."""
    hint: st.SearchStrategy[str] = st.just("")
    if name in NAME_FIELDS:
        hint = st.sampled_from(NAMES)
    if name in POOLED_FIELDS:
        hint = pooled(POOLED_FIELDS[name]) | st.sampled_from(NAMES)
    if name == "endpoint":
        hint = pooled("endpoint") | st.sampled_from(
            ["127.0.0.1:0", "127.0.0.1:65536", "no-port", "[::1", "https://x.example:443"]
        )
    if name == "retryable_codes":
        hint = st.sampled_from(STATUS_NAMES)
    return weighted((6, hint), (3, TEXT), (1, st.just("")), (1, TEXT.map(lambda s: s * 40)))


def with_huge(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Now and then a string over 64 KiB instead."""
    return weighted((30, strategy), (1, HUGE_TEXT))


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Integers in [lo, hi], biased to small values and the bounds."""
    special = sorted({max(lo, min(hi, v)) for v in (0, 1, -1, 2, 3, 10, 100, 1000, lo, hi)})
    return weighted(
        (3, st.sampled_from(special)),
        (3, st.integers(max(lo, -5), min(hi, 1200))),
        (2, st.integers(lo, hi)),
    )


INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
DOUBLES = weighted(
    (2, st.sampled_from([0.0, -0.0, 1.0, 0.5, 100.0, float("nan"), float("inf"), -float("inf")])),
    (2, st.floats(-1e4, 1e4)),
    (1, st.floats()),
)

JSON_KEYS = st.sampled_from(["key", "item", "quantity", "note", "a", "b", "behaviour", ""]) | TEXT
JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    DOUBLES,
    st.integers(-(2**60), 2**60).map(float),
    st.sampled_from(REFERENCES),
    TEXT,
)


def nest(value: Any, depth: int, keys: str) -> Any:
    """``value`` wrapped ``depth`` times, alternating dicts and lists per ``keys``."""
    for i in range(depth):
        value = {"a": value} if keys[i % len(keys)] == "d" else [value]
    return value


JSON = st.recursive(
    JSON_LEAVES,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(JSON_KEYS, kids, max_size=4),
    max_leaves=12,
)
# Nesting stays below protobuf's decode depth limit (100 messages) here: deeper Structs
# get a test of their own (test_deeply_nested_structs_are_refused_cleanly).
JSON_OBJECTS = weighted(
    (8, st.dictionaries(JSON_KEYS, JSON, max_size=5)),
    (
        2,
        st.tuples(JSON, st.integers(1, 20), st.sampled_from(["d", "dl"])).map(
            lambda t: {"a": nest(*t)}
        ),
    ),
    (1, st.integers(1000, 20_000).map(lambda n: {f"k{i}": float(i) for i in range(n)})),
    (1, st.integers(1000, 20_000).map(lambda n: {"list": [None, True, "x", 1.5] * (n // 4)})),
    (1, HUGE_TEXT.map(lambda s: {"text": s})),
)


def to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def to_value(data: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    if data is None:
        value.null_value = struct_pb2.NULL_VALUE
    else:
        value.struct_value.update({"v": data})
        value.CopyFrom(value.struct_value.fields["v"])
    return value


SECONDS = [
    0,
    1,
    -1,
    10,
    3600,
    315_576_000_000,
    -315_576_000_000,
    315_576_000_001,
    253_402_300_799,
    253_402_300_800,
    -62_135_596_800,
    -62_135_596_801,
    2**63 - 1,
    -(2**63),
]
NANOS = [0, 1, 999_999_999, -999_999_999, 1_000_000_000, -1, 2**31 - 1, -(2**31)]


def time_parts() -> st.SearchStrategy[tuple[int, int]]:
    sane = st.tuples(st.integers(0, 7200), st.integers(0, 999_999_999))
    extreme = st.tuples(
        st.sampled_from(SECONDS) | st.integers(-(2**63), 2**63 - 1),
        st.sampled_from(NANOS) | st.integers(-(2**31), 2**31 - 1),
    )
    return weighted((3, sane), (1, extreme))


SPECIAL: dict[str, st.SearchStrategy[Message]] = {
    "google.protobuf.Struct": JSON_OBJECTS.map(to_struct),
    "google.protobuf.Value": JSON.map(to_value),
    "google.protobuf.ListValue": st.lists(JSON, max_size=5).map(
        lambda items: to_value(items).list_value
    ),
    "google.protobuf.Duration": time_parts().map(
        lambda t: duration_pb2.Duration(seconds=t[0], nanos=t[1])
    ),
    "google.protobuf.Timestamp": time_parts().map(
        lambda t: timestamp_pb2.Timestamp(seconds=t[0], nanos=t[1])
    ),
}
_CACHE: dict[str, st.SearchStrategy[Message]] = {}


def enum_values(enum: descriptor.EnumDescriptor) -> st.SearchStrategy[int]:
    known = [v.number for v in enum.values]
    return weighted(
        (4, st.sampled_from(known)),
        (1, st.sampled_from([-1, max(known) + 1, 99, 2**31 - 1, -(2**31)])),
    )


def scalars(fd: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    if fd.type in INT_RANGES:
        return integers(*INT_RANGES[fd.type])
    if fd.type == FD.TYPE_BOOL:
        return st.booleans()
    if fd.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return DOUBLES if fd.type == FD.TYPE_DOUBLE else st.floats(width=32)
    if fd.type == FD.TYPE_STRING:
        return with_huge(strings(fd.name))
    if fd.type == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if fd.type == FD.TYPE_ENUM:
        return enum_values(fd.enum_type)
    return messages(fd.message_type)


def _size(value: Any) -> int:
    if isinstance(value, Message):
        return value.ByteSize()
    return len(value) if isinstance(value, str | bytes) else 8


def many(element: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    """Repeated values: usually 0 to 4, now and then one value a thousand times or more."""
    copies = st.tuples(element, st.sampled_from([1001, 10_001])).map(
        lambda t: [t[0]] * (t[1] if _size(t[0]) <= 1024 else 2)
    )
    return weighted((12, st.lists(element, max_size=4)), (1, copies))


def fields(fd: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    if fd.type == FD.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
        key_fd = fd.message_type.fields_by_name["key"]
        value_fd = fd.message_type.fields_by_name["value"]
        return st.dictionaries(strings(key_fd.name) | TEXT, scalars(value_fd), max_size=4)
    if fd.is_repeated:
        return many(scalars(fd))
    return scalars(fd)


def assign(message: Message, fd: descriptor.FieldDescriptor, value: Any) -> None:
    target = getattr(message, fd.name)
    if fd.type == FD.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
        for key, item in value.items():
            if isinstance(item, Message):
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif fd.is_repeated:
        if fd.type == FD.TYPE_MESSAGE:
            target.extend(value)
        else:
            target.extend(value)
    elif fd.type == FD.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, fd.name, value)


def messages(desc: descriptor.Descriptor) -> st.SearchStrategy[Message]:
    """Random, well-typed instances of the message ``desc``, any field set or not."""
    if desc.full_name in SPECIAL:
        return SPECIAL[desc.full_name]
    if desc.full_name not in _CACHE:
        cls = message_factory.GetMessageClass(desc)

        def build(values: dict[str, Any]) -> Message:
            message = cls()
            for name, value in values.items():
                assign(message, desc.fields_by_name[name], value)
            return message

        _CACHE[desc.full_name] = st.deferred(
            lambda: st.fixed_dictionaries(
                {}, optional={fd.name: fields(fd) for fd in desc.fields}
            ).map(build)
        )
    return _CACHE[desc.full_name]


def requests(method: str) -> st.SearchStrategy[Message]:
    return messages(METHODS[method].input_type)


# -- a processor to call directly ----------------------------------------------------------


class Echo(ServiceProcessor[dict[str, Any], dict[str, Any], dict[str, Any]]):
    """Answers its payload (sync: runs in the servicer's thread pool)."""

    def process(self, request: dict[str, Any]) -> FlextResult[dict[str, Any]]:
        return FlextResult.ok(request)

    def build(self, domain: dict[str, Any], *, correlation_id: str) -> dict[str, Any]:
        return domain


class AsyncEcho(ServiceProcessor[dict[str, Any], dict[str, Any], dict[str, Any]]):
    """Answers its payload (async: runs on the loop)."""

    async def process(self, request: dict[str, Any]) -> FlextResult[dict[str, Any]]:
        return FlextResult.ok(request)

    def build(self, domain: dict[str, Any], *, correlation_id: str) -> dict[str, Any]:
        return domain


class Order(pydantic.BaseModel):
    """A typed payload: validation failures must be INVALID_ARGUMENT."""

    item: str
    quantity: int = pydantic.Field(ge=1)
    note: str | None = None


class Typed(ServiceProcessor[Order, Order, dict[str, Any]]):
    """Validates an Order and answers it."""

    def process(self, request: Order) -> FlextResult[Order]:
        return FlextResult.ok(request)

    def build(self, domain: Order, *, correlation_id: str) -> dict[str, Any]:
        return domain.model_dump()


# -- the servers -----------------------------------------------------------------------


@dataclass
class Fuzz:
    """The control plane, a processor server, and generic callables for every RPC."""

    plane: ControlPlane
    channel: grpc.aio.Channel
    processor_channel: grpc.aio.Channel
    calls: dict[str, Any] = field(default_factory=dict)
    processor_calls: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Fuzz(port={self.plane.port})"


def _callables(channel: grpc.aio.Channel) -> dict[str, Any]:
    """A multi-callable per RPC, built from the descriptors (no generated stubs needed)."""
    out: dict[str, Any] = {}
    for name, method in METHODS.items():
        path = f"/{method.containing_service.full_name}/{method.name}"
        kind: Callable[..., Any] = {
            (False, False): channel.unary_unary,
            (False, True): channel.unary_stream,
            (True, False): channel.stream_unary,
            (True, True): channel.stream_stream,
        }[(method.client_streaming, method.server_streaming)]
        out[name] = kind(
            path,
            request_serializer=message_factory.GetMessageClass(method.input_type).SerializeToString,
            response_deserializer=message_factory.GetMessageClass(method.output_type).FromString,
        )
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzz(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fuzz]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    plane, port = await create_server(fast_config(tmp))
    servicer = ProcessorServicer(
        {"echo": Echo(), "echo_async": AsyncEcho(), "typed": Typed()},
        service_name="fuzz-proc",
        instance_id="fuzz-proc-1",
    )
    server = grpc.aio.server()
    add_processor_servicer(servicer, server)
    proc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    processor_channel = grpc.aio.insecure_channel(f"127.0.0.1:{proc_port}")
    remember("endpoint", f"127.0.0.1:{port}")
    remember("endpoint", f"127.0.0.1:{proc_port}")
    result = Fuzz(plane, channel, processor_channel)
    result.calls = _callables(channel)
    result.processor_calls = _callables(processor_channel)
    # The processor is registered, so that random workflows can really call it.
    register = registry_pb2.RegisterRequest(
        instance=registry_pb2.ServiceInstance(
            service_name="fuzz-proc",
            instance_id="fuzz-proc-1",
            endpoint=f"127.0.0.1:{proc_port}",
            health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
        )
    )
    register.ttl.FromSeconds(3600)
    await result.calls["RegistryService.Register"](register, timeout=CALL_TIMEOUT)
    try:
        yield result
    finally:
        await channel.close()
        await processor_channel.close()
        await plane.stop(0.2)
        await server.stop(0)
        servicer.close()


# -- checks ----------------------------------------------------------------------------


def check_status(method: str, exc: grpc.aio.AioRpcError) -> grpc.StatusCode:
    """The status of a failed call, which must be a deliberate one."""
    code = exc.code()
    bad = code in BUG_CODES or (
        code is grpc.StatusCode.UNAVAILABLE and method.split(".")[1] not in UNAVAILABLE_OK
    )
    assert not bad, f"{method} answered {code.name}: {(exc.details() or '')[:500]!r}"
    return code


async def unary(calls: dict[str, Any], method: str, request: Message) -> Message | None:
    """Call a unary RPC; the reply, or None after a deliberate error status."""
    try:
        async with asyncio.timeout(CALL_TIMEOUT * 2):
            reply: Message = await calls[method](request, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        check_status(method, exc)
        return None
    harvest(reply)
    return reply


async def read_some(call: Any, method: str, count: int, wait: float) -> list[Message]:
    """Up to ``count`` messages of a server stream, each within ``wait`` s; then cancel."""
    got: list[Message] = []
    try:
        for _ in range(count):
            try:
                async with asyncio.timeout(wait):
                    message = await call.read()
            except TimeoutError:
                break
            if message is grpc.aio.EOF:
                break
            harvest(message)
            got.append(message)
    except grpc.aio.AioRpcError as exc:
        check_status(method, exc)
    finally:
        call.cancel()
    return got


async def healthy(fuzz: Fuzz) -> None:
    stub = health_pb2_grpc.HealthStub(fuzz.channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def registry_is_consistent(fuzz: Fuzz) -> None:
    """ListServices agrees with Discover(healthy_only=false), read at the same revision."""
    calls = fuzz.calls
    for _ in range(10):
        listing = await calls["RegistryService.ListServices"](
            registry_pb2.ListServicesRequest(page_size=1000), timeout=CALL_TIMEOUT
        )
        assert not listing.next_page_token
        names = [s.service_name for s in listing.services]
        assert names == sorted(names), "ListServices is not sorted by name"
        stable = True
        for summary in listing.services:
            try:
                found = await calls["RegistryService.Discover"](
                    registry_pb2.DiscoverRequest(
                        service_name=summary.service_name, healthy_only=False
                    ),
                    timeout=CALL_TIMEOUT,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.NOT_FOUND:
                    raise
                stable = False  # it expired in between: the revision moved
                break
            if found.revision != listing.revision:
                stable = False
                break
            instances = found.instances
            healthy_states = (
                registry_pb2.HEALTH_STATUS_UNKNOWN,
                registry_pb2.HEALTH_STATUS_SERVING,
            )
            healthy = sum(1 for i in instances if i.health in healthy_states and not i.ejected)
            where = f"service {summary.service_name!r} at revision {listing.revision}"
            assert summary.instance_count == len(instances), where
            assert summary.healthy_count == healthy, where
            assert summary.ejected_count == sum(1 for i in instances if i.ejected), where
            assert summary.healthy_count + summary.unhealthy_count <= summary.instance_count
        if stable:
            return
        await asyncio.sleep(0.05)


async def workflows_are_consistent(fuzz: Fuzz) -> None:
    """Every workflow ListWorkflows names can be read back with GetWorkflow."""
    calls = fuzz.calls
    listing = await calls["OrchestratorService.ListWorkflows"](
        orchestrator_pb2.ListWorkflowsRequest(page_size=1000), timeout=CALL_TIMEOUT
    )
    assert not listing.next_page_token
    for workflow in listing.workflows:
        reply = await calls["OrchestratorService.GetWorkflow"](
            orchestrator_pb2.GetWorkflowRequest(name=workflow.name), timeout=CALL_TIMEOUT
        )
        assert reply.workflow.version == workflow.version, workflow.name
        assert reply.workflow.steps == workflow.steps, workflow.name


async def still_fine(fuzz: Fuzz) -> None:
    """After a batch: the server answers SERVING and its listings agree."""
    await healthy(fuzz)
    await registry_is_consistent(fuzz)
    await workflows_are_consistent(fuzz)


# -- the tests -------------------------------------------------------------------------


@pytest.mark.parametrize("method", UNARY)
@FUZZ_SETTINGS
@given(data=st.data())
async def test_unary_rpcs_answer_ok_or_a_deliberate_error(
    fuzz: Fuzz, method: str, data: st.DataObject
) -> None:
    batch = data.draw(st.lists(requests(method), min_size=1, max_size=3), label="requests")
    for request in batch:
        await unary(fuzz.calls, method, request)
    await still_fine(fuzz)


@FUZZ_SETTINGS
@given(data=st.data())
async def test_keepalive_answers_each_request_in_order(fuzz: Fuzz, data: st.DataObject) -> None:
    method = "RegistryService.KeepAlive"
    batch = data.draw(st.lists(requests(method), min_size=0, max_size=3), label="requests")
    call = fuzz.calls[method](timeout=CALL_TIMEOUT)
    try:
        for request in batch:
            await call.write(request)
            async with asyncio.timeout(CALL_TIMEOUT * 2):
                reply = await call.read()
            if reply is grpc.aio.EOF:
                break  # the server ended the stream: its status says why
            harvest(reply)
        await call.done_writing()
        async with asyncio.timeout(CALL_TIMEOUT * 2):
            rest = await call.read()
        assert rest is grpc.aio.EOF
        assert await call.code() is grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        check_status(method, exc)
    finally:
        call.cancel()
    await still_fine(fuzz)


@FUZZ_SETTINGS
@given(data=st.data())
async def test_stream_calls_answers_when_the_client_closes(fuzz: Fuzz, data: st.DataObject) -> None:
    method = "MetricsService.StreamCalls"
    batch = data.draw(st.lists(requests(method), min_size=0, max_size=3), label="requests")
    call = fuzz.calls[method](timeout=CALL_TIMEOUT)
    try:
        for request in batch:
            await call.write(request)
        await call.done_writing()
        async with asyncio.timeout(CALL_TIMEOUT * 2):
            reply = await call
        assert reply.batches <= len(batch)
    except grpc.aio.AioRpcError as exc:
        check_status(method, exc)
    finally:
        call.cancel()
    await still_fine(fuzz)


@FUZZ_SETTINGS
@given(data=st.data())
async def test_watch_starts_or_refuses(fuzz: Fuzz, data: st.DataObject) -> None:
    method = "RegistryService.Watch"
    request = data.draw(requests(method), label="request")
    call = fuzz.calls[method](request)
    got = await read_some(call, method, count=3, wait=1.0)
    if request.from_revision == 0 and got:
        assert got[0].HasField("snapshot"), "the first message from revision 0 is a snapshot"
    await still_fine(fuzz)


@FUZZ_SETTINGS
@given(data=st.data())
async def test_watch_execution_streams_or_refuses(fuzz: Fuzz, data: st.DataObject) -> None:
    method = "OrchestratorService.WatchExecution"
    request = data.draw(requests(method), label="request")
    call = fuzz.calls[method](request)
    await read_some(call, method, count=3, wait=1.0)
    await still_fine(fuzz)


@FUZZ_SETTINGS
@given(data=st.data())
async def test_a_processor_servicer_answers_ok_or_a_deliberate_error(
    fuzz: Fuzz, data: st.DataObject
) -> None:
    method = data.draw(
        st.sampled_from(["ProcessorService.Invoke", "ProcessorService.ListOperations"])
    )
    batch = data.draw(st.lists(requests(method), min_size=1, max_size=3), label="requests")
    for request in batch:
        reply = await unary(fuzz.processor_calls, method, request)
        if isinstance(reply, processor_pb2.InvokeResponse):
            assert isinstance(request, processor_pb2.InvokeRequest)
            if request.operation.startswith("echo"):
                assert reply.result == request.payload
    await healthy(fuzz)


@FUZZ_SETTINGS
@given(
    items=st.lists(st.sampled_from(STATUS_NAMES), max_size=3),
    behaviour=JSON_OBJECTS,
)
async def test_steps_of_random_workflows_do_not_break_the_control_plane(
    fuzz: Fuzz, items: list[str], behaviour: dict[str, Any]
) -> None:
    """A valid inline workflow calling the echo processor, with random input."""
    workflow = orchestrator_pb2.Workflow(
        name="wf.one",
        steps=[
            orchestrator_pb2.WorkflowStep(name="step_1", service="fuzz-proc", operation="echo"),
            orchestrator_pb2.WorkflowStep(
                name="step-2",
                service="fuzz-proc",
                operation="typed",
                depends_on=["step_1"],
                input=to_struct({"item": "${steps.step_1.output.key}", "quantity": 1}),
                retry=common_pb2.RetryPolicy(retryable_codes=items),
            ),
        ],
    )
    request = orchestrator_pb2.StartExecutionRequest(
        inline_workflow=workflow, input=to_struct(behaviour)
    )
    await unary(fuzz.calls, "OrchestratorService.StartExecution", request)
    await still_fine(fuzz)


# Every request field that holds a Struct, and how to put one there: as wire bytes,
# because past the depth limit the Python protobuf runtime refuses to build the
# message at all (a client in another language would still send it).
def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _number(message: Any, name: str) -> int:
    number: int = message.DESCRIPTOR.fields_by_name[name].number
    return number


def _deep_struct(depth: int) -> bytes:
    """Struct {"a": {"a": ... "leaf"}} nested ``depth`` levels, encoded by hand."""
    value = struct_pb2.Value(string_value="leaf").SerializeToString()
    for _ in range(depth):
        entry = _len_field(1, b"a") + _len_field(2, value)  # Struct.FieldsEntry
        struct = _len_field(1, entry)  # Struct.fields
        value = _len_field(5, struct)  # Value.struct_value
    return struct


STRUCT_HOLDERS: dict[str, Callable[[bytes], bytes]] = {
    "RegistryService.Register": lambda s: _len_field(
        _number(registry_pb2.RegisterRequest, "instance"),
        registry_pb2.ServiceInstance(
            service_name="svc-deep", endpoint="127.0.0.1:1"
        ).SerializeToString()
        + _len_field(_number(registry_pb2.ServiceInstance, "metadata"), s),
    ),
    "MetricsService.ReportCalls": lambda s: _len_field(
        _number(metrics_pb2.ReportCallsRequest, "records"),
        metrics_pb2.CallRecord(service_name="svc-deep", operation="op").SerializeToString()
        + _len_field(_number(metrics_pb2.CallRecord, "metadata"), s),
    ),
    "OrchestratorService.PutWorkflow": lambda s: _len_field(
        _number(orchestrator_pb2.PutWorkflowRequest, "workflow"),
        orchestrator_pb2.Workflow(name="wf-deep").SerializeToString()
        + _len_field(
            _number(orchestrator_pb2.Workflow, "steps"),
            orchestrator_pb2.WorkflowStep(name="s", service="svc-deep").SerializeToString()
            + _len_field(_number(orchestrator_pb2.WorkflowStep, "input"), s),
        ),
    ),
    "OrchestratorService.StartExecution": lambda s: (
        orchestrator_pb2.StartExecutionRequest(workflow_name="wf-deep").SerializeToString()
        + _len_field(_number(orchestrator_pb2.StartExecutionRequest, "input"), s)
    ),
    "ProcessorService.Invoke": lambda s: (
        processor_pb2.InvokeRequest(operation="echo").SerializeToString()
        + _len_field(_number(processor_pb2.InvokeRequest, "payload"), s)
    ),
}


@pytest.mark.parametrize("depth", [32, 50])
@pytest.mark.parametrize("method", sorted(STRUCT_HOLDERS))
async def test_deeply_nested_structs_are_refused_cleanly(
    fuzz: Fuzz, method: str, depth: int
) -> None:
    """A Struct nested ``depth`` levels (past protobuf's decode limit) is a client error."""
    request = STRUCT_HOLDERS[method](_deep_struct(depth))
    path = f"/{METHODS[method].containing_service.full_name}/{METHODS[method].name}"
    channels = [fuzz.channel]
    if method.startswith("Processor"):
        channels.append(fuzz.processor_channel)
    for channel in channels:
        raw = channel.unary_unary(path)  # bytes in, bytes out
        try:
            await raw(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            check_status(method, exc)
    await still_fine(fuzz)
