"""Whatever a request holds, its refusal fits in a status every client can read.

A status travels as trailing metadata, and gRPC clients refuse metadata over 16 KiB:
a refusal listing 10,000 bad records, or quoting a 100 KB value, reached the client as
RESOURCE_EXHAUSTED instead of the INVALID_ARGUMENT it was. The control plane cuts the
status to fit (the first violations, then one counting the rest).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
from google.protobuf import duration_pb2

from flext_mesh.v1 import metrics_pb2, orchestrator_pb2, registry_pb2
from tests.robustness.conftest import StartPlane, register_request
from tests.robustness.refusals import MARKER, Refusal, open_stubs, refused, stream_refused

Channels = Callable[[str], grpc.aio.Channel]
HUGE = MARKER * 100_000
#: Trailers every client accepts (gRPC's soft limit is 8 KiB, the hard one 16 KiB).
FITS = 8 * 1024


def _fits(refusal: Refusal, first_field: str) -> None:
    assert refusal.code is grpc.StatusCode.INVALID_ARGUMENT, refusal.message[:200]
    assert refusal.trailer_bytes < FITS
    assert refusal.fields[0] == first_field, refusal.violations[:3]


async def test_an_all_bad_batch_of_10000_records_is_invalid_argument_not_exhausted(
    start_plane: StartPlane, channels: Channels
) -> None:
    s = await open_stubs(start_plane, channels)
    bad = metrics_pb2.CallRecord(service_name="", operation="a", duration_ms=1)
    refusal = await refused(
        s.metrics.ReportCalls(metrics_pb2.ReportCallsRequest(records=[bad] * 10_000))
    )
    _fits(refusal, "records[0].service_name")
    assert 10 <= len(refusal.violations) < 100
    listed = len(refusal.violations) - 1
    assert refusal.violations[-1][1] == f"and {10_000 - listed} more violations, not listed"


async def test_a_watch_of_5000_bad_names_is_invalid_argument_not_exhausted(
    start_plane: StartPlane, channels: Channels
) -> None:
    s = await open_stubs(start_plane, channels)
    refusal = await stream_refused(
        s.registry.Watch(registry_pb2.WatchRequest(service_names=["no spaces"] * 5000))
    )
    _fits(refusal, "service_names[0]")
    assert refusal.violations[-1][1].endswith("more violations, not listed")


async def test_huge_values_inside_definitions_are_cut_short(
    start_plane: StartPlane, channels: Channels
) -> None:
    s = await open_stubs(start_plane, channels)
    step = orchestrator_pb2.WorkflowStep(name="a", service="svc", depends_on=[HUGE])
    workflow = orchestrator_pb2.Workflow(name="w", steps=[step])
    refusal = await refused(
        s.orchestrator.PutWorkflow(orchestrator_pb2.PutWorkflowRequest(workflow=workflow))
    )
    _fits(refusal, "workflow.steps[0].depends_on[0]")
    assert refusal.message.endswith("…")

    policy = registry_pb2.ServicePolicy(
        service_name="pay", operation_timeouts={HUGE: duration_pb2.Duration(seconds=1)}
    )
    refusal = await refused(
        s.registry.PutServicePolicy(registry_pb2.PutServicePolicyRequest(policy=policy))
    )
    assert refusal.code is grpc.StatusCode.INVALID_ARGUMENT
    assert refusal.trailer_bytes < FITS
    assert refusal.fields[0].startswith("policy.operation_timeouts[")


async def test_a_policy_of_50000_unknown_splits_is_refused_at_once(
    start_plane: StartPlane, channels: Channels
) -> None:
    # Each unknown version once listed every registered version: splits x versions of
    # text built on the event loop (a fuzzed request stalled it for 82 s).
    s = await open_stubs(start_plane, channels)
    await asyncio.gather(
        *(
            s.registry.Register(
                register_request("pay", f"pay-{i}", version=f"{i:04d}".ljust(63, "v"))
            )
            for i in range(500)
        )
    )
    splits = [registry_pb2.VersionSplit(version=f"x{i}", weight=0) for i in range(50_000)]
    policy = registry_pb2.ServicePolicy(service_name="pay", splits=splits)
    started = time.monotonic()
    refusal = await refused(
        s.registry.PutServicePolicy(registry_pb2.PutServicePolicyRequest(policy=policy))
    )
    assert time.monotonic() - started < 5.0
    _fits(refusal, "policy.splits")
    assert "at most 100" in refusal.violations[0][1]


async def test_an_unknown_split_version_names_some_registered_ones_not_all(
    start_plane: StartPlane, channels: Channels
) -> None:
    s = await open_stubs(start_plane, channels)
    for i in range(30):
        await s.registry.Register(register_request("pay", f"pay-{i}", version=f"v{i:02d}"))
    splits = [registry_pb2.VersionSplit(version=v, weight=50) for v in ("x1", "v00")]
    policy = registry_pb2.ServicePolicy(service_name="pay", splits=splits, strategy=99)
    refusal = await refused(
        s.registry.PutServicePolicy(registry_pb2.PutServicePolicyRequest(policy=policy))
    )
    # Its own fields and the registry's answer, in one refusal.
    assert refusal.fields == ["policy.strategy", "policy.splits[0].version"]
    assert refusal.violations[1][1].endswith(
        "(registered versions: v00, v01, v02, v03, v04, v05, v06, v07, v08, v09 and 20 more)"
    )
