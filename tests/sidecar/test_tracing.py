"""Traces of a three-service call chain, collected by a real OTLP receiver.

Three real sidecars (hop-a -> hop-b -> hop-c, the nested calls made through each
sidecar's mesh client) export over OTLP/gRPC, configured only by the standard
``OTEL_*`` variables, to a receiver in this process that speaks the collector's
protocol (the ``TraceService/Export`` of opentelemetry-proto). The spans must form
one tree under the caller's ``traceparent``: server, client, server, client, server,
each named for the RPC and carrying its service.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from flext_mesh.v1 import processor_pb2, processor_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.conftest import start_serve
from tests.otlp_receiver import Receiver, running_receiver
from tests.sidecar.test_sidecar_process import SidecarProcess, start_sidecar

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
FAILING_ID = "5bf92f3577b34da6a3ce929d0e0e4737"
FAILING = f"00-{FAILING_ID}-{CALLER_SPAN}-01"
HOPS = ("a", "b", "c")


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    with running_receiver() as running:
        yield running


def _instances(address: str, service: str) -> list[registry_pb2.ServiceInstance]:
    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        reply = stub.Discover(registry_pb2.DiscoverRequest(service_name=service), timeout=5)
    return list(reply.instances)


def test_a_three_service_chain_is_one_trace_of_server_and_client_spans(
    receiver: tuple[Receiver, int], tmp_path: Path
) -> None:
    found, port = receiver
    plane = start_serve(tmp_path)
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    sidecars: dict[str, SidecarProcess] = {}
    try:  # a sidecar that fails to start must not leave the others and the plane running
        for hop in HOPS:
            sidecars[hop] = start_sidecar(
                tmp_path,
                plane.address,
                "--service",
                f"hop-{hop}",
                app=f"tests.sidecar.hops_app:HOP_{hop.upper()}",
                env=otel,
            )
        deadline = time.monotonic() + 15
        while not all(_instances(plane.address, f"hop-{h}") for h in HOPS):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.5)  # each sidecar's client has seen the next hop
        with grpc.insecure_channel(sidecars["a"].address) as channel:
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            request = processor_pb2.InvokeRequest(operation="a", correlation_id="traced-1")
            request.payload.update({"mode": "ok", "amount": 2})
            stub.Invoke(request, timeout=10, metadata=(("traceparent", TRACEPARENT),))
            request.payload.update({"mode": "raise"})  # c rejects: InvalidArgument
            with pytest.raises(grpc.RpcError):
                stub.Invoke(request, timeout=10, metadata=(("traceparent", FAILING),))
        deadline = time.monotonic() + 15
        while len(found.of_trace(TRACE_ID)) < 5 or len(found.of_trace(FAILING_ID)) < 5:
            assert time.monotonic() < deadline, found.spans
            time.sleep(0.1)
        assert "tracing on exporter=otlp service_name=hop-a" in sidecars["a"].log()
    finally:
        for sidecar in sidecars.values():
            sidecar.proc.send_signal(signal.SIGTERM)
        for sidecar in sidecars.values():
            sidecar.proc.wait(15)
        plane.kill()

    spans = found.of_trace(TRACE_ID)
    server = {s.service: s for s in spans if s.kind == trace_pb2.Span.SPAN_KIND_SERVER}
    client = {s.service: s for s in spans if s.kind == trace_pb2.Span.SPAN_KIND_CLIENT}
    assert sorted(server) == ["hop-a", "hop-b", "hop-c"]
    assert sorted(client) == ["hop-a", "hop-b"]  # a calls b, b calls c
    assert {s.name for s in spans} == {"flext_mesh.v1.ProcessorService/Invoke"}
    # One tree: the caller's span > a's server > a's client > b's server > ... > c's server.
    assert server["hop-a"].parent == CALLER_SPAN
    assert client["hop-a"].parent == server["hop-a"].span_id
    assert server["hop-b"].parent == client["hop-a"].span_id
    assert client["hop-b"].parent == server["hop-b"].span_id
    assert server["hop-c"].parent == client["hop-b"].span_id
    assert client["hop-a"].attributes["flext_mesh.service"] == "hop-b"
    assert client["hop-b"].attributes["flext_mesh.operation"] == "c"
    assert server["hop-c"].attributes["rpc.system"] == "grpc"
    assert server["hop-c"].attributes["flext_mesh.correlation_id"] == "traced-1"
    assert all(s.status != trace_pb2.Status.STATUS_CODE_ERROR for s in spans)

    # A rejection at the end marks the spans it crossed as errors, with its status.
    failed = {(s.service, s.kind): s for s in found.of_trace(FAILING_ID)}
    c_server = failed["hop-c", trace_pb2.Span.SPAN_KIND_SERVER]
    assert c_server.status == trace_pb2.Status.STATUS_CODE_ERROR
    assert c_server.attributes["rpc.grpc.status_code"] == 3  # INVALID_ARGUMENT
    assert failed["hop-a", trace_pb2.Span.SPAN_KIND_SERVER].status == (
        trace_pb2.Status.STATUS_CODE_ERROR
    )
