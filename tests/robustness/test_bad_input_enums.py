"""Enum fields out of range answer INVALID_ARGUMENT naming the field, in every RPC.

Protobuf enums are open: a client may send any number (a newer client, a typo, a
fuzzer). Every enum field of every request is checked; a test below walks the request
messages of the three services so that a new enum field cannot go unchecked unnoticed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor

from flext_mesh.v1 import metrics_pb2, orchestrator_pb2, registry_pb2
from tests.robustness.conftest import StartPlane
from tests.robustness.refusals import Stubs, open_stubs, refused

Channels = Callable[[str], grpc.aio.Channel]
R, W = registry_pb2, orchestrator_pb2
_Request = Callable[[int], Any]

# (service.Method, the request carrying the number, the field path it must name)
CASES: list[tuple[str, _Request, str]] = [
    (
        "metrics.ListAlerts",
        lambda n: metrics_pb2.ListAlertsRequest(min_severity=n),
        "min_severity",
    ),
    ("orchestrator.ListExecutions", lambda n: W.ListExecutionsRequest(state=n), "state"),
    (
        "registry.Discover",
        lambda n: R.DiscoverRequest(service_name="pay", strategy=n),
        "strategy",
    ),
    (
        "registry.Register",
        lambda n: R.RegisterRequest(
            instance=R.ServiceInstance(
                service_name="pay", endpoint="127.0.0.1:9", health_check_mode=n
            )
        ),
        "instance.health_check_mode",
    ),
    (
        "registry.PutServicePolicy",
        lambda n: R.PutServicePolicyRequest(policy=R.ServicePolicy(service_name="pay", strategy=n)),
        "policy.strategy",
    ),
]

#: Enum fields of requests that are outputs of the control plane, ignored as input
#: (the registry sets an instance's health itself).
OUTPUT_ONLY = {"RegisterRequest.instance.health"}
#: Checked per record by the metrics aggregator (see the test below).
PER_RECORD = {
    "ReportCallsRequest.records.side",
    "StreamCallsRequest.records.side",
    "DeliverCallsRequest.records.side",
}
#: The request field paths CASES cover.
COVERED = {
    "ListAlertsRequest.min_severity",
    "ListExecutionsRequest.state",
    "DiscoverRequest.strategy",
    "RegisterRequest.instance.health_check_mode",
    "PutServicePolicyRequest.policy.strategy",
}


def _call(s: Stubs, rpc: str, request: Any) -> Any:
    service, method = rpc.split(".")
    return getattr(getattr(s, service), method)(request)


@pytest.mark.parametrize("number", [99, -1])
async def test_every_enum_out_of_range_is_invalid_argument_naming_it(
    start_plane: StartPlane, channels: Channels, number: int
) -> None:
    s = await open_stubs(start_plane, channels)
    for rpc, request, field in CASES:
        refusal = await refused(_call(s, rpc, request(number)))
        assert refusal.code is grpc.StatusCode.INVALID_ARGUMENT, (rpc, refusal.message)
        assert field in refusal.fields, (rpc, refusal.violations)


def _enum_fields(message: descriptor.Descriptor, path: str, seen: frozenset[str]) -> Iterator[str]:
    for field in message.fields:
        where = f"{path}.{field.name}"
        if field.type == descriptor.FieldDescriptor.TYPE_ENUM:
            yield where
        elif (
            field.type == descriptor.FieldDescriptor.TYPE_MESSAGE
            and field.message_type.full_name.startswith("flext_mesh.")
            and field.message_type.full_name not in seen
        ):
            yield from _enum_fields(
                field.message_type, where, seen | {field.message_type.full_name}
            )


def test_every_enum_field_of_every_request_is_covered() -> None:
    found: set[str] = set()
    for module in (registry_pb2, metrics_pb2, orchestrator_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                request = method.input_type
                found |= set(_enum_fields(request, request.name, frozenset({request.full_name})))
    assert found == COVERED | OUTPUT_ONLY | PER_RECORD


async def test_a_call_record_of_an_unknown_side_is_rejected(
    start_plane: StartPlane, channels: Channels
) -> None:
    s = await open_stubs(start_plane, channels)
    record = metrics_pb2.CallRecord(service_name="pay", operation="a", duration_ms=1, side=99)  # type: ignore[arg-type]
    refusal = await refused(s.metrics.ReportCalls(metrics_pb2.ReportCallsRequest(records=[record])))
    assert refusal.code is grpc.StatusCode.INVALID_ARGUMENT
    assert refusal.fields == ["records[0].side"]


async def test_over_long_fields_of_a_call_record_are_rejected_by_name(
    start_plane: StartPlane, channels: Channels
) -> None:
    s = await open_stubs(start_plane, channels)
    for name, length in (
        ("instance_id", 64),
        ("version", 64),
        ("caller_service", 64),
        ("correlation_id", 129),
    ):
        record = metrics_pb2.CallRecord(service_name="pay", operation="a", duration_ms=1)
        setattr(record, name, "x" * length)
        request = metrics_pb2.ReportCallsRequest(records=[record])
        refusal = await refused(s.metrics.ReportCalls(request))
        assert refusal.code is grpc.StatusCode.INVALID_ARGUMENT
        assert refusal.fields == [f"records[0].{name}"]
