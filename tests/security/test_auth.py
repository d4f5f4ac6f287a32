"""Authentication and authorization of the control plane: real tokens, a real tokens
file, real certificates, a real control plane in this process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flext_mesh.config import ServerConfig
from flext_mesh.orchestrator.formats import workflow_from_dict
from flext_mesh.rpc.channels import ClientSecurity, open_channel
from flext_mesh.security.auth import (
    METHOD_RULES,
    Authenticator,
    SecurityConfigError,
    SecurityInterceptor,
    check_auth_required,
)
from flext_mesh.security.identity import client_key, current_identity
from flext_mesh.security.tokens import TokenFile, add_token, remove_token
from flext_mesh.server import SERVICE_NAMES, ControlPlane, ServeError, create_server
from flext_mesh.v1 import (
    metrics_pb2,
    metrics_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    processor_pb2,
    processor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.conftest import BIN, grpcurl_path, start_serve
from tests.security.conftest import Pki
from tests.sidecar.test_sidecar_process import start_sidecar

Code = grpc.StatusCode
TTL_ONLY = registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY

#: name -> scopes of the tokens every secured control plane of these tests knows.
TOKENS: dict[str, list[str]] = {
    "operator": ["admin"],
    "dashboard": ["read"],
    "payment-sidecar": ["service:payment"],
    "orders-sidecar": ["service:orders"],
    "ci": ["workflow"],
}


def config_for(tmp_path: Path, **settings: Any) -> ServerConfig:
    """A loopback control plane's settings, SQLite in ``tmp_path``."""
    defaults: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "store": f"sqlite:///{tmp_path / 'mesh.db'}",
        "grace_period": 0.5,
    }
    return ServerConfig(**{**defaults, **settings})


@dataclass
class Secured:
    """A control plane with bearer-token authentication, and the tokens it knows."""

    plane: ControlPlane
    tokens_file: Path
    tokens: dict[str, str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.plane.port}"

    def channel(self, name: str | None = None) -> grpc.aio.Channel:
        """A channel sending the token of ``name`` (none when None)."""
        token = self.tokens[name] if name is not None else ""
        return open_channel(self.address, ClientSecurity(token=token))


@contextlib.asynccontextmanager
async def secured_plane(tmp_path: Path, **settings: Any) -> AsyncIterator[Secured]:
    """A control plane whose tokens file holds :data:`TOKENS`, made by ``add_token``."""
    tokens_file = tmp_path / "tokens.yaml"
    tokens = {name: add_token(tokens_file, name, scopes) for name, scopes in TOKENS.items()}
    plane, _ = await create_server(
        config_for(tmp_path, auth_tokens_file=str(tokens_file), **settings)
    )
    try:
        yield Secured(plane, tokens_file, tokens)
    finally:
        await plane.stop(0.2)


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    async with secured_plane(tmp_path) as mesh:
        yield mesh


def register_request(service: str, instance_id: str, ttl: float = 60.0) -> Any:
    request = registry_pb2.RegisterRequest(
        instance=registry_pb2.ServiceInstance(
            service_name=service,
            instance_id=instance_id,
            endpoint="127.0.0.1:9",
            health_check_mode=TTL_ONLY,
        )
    )
    request.ttl.FromNanoseconds(int(ttl * 1e9))
    return request


def record(service: str, caller: str = "") -> metrics_pb2.CallRecord:
    return metrics_pb2.CallRecord(
        service_name=service,
        operation="charge",
        duration_ms=3.0,
        success=True,
        caller_service=caller,
        time_unix_nano=time.time_ns(),
    )


async def refused(call: Any, code: grpc.StatusCode) -> str:
    """Await ``call``; it must fail with ``code``; returns its details."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() is code, info.value.details()
    return info.value.details() or ""


# -- authentication --------------------------------------------------------------------


async def test_calls_without_a_valid_token_are_unauthenticated(secured: Secured) -> None:
    discover = registry_pb2.DiscoverRequest(service_name="payment")
    async with secured.channel() as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        details = await refused(stub.Discover(discover), Code.UNAUTHENTICATED)
        assert "authorization: Bearer <token>" in details
        wrong = "fm_" + "x" * 43
        for header in (f"Bearer {wrong}", "Basic dXNlcjpwYXNz", "Bearer", f"bearer {wrong}"):
            details = await refused(
                stub.Discover(discover, metadata=(("authorization", header),)),
                Code.UNAUTHENTICATED,
            )
            assert wrong not in details
        # Streams are refused too, before anything is read or sent.
        watch = stub.Watch(registry_pb2.WatchRequest())
        await refused(watch.read(), Code.UNAUTHENTICATED)
        keep_alive = stub.KeepAlive()
        await keep_alive.write(registry_pb2.KeepAliveRequest(lease_ids=["l-1"]))
        await refused(keep_alive.read(), Code.UNAUTHENTICATED)
    # The same token, spelled "Bearer", gets in.
    async with secured.channel("dashboard") as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        listed = await stub.ListServices(registry_pb2.ListServicesRequest())
        assert list(listed.services) == []


async def test_health_and_reflection_need_no_token(secured: Secured) -> None:
    async with secured.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", *SERVICE_NAMES):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    proc = await asyncio.create_subprocess_exec(
        grpcurl_path(),
        "-plaintext",
        secured.address,
        "list",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out
    assert set(SERVICE_NAMES) <= set(out.decode().split())
    # ...but grpcurl cannot call a guarded method without one.
    proc = await asyncio.create_subprocess_exec(
        grpcurl_path(),
        "-plaintext",
        secured.address,
        "flext_mesh.v1.RegistryService/ListServices",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
    assert "Unauthenticated" in out.decode()


# -- scopes ----------------------------------------------------------------------------


async def test_read_scope_reads_but_cannot_write(secured: Secured) -> None:
    async with secured.channel("payment-sidecar") as channel:
        await registry_pb2_grpc.RegistryServiceStub(channel).Register(
            register_request("payment", "pay-1")
        )
    async with secured.channel("dashboard") as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        found = await registry.Discover(registry_pb2.DiscoverRequest(service_name="payment"))
        assert [i.instance_id for i in found.instances] == ["pay-1"]
        watch = registry.Watch(registry_pb2.WatchRequest())
        first = await watch.read()
        assert [i.instance_id for i in first.snapshot.instances] == ["pay-1"]
        watch.cancel()
        details = await refused(
            registry.Register(register_request("payment", "pay-2")), Code.PERMISSION_DENIED
        )
        assert details == (
            "token 'dashboard' (scopes: read) may not call "
            "flext_mesh.v1.RegistryService/Register: needs scope admin or service:NAME"
        )
        await refused(
            registry.PutServicePolicy(
                registry_pb2.PutServicePolicyRequest(
                    policy=registry_pb2.ServicePolicy(service_name="payment")
                )
            ),
            Code.PERMISSION_DENIED,
        )
        workflows = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        assert (
            list((await workflows.ListWorkflows(orchestrator_pb2.ListWorkflowsRequest())).workflows)
            == []
        )
        details = await refused(
            workflows.StartExecution(orchestrator_pb2.StartExecutionRequest(workflow_name="x")),
            Code.PERMISSION_DENIED,
        )
        assert details.endswith("needs scope admin or workflow")
        metrics = metrics_pb2_grpc.MetricsServiceStub(channel)
        await refused(
            metrics.ReportCalls(metrics_pb2.ReportCallsRequest(records=[record("payment")])),
            Code.PERMISSION_DENIED,
        )


async def test_a_service_token_registers_and_renews_only_its_own_service(
    secured: Secured,
) -> None:
    async with (
        secured.channel("payment-sidecar") as payment_channel,
        secured.channel("orders-sidecar") as orders_channel,
    ):
        payment = registry_pb2_grpc.RegistryServiceStub(payment_channel)
        orders = registry_pb2_grpc.RegistryServiceStub(orders_channel)
        mine = await payment.Register(register_request("payment", "pay-1"))
        theirs = await orders.Register(register_request("orders", "ord-1"))

        details = await refused(
            payment.Register(register_request("orders", "ord-2")), Code.PERMISSION_DENIED
        )
        assert details == (
            "token 'payment-sidecar' (scopes: service:payment) may not register instances "
            "of 'orders': needs scope admin or service:orders"
        )
        details = await refused(
            payment.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=theirs.lease.lease_id)),
            Code.PERMISSION_DENIED,
        )
        assert "needs scope admin or service:orders" in details
        await refused(
            payment.Deregister(
                registry_pb2.DeregisterRequest(service_name="orders", instance_id="ord-1")
            ),
            Code.PERMISSION_DENIED,
        )
        # KeepAlive: its own lease renews; a message naming another's lease ends the stream.
        stream = payment.KeepAlive()
        await stream.write(registry_pb2.KeepAliveRequest(lease_ids=[mine.lease.lease_id]))
        renewed = await stream.read()
        assert [lease.lease_id for lease in renewed.leases] == [mine.lease.lease_id]
        await stream.write(registry_pb2.KeepAliveRequest(lease_ids=[theirs.lease.lease_id]))
        await refused(stream.read(), Code.PERMISSION_DENIED)
        # An unknown lease is not refused: the registry answers it expired, so that the
        # sidecar registers again.
        stream = payment.KeepAlive()
        await stream.write(registry_pb2.KeepAliveRequest(lease_ids=["no-such-lease"]))
        assert list((await stream.read()).expired_lease_ids) == ["no-such-lease"]
        stream.cancel()
        await refused(
            payment.Heartbeat(registry_pb2.HeartbeatRequest(lease_id="no-such-lease")),
            Code.NOT_FOUND,
        )
        # It reads discovery, to call the others, but sets no policy.
        found = await payment.Discover(registry_pb2.DiscoverRequest(service_name="orders"))
        assert [i.instance_id for i in found.instances] == ["ord-1"]
        await refused(
            payment.DeleteServicePolicy(
                registry_pb2.DeleteServicePolicyRequest(service_name="payment")
            ),
            Code.PERMISSION_DENIED,
        )
        # The orders instance is still there; payment deregisters its own.
        assert (
            await orders.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=theirs.lease.lease_id))
        ).lease.lease_id
        await payment.Deregister(
            registry_pb2.DeregisterRequest(service_name="payment", instance_id="pay-1")
        )


async def test_a_service_token_reports_only_calls_it_served_or_made(secured: Secured) -> None:
    async with secured.channel("payment-sidecar") as channel:
        metrics = metrics_pb2_grpc.MetricsServiceStub(channel)
        # Served by payment, and payment's outbound call to orders.
        reply = await metrics.ReportCalls(
            metrics_pb2.ReportCallsRequest(
                records=[record("payment"), record("orders", caller="payment")]
            )
        )
        assert reply.accepted == 2
        details = await refused(
            metrics.ReportCalls(
                metrics_pb2.ReportCallsRequest(records=[record("payment"), record("orders")])
            ),
            Code.PERMISSION_DENIED,
        )
        assert "may not report records[1], a call of 'orders'" in details
        assert details.endswith("needs scope admin or service:orders")
        # StreamCalls: each batch is checked.
        stream = metrics.StreamCalls()
        await stream.write(metrics_pb2.StreamCallsRequest(records=[record("payment")]))
        await stream.write(metrics_pb2.StreamCallsRequest(records=[record("billing")]))
        await stream.done_writing()
        await refused(stream, Code.PERMISSION_DENIED)
        stream = metrics.StreamCalls()
        await stream.write(metrics_pb2.StreamCallsRequest(records=[record("payment")] * 3))
        await stream.done_writing()
        assert (await stream).accepted == 3


async def test_workflow_scope_puts_and_starts_workflows_only(secured: Secured) -> None:
    workflow = workflow_from_dict(
        {"name": "charge_it", "steps": [{"name": "charge", "service": "payment"}]}
    )
    async with secured.channel("ci") as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        stored = await stub.PutWorkflow(orchestrator_pb2.PutWorkflowRequest(workflow=workflow))
        assert stored.workflow.name == "charge_it"
        started = await stub.StartExecution(
            orchestrator_pb2.StartExecutionRequest(workflow_name="charge_it")
        )
        got = await stub.GetExecution(
            orchestrator_pb2.GetExecutionRequest(execution_id=started.execution.execution_id)
        )
        assert got.execution.execution_id == started.execution.execution_id
        # Cancelling or retrying an unknown execution gets past the scope check to NOT_FOUND.
        await refused(
            stub.CancelExecution(orchestrator_pb2.CancelExecutionRequest(execution_id="nope")),
            Code.NOT_FOUND,
        )
        await refused(
            stub.RetryExecution(orchestrator_pb2.RetryExecutionRequest(execution_id="nope")),
            Code.NOT_FOUND,
        )
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        await refused(registry.Register(register_request("payment", "p")), Code.PERMISSION_DENIED)
        await refused(
            registry.Discover(registry_pb2.DiscoverRequest(service_name="payment")),
            Code.PERMISSION_DENIED,
        )
    # Retrying is a workflow operator's write: a reader or a sidecar may not.
    for name in ("dashboard", "payment-sidecar"):
        async with secured.channel(name) as channel:
            details = await refused(
                orchestrator_pb2_grpc.OrchestratorServiceStub(channel).RetryExecution(
                    orchestrator_pb2.RetryExecutionRequest(execution_id="nope")
                ),
                Code.PERMISSION_DENIED,
            )
            assert details.endswith("needs scope admin or workflow")


async def test_admin_calls_everything(secured: Secured) -> None:
    async with secured.channel("operator") as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        await registry.Register(register_request("orders", "ord-1"))
        policy = await registry.PutServicePolicy(
            registry_pb2.PutServicePolicyRequest(
                policy=registry_pb2.ServicePolicy(
                    service_name="orders",
                    strategy=registry_pb2.LOAD_BALANCING_STRATEGY_RANDOM,
                )
            )
        )
        assert policy.policy.version == 1
        await registry.Deregister(
            registry_pb2.DeregisterRequest(service_name="orders", instance_id="ord-1")
        )
        metrics = metrics_pb2_grpc.MetricsServiceStub(channel)
        reply = await metrics.ReportCalls(
            metrics_pb2.ReportCallsRequest(records=[record("anything")])
        )
        assert reply.accepted == 1
        workflows = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        await workflows.PutWorkflow(
            orchestrator_pb2.PutWorkflowRequest(
                workflow=workflow_from_dict(
                    {"name": "w", "steps": [{"name": "s", "service": "orders"}]}
                )
            )
        )
        await workflows.DeleteWorkflow(orchestrator_pb2.DeleteWorkflowRequest(name="w"))


async def test_draining_needs_admin_or_the_services_own_scope(secured: Secured) -> None:
    def drain(service: str, maintenance: bool = True) -> Any:
        return registry_pb2.SetInstanceMaintenanceRequest(
            service_name=service, instance_id=f"{service[:3]}-1", maintenance=maintenance
        )

    async with (
        secured.channel("operator") as admin_channel,
        secured.channel("payment-sidecar") as payment_channel,
        secured.channel("dashboard") as read_channel,
        secured.channel("ci") as workflow_channel,
    ):
        admin = registry_pb2_grpc.RegistryServiceStub(admin_channel)
        payment = registry_pb2_grpc.RegistryServiceStub(payment_channel)
        await admin.Register(register_request("payment", "pay-1"))
        await admin.Register(register_request("orders", "ord-1"))
        for channel in (read_channel, workflow_channel):
            details = await refused(
                registry_pb2_grpc.RegistryServiceStub(channel).SetInstanceMaintenance(
                    drain("payment")
                ),
                Code.PERMISSION_DENIED,
            )
            assert details.endswith(
                "may not call flext_mesh.v1.RegistryService/SetInstanceMaintenance: "
                "needs scope admin or service:NAME"
            )
        details = await refused(
            payment.SetInstanceMaintenance(drain("orders")), Code.PERMISSION_DENIED
        )
        assert details == (
            "token 'payment-sidecar' (scopes: service:payment) may not call "
            "SetInstanceMaintenance for 'orders': needs scope admin or service:orders"
        )
        await refused(admin.SetInstanceMaintenance(drain("nobody")), Code.NOT_FOUND)
        # Nothing refused was drained; its own service's and the admin's drains go through.
        found = await admin.Discover(
            registry_pb2.DiscoverRequest(service_name="orders", healthy_only=False)
        )
        assert not found.instances[0].maintenance
        assert (await payment.SetInstanceMaintenance(drain("payment"))).instance.maintenance
        assert (await admin.SetInstanceMaintenance(drain("orders"))).instance.maintenance
        undrained = await admin.SetInstanceMaintenance(drain("payment", maintenance=False))
        assert not undrained.instance.maintenance


# -- the tokens file -------------------------------------------------------------------


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """The code and details ``call`` ends with (OK when it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return Code.OK, ""


async def poll_until(make_call: Any, code: grpc.StatusCode, *, within: float = 5.0) -> str:
    """Repeat a call until it ends with ``code``; its details (fails after ``within`` s)."""
    deadline = time.monotonic() + within
    while True:
        got, details = await status_of(make_call())
        if got is code:
            return details
        assert time.monotonic() < deadline, f"still {got.name} after {within} s: {details}"
        await asyncio.sleep(0.1)


async def test_a_revoked_token_is_refused_without_a_restart(secured: Secured) -> None:
    async with (
        secured.channel("dashboard") as channel,
        secured.channel("payment-sidecar") as sidecar_channel,
    ):
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        await stub.ListServices(registry_pb2.ListServicesRequest())
        # A sidecar's KeepAlive stream, open before the revocation.
        sidecar = registry_pb2_grpc.RegistryServiceStub(sidecar_channel)
        lease = (await sidecar.Register(register_request("payment", "pay-1"))).lease.lease_id
        keep_alive = sidecar.KeepAlive()
        await keep_alive.write(registry_pb2.KeepAliveRequest(lease_ids=[lease]))
        assert len((await keep_alive.read()).leases) == 1

        remove_token(secured.tokens_file, "dashboard")
        remove_token(secured.tokens_file, "payment-sidecar")
        started = time.monotonic()
        details = await poll_until(
            lambda: stub.ListServices(registry_pb2.ListServicesRequest()), Code.UNAUTHENTICATED
        )
        assert details == "invalid bearer token: unknown or revoked"
        assert time.monotonic() - started < 2.5
        await keep_alive.write(registry_pb2.KeepAliveRequest(lease_ids=[lease]))
        details = await refused(keep_alive.read(), Code.UNAUTHENTICATED)
        assert details == "invalid bearer token: unknown or revoked"
    # A token added meanwhile works without a restart either.
    token = add_token(secured.tokens_file, "late", ["read"])
    async with open_channel(secured.address, ClientSecurity(token=token)) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        await poll_until(lambda: stub.ListServices(registry_pb2.ListServicesRequest()), Code.OK)


async def test_tokens_never_reach_the_file_or_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with secured_plane(tmp_path) as secured:
        text = secured.tokens_file.read_text()
        wrong = "fm_" + "y" * 43
        for token in [*secured.tokens.values(), wrong]:
            async with open_channel(secured.address, ClientSecurity(token=token)) as channel:
                stub = registry_pb2_grpc.RegistryServiceStub(channel)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Register(register_request("payment", "pay-1"))
        remove_token(secured.tokens_file, "ci")
        await asyncio.sleep(1.2)
        async with secured.channel("ci") as channel:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await registry_pb2_grpc.RegistryServiceStub(channel).ListServices(
                    registry_pb2.ListServicesRequest()
                )
    assert "tokens file reloaded" in caplog.text
    assert "permission denied" in caplog.text
    for token in [*secured.tokens.values(), wrong]:
        assert token not in text
        assert token[3:] not in caplog.text
    assert secured.tokens_file.stat().st_mode & 0o777 == 0o600


async def test_a_bad_tokens_file_stops_the_start_naming_the_entry(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text(
        "tokens:\n"
        f"  - {{name: ok, sha256: {'a' * 64}, scopes: [read]}}\n"
        f"  - {{name: broken, sha256: {'b' * 64}, scopes: [root]}}\n"
    )
    with pytest.raises(ServeError) as info:
        await create_server(config_for(tmp_path, auth_tokens_file=str(tokens_file)))
    assert str(info.value) == (
        f"--auth-tokens-file {tokens_file}: tokens[1] (name 'broken'): scope 'root' is not "
        "a scope: use one of admin, read, workflow, service:NAME"
    )
    with pytest.raises(ServeError, match="no such tokens file"):
        await create_server(config_for(tmp_path, auth_tokens_file=str(tmp_path / "missing")))


async def test_a_sidecar_with_a_service_token_registers_reports_and_deregisters(
    secured: Secured, tmp_path: Path
) -> None:
    """Everything a real sidecar does with the control plane fits ``service:payment``."""
    token = secured.tokens["payment-sidecar"]
    sidecar = await asyncio.to_thread(start_sidecar, tmp_path, secured.address, "--token", token)
    try:
        async with secured.channel("dashboard") as channel:
            registry = registry_pb2_grpc.RegistryServiceStub(channel)
            metrics = metrics_pb2_grpc.MetricsServiceStub(channel)
            discover = registry_pb2.DiscoverRequest(service_name="payment")
            await poll_until(lambda: registry.Discover(discover), Code.OK, within=15)
            found = await registry.Discover(discover)
            assert [i.instance_id for i in found.instances] == [sidecar.instance]
            async with grpc.aio.insecure_channel(sidecar.address) as to_sidecar:
                stub = processor_pb2_grpc.ProcessorServiceStub(to_sidecar)
                for amount in (5.0, 7.0):
                    request = processor_pb2.InvokeRequest(operation="charge")
                    request.payload.update({"customer_id": "c1", "amount": amount})
                    await stub.Invoke(request, timeout=5)
            # Its reporter streams the two calls it served (service:payment may).
            wanted = metrics_pb2.GetServiceReportRequest(service_name="payment")
            deadline = time.monotonic() + 15
            while (await status_of(metrics.GetServiceReport(wanted)))[0] is not Code.OK or (
                (await metrics.GetServiceReport(wanted)).report.summary.total_calls != 2
            ):
                assert time.monotonic() < deadline, sidecar.log()
                await asyncio.sleep(0.1)
    finally:
        sidecar.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(sidecar.proc.wait, 15)
    assert code == 0, sidecar.log()
    log = sidecar.log()
    assert "PERMISSION_DENIED" not in log, log
    assert "UNAUTHENTICATED" not in log, log
    assert token not in log
    async with secured.channel("dashboard") as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        code, _ = await status_of(
            registry.Discover(registry_pb2.DiscoverRequest(service_name="payment"))
        )
        assert code is Code.NOT_FOUND, "deregistered on SIGTERM"


# -- mTLS identities -------------------------------------------------------------------


async def test_a_client_certificate_stands_for_its_spiffe_identity(
    tmp_path: Path, pki: Pki
) -> None:
    plane, port = await create_server(
        config_for(tmp_path, **pki.serving(pki.control_plane, "require"))
    )
    address = f"127.0.0.1:{port}"
    try:
        async with open_channel(address, pki.client(pki.payment)) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            reply = await stub.Register(register_request("payment", "pay-1"))
            assert reply.instance.service_name == "payment"
            details = await refused(
                stub.Register(register_request("orders", "ord-1")), Code.PERMISSION_DENIED
            )
            assert details == (
                "certificate 'spiffe://flext-mesh/service/payment' (scopes: service:payment) "
                "may not register instances of 'orders': needs scope admin or service:orders"
            )
        async with open_channel(address, pki.client(pki.admin)) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            await stub.Register(register_request("orders", "ord-1"))
        # A trusted certificate naming no flext-mesh identity proves nothing here.
        async with open_channel(address, pki.client(pki.control_plane)) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            details = await refused(
                stub.ListServices(registry_pb2.ListServicesRequest()), Code.UNAUTHENTICATED
            )
            assert "names no flext-mesh identity" in details
    finally:
        await plane.stop(0.2)


async def test_over_mtls_a_bearer_token_decides(tmp_path: Path, pki: Pki) -> None:
    async with secured_plane(tmp_path, **pki.serving(pki.control_plane, "require")) as secured:
        reader = pki.client(pki.payment, token=secured.tokens["dashboard"])
        async with open_channel(secured.address, reader) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            await refused(
                stub.Register(register_request("payment", "pay-1")), Code.PERMISSION_DENIED
            )
        async with open_channel(secured.address, pki.client(pki.payment)) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            await stub.Register(register_request("payment", "pay-1"))


# -- the rule table and the identity seen by handlers ------------------------------------


def test_every_rpc_of_the_contracts_has_a_rule() -> None:
    services = [
        registry_pb2.DESCRIPTOR.services_by_name["RegistryService"],
        metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"],
        orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"],
        processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"],
    ]
    assert {s.full_name for s in services} == set(SERVICE_NAMES)
    methods = {f"/{s.full_name}/{method.name}" for s in services for method in s.methods}
    ads = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"]
    methods |= {f"/{ads.full_name}/{method.name}" for method in ads.methods}
    assert set(METHOD_RULES) == methods
    # Every write is rate limited; reads are not.
    writes = {
        "Register", "Heartbeat", "KeepAlive", "Deregister", "PutServicePolicy",
        "DeleteServicePolicy", "PutWorkflow", "DeleteWorkflow", "StartExecution",
        "CancelExecution", "RecordStepResult", "SetInstanceMaintenance", "RetryExecution",
    }  # fmt: skip
    limited = {name.rsplit("/", 1)[1]: rule.limit for name, rule in METHOD_RULES.items()}
    assert {name for name, limit in limited.items() if limit == "writes"} == writes
    assert {name for name, limit in limited.items() if limit == "reports"} == {
        "ReportCalls",
        "StreamCalls",
        "DeliverCalls",
    }


class _Echo:
    """A tiny servicer whose answers say which identity and client key it ran as."""

    async def unary(self, request: bytes, context: Any) -> bytes:
        identity = current_identity.get()
        assert identity is not None
        return f"{identity.name}|{client_key(context)}".encode()

    async def stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        for _ in range(2):
            await asyncio.sleep(0)
            identity = current_identity.get()
            yield (identity.name if identity else "none").encode()


async def test_handlers_run_as_the_caller_and_unlisted_methods_are_admin_only(
    tmp_path: Path,
) -> None:
    tokens_file = tmp_path / "tokens.yaml"
    admin = add_token(tokens_file, "root", ["admin"])
    reader = add_token(tokens_file, "viewer", ["read"])
    tokens = TokenFile(tokens_file)
    tokens.load()
    interceptor = SecurityInterceptor(
        authenticator=Authenticator(tokens, certificates=False),
        rules={},  # nothing listed: admin only
    )
    server = grpc.aio.server(interceptors=[interceptor])
    echo = _Echo()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(echo.unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(echo.stream),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            stream = channel.unary_stream("/test.Echo/Stream")
            as_admin = (("authorization", f"Bearer {admin}"),)
            assert await unary(b"", metadata=as_admin) == b"root|token:root"
            assert [m async for m in stream(b"", metadata=as_admin)] == [b"root", b"root"]
            details = await refused(
                unary(b"", metadata=(("authorization", f"Bearer {reader}"),)),
                Code.PERMISSION_DENIED,
            )
            assert details.endswith("test.Echo/Unary: needs scope admin")
    finally:
        await server.stop(0)


# -- refusing to start unauthenticated off loopback ---------------------------------------


def test_the_loopback_rule_for_authentication() -> None:
    base = {"listen": "0.0.0.0:50051", "http_listen": "127.0.0.1:0"}
    with pytest.raises(SecurityConfigError) as info:
        check_auth_required(ServerConfig(**base))
    assert str(info.value) == (
        "refusing to serve 0.0.0.0:50051 without authentication: it is not a loopback "
        "address; give --auth-tokens-file (see `flext-mesh tokens create`) or "
        "--tls-client-auth require, or --insecure to let anyone on the network call it"
    )
    check_auth_required(ServerConfig(**{**base, "listen": "127.0.0.1:50051"}))
    check_auth_required(ServerConfig(**{**base, "listen": "[::1]:50051"}))
    check_auth_required(ServerConfig(**base, insecure=True))
    check_auth_required(ServerConfig(**base, auth_tokens_file="/etc/flext-mesh/tokens.yaml"))
    check_auth_required(ServerConfig(**base, tls_client_auth="require"))


def test_serve_with_tls_but_no_authentication_off_loopback_refuses(
    tmp_path: Path, pki: Pki
) -> None:
    store = f"sqlite:///{tmp_path / 'mesh.db'}"
    tls = pki.serve_flags(pki.control_plane)
    proc = subprocess.run(
        [str(BIN / "flext-mesh"), "serve", "--listen", "0.0.0.0:0",
         "--http-listen", "127.0.0.1:0", "--store", store, *tls],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "flext-mesh: error: refusing to serve 0.0.0.0:0 without authentication: it is not a "
        "loopback address; give --auth-tokens-file (see `flext-mesh tokens create`) or "
        "--tls-client-auth require, or --insecure to let anyone on the network call it"
    ]
    # --insecure lets it start; it is reached on loopback only.
    server = start_serve(tmp_path, "--listen", "0.0.0.0:0", "--insecure", "--store", store, *tls)
    try:
        port = server.address.rsplit(":", 1)[1]
        security = pki.client()
        with open_channel(f"127.0.0.1:{port}", security, aio=False) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert server.terminate() == 0


async def test_xds_streams_need_a_discovery_scope(secured: Secured) -> None:
    """ADS is read like Discover: read or service scope; none: UNAUTHENTICATED."""
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2  # noqa: PLC0415

    from flext_mesh.xds.resources import LDS  # noqa: PLC0415

    async def first_answer(name: str | None) -> grpc.StatusCode:
        async with secured.channel(name) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources(
                iter([discovery_pb2.DiscoveryRequest(type_url=LDS, resource_names=["x"])]),
                timeout=1,
            )
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    assert await first_answer(None) == grpc.StatusCode.UNAUTHENTICATED
    # Allowed: nothing to say about "x"; the stream ends OK when the client half-closes.
    assert await first_answer("dashboard") == grpc.StatusCode.OK
    assert await first_answer("payment-sidecar") == grpc.StatusCode.OK
    assert await first_answer("ci") == grpc.StatusCode.PERMISSION_DENIED
