"""TLS and mTLS with real certificates: the control plane, a sidecar, the CLI, grpcurl."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flext_mesh.config import ServerConfig
from flext_mesh.facade.registry import ServiceRegistry
from flext_mesh.rpc.channels import (
    ClientSecurity,
    TransportError,
    is_loopback,
    open_channel,
    server_credentials,
    tls_problem,
)
from flext_mesh.server import ControlPlane, ServeError, create_server
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from sidecar.client import MeshClient
from sidecar.config import SidecarConfig
from sidecar.main import Sidecar, SidecarError
from tests.conftest import BIN, grpcurl_path, start_serve
from tests.security.conftest import Pki
from tests.sidecar.test_sidecar_process import start_sidecar


@contextlib.asynccontextmanager
async def tls_plane(tmp_path: Path, **settings: Any) -> AsyncIterator[ControlPlane]:
    """A control plane in this process on 127.0.0.1 with the given (TLS) settings."""
    defaults: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "store": f"sqlite:///{tmp_path / 'mesh.db'}",
        "grace_period": 0.5,
    }
    config = ServerConfig(**{**defaults, **settings})
    plane, _ = await create_server(config)
    try:
        yield plane
    finally:
        await plane.stop(0.2)


async def list_services(address: str, security: ClientSecurity | None) -> list[str]:
    async with open_channel(address, security) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        reply = await stub.ListServices(registry_pb2.ListServicesRequest(), timeout=3)
    return [service.service_name for service in reply.services]


async def refused(address: str, security: ClientSecurity | None) -> str:
    """The details of the UNAVAILABLE a client gets (fails the test if it got in)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await list_services(address, security)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    return info.value.details() or ""


async def grpcurl(*args: str) -> tuple[int, str]:
    proc = await asyncio.to_thread(
        subprocess.run,
        [grpcurl_path(), *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


# -- the control plane over TLS --------------------------------------------------------


async def test_tls_control_plane_answers_trusting_clients_only(tmp_path: Path, pki: Pki) -> None:
    async with tls_plane(tmp_path, **pki.serving(pki.control_plane)) as plane:
        address = f"127.0.0.1:{plane.port}"
        code, out = await grpcurl("-cacert", str(pki.ca), address, "list")
        assert code == 0, out
        assert {"flext_mesh.v1.RegistryService", "grpc.health.v1.Health"} <= set(out.split())

        # A refused connection is retried until -connect-timeout (10 s by default).
        code, out = await grpcurl("-plaintext", "-connect-timeout", "1", address, "list")
        assert code != 0, out
        code, out = await grpcurl(
            "-cacert", str(pki.untrusted_ca), "-connect-timeout", "1", address, "list"
        )
        assert code != 0
        assert "certificate signed by unknown authority" in out

        assert await list_services(address, pki.client()) == []
        await refused(address, None)  # plaintext client
        details = await refused(address, pki.client(ca=pki.untrusted_ca))
        assert tls_problem(details) == (
            "unable to get local issuer certificate (CERTIFICATE_VERIFY_FAILED)"
        )


async def test_mtls_require_refuses_clients_without_a_trusted_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    async with tls_plane(tmp_path, **pki.serving(pki.control_plane, "require")) as plane:
        address = f"127.0.0.1:{plane.port}"
        await refused(address, pki.client())  # TLS, no client certificate
        await refused(address, pki.client(pki.intruder))  # signed by the untrusted CA
        assert await list_services(address, pki.client(pki.admin)) == []
        code, out = await grpcurl(
            "-cacert", str(pki.ca), "-cert", str(pki.admin.cert), "-key", str(pki.admin.key),
            address, "list",
        )  # fmt: skip
        assert code == 0, out
        code, out = await grpcurl("-cacert", str(pki.ca), "-connect-timeout", "1", address, "list")
        assert code != 0, out


async def test_a_server_name_override_verifies_a_certificate_for_another_name(
    tmp_path: Path, pki: Pki
) -> None:
    named = pki.issue("named", dns_names=["cp.mesh.internal"], ip_addresses=())
    async with tls_plane(tmp_path, tls_cert=str(named.cert), tls_key=str(named.key)) as plane:
        address = f"127.0.0.1:{plane.port}"
        details = await refused(address, pki.client())
        assert tls_problem(details) == "the server's certificate is not valid for this host name"
        security = ClientSecurity(tls_ca=str(pki.ca), tls_server_name="cp.mesh.internal")
        assert await list_services(address, security) == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"listen": "0.0.0.0:0"}, "refusing to serve plaintext gRPC on 0.0.0.0:0"),
        ({"tls_cert": "{dir}/missing.crt", "tls_key": "{key}"}, "missing.crt: No such file"),
        ({"tls_cert": "{cert}", "tls_key": "{other_key}"}, "does not match the certificate"),
        ({"tls_cert": "{cert}"}, "--tls-cert needs --tls-key too"),
        ({"tls_cert": "{ca}", "tls_key": "{key}"}, "does not match the certificate"),
        ({"tls_cert": "{key}", "tls_key": "{key}"}, "holds no PEM certificate"),
        (
            {"tls_cert": "{cert}", "tls_key": "{key}", "tls_client_auth": "require"},
            "--tls-client-auth require needs --tls-ca",
        ),
        (
            {"tls_cert": "{cert}", "tls_key": "{key}", "tls_ca": "{ca}",
             "tls_client_auth": "optional"},
            "--tls-client-auth optional is not supported",
        ),
        ({"tls_ca": "{dir}/nope.pem"}, "--tls-ca"),  # the CA of outbound calls, checked too
    ],
)  # fmt: skip
async def test_unusable_tls_settings_stop_the_start_with_one_clear_message(
    tmp_path: Path, pki: Pki, settings: dict[str, str], message: str
) -> None:
    paths = {
        "dir": str(pki.dir),
        "cert": str(pki.control_plane.cert),
        "key": str(pki.control_plane.key),
        "other_key": str(pki.admin.key),
        "ca": str(pki.ca),
    }
    resolved = {name: value.format(**paths) for name, value in settings.items()}
    with pytest.raises(ServeError) as info:
        async with tls_plane(tmp_path, **resolved):
            pass
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_serve_refuses_plaintext_off_loopback_unless_insecure(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mesh.db'}"
    proc = subprocess.run(
        [str(BIN / "flext-mesh"), "serve", "--listen", "0.0.0.0:0",
         "--http-listen", "127.0.0.1:0", "--store", store],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "flext-mesh: error: refusing to serve plaintext gRPC on 0.0.0.0:0, which is not a "
        "loopback address: give --tls-cert and --tls-key (see `flext-mesh certs`), or "
        "--insecure to allow plaintext on the network"
    ]
    # --insecure is a plain switch; the server is reached on loopback only.
    server = start_serve(tmp_path, "--listen", "0.0.0.0:0", "--insecure", "--store", store)
    try:
        port = server.address.rsplit(":", 1)[1]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert server.terminate() == 0


async def test_a_sidecar_refuses_plaintext_off_loopback_before_binding() -> None:
    config = SidecarConfig(
        service="payment", app="tests.sidecar.apps:PROCESSORS", listen="0.0.0.0:0"
    )
    sidecar = Sidecar(config)
    with pytest.raises(SidecarError, match=r"refusing to serve plaintext gRPC on 0\.0\.0\.0:0"):
        await sidecar.start()
    assert sidecar.port == 0


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("[::]", False),
        ("", False),
        ("10.0.0.5", False),
        ("mesh.example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# -- a sidecar with mTLS ----------------------------------------------------------------


async def _instance(address: str, security: ClientSecurity) -> registry_pb2.ServiceInstance | None:
    async with open_channel(address, security) as channel:
        try:
            reply = await registry_pb2_grpc.RegistryServiceStub(channel).Discover(
                registry_pb2.DiscoverRequest(service_name="payment", healthy_only=False), timeout=3
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:  # no instance registered (yet)
                return None
            raise
    return reply.instances[0] if reply.instances else None


async def test_an_mtls_sidecar_registers_is_health_checked_and_serves_mesh_calls(
    tmp_path: Path, pki: Pki
) -> None:
    async with tls_plane(
        tmp_path, health_check_interval=0.3, **pki.serving(pki.control_plane, "require")
    ) as plane:
        address = f"127.0.0.1:{plane.port}"
        admin = pki.client(pki.admin)
        sidecar = await asyncio.to_thread(
            start_sidecar, tmp_path, address, *pki.serve_flags(pki.payment, "require")
        )
        try:
            instance = None
            for _ in range(100):  # registered, then SERVING after the control plane's check
                instance = await _instance(address, admin)
                if instance and instance.health == registry_pb2.HEALTH_STATUS_SERVING:
                    break
                await asyncio.sleep(0.1)
            assert instance is not None, sidecar.log()
            assert instance.health == registry_pb2.HEALTH_STATUS_SERVING, sidecar.log()

            client = MeshClient(address, security=admin)
            await client.start(wait=5)
            try:
                reply = await client.call(
                    "payment", "charge", {"customer_id": "c1", "amount": 12.5}, timeout=5
                )
            finally:
                await client.aclose()
            assert reply["charged"] == 12.5

            # The sidecar itself refuses callers without a trusted certificate.
            async with open_channel(sidecar.address, pki.client(pki.intruder)) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=3
                    )
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE

            await asyncio.sleep(1.0)  # three more rounds of checks over mTLS
            still = await _instance(address, admin)
            assert still is not None
            assert still.health == registry_pb2.HEALTH_STATUS_SERVING
        finally:
            sidecar.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(sidecar.proc.wait, 15)
        assert code == 0, sidecar.log()
        assert await _instance(address, admin) is None, "deregistered over mTLS on SIGTERM"


# -- the CLI and the client library ----------------------------------------------------


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``flext-mesh args...`` in our environment (without GRPC_VERBOSITY) plus ``env``."""
    ours = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    return subprocess.run(
        [str(BIN / "flext-mesh"), *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
        env={**ours, **env},
    )


def _error_lines(stderr: str) -> list[str]:
    """The lines on stderr, each of them ours (none of gRPC's C core: ``I1207 ...``)."""
    lines = stderr.splitlines()
    assert [line for line in lines if not line.startswith("flext-mesh: ")] == []
    return lines


# What gRPC's C core logs: severity, month and day (``I1207 12:00:00.000000 ...``).
_GRPC_CORE_LINE = re.compile(r"^[IEWF]\d{4} ", re.MULTILINE)


async def test_cli_talks_tls_with_tls_ca_and_says_what_is_wrong_without(
    tmp_path: Path, pki: Pki
) -> None:
    async with tls_plane(tmp_path, **pki.serving(pki.control_plane)) as plane:
        address = f"127.0.0.1:{plane.port}"
        base = ("services", "list", "--control-plane", address, "--timeout", "5")
        ok = await asyncio.to_thread(_cli, *base, "--tls-ca", str(pki.ca))
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.split()[0] == "NAME"

        plain = await asyncio.to_thread(_cli, *base)
        assert plain.returncode == 1
        assert "Traceback" not in plain.stderr
        assert _error_lines(plain.stderr) == [
            f"flext-mesh: error: cannot reach the control plane at {address}: connection "
            "closed (if it serves TLS, give --tls-ca)"
        ]

        untrusted = await asyncio.to_thread(_cli, *base, "--tls-ca", str(pki.untrusted_ca))
        assert untrusted.returncode == 1
        assert "Traceback" not in untrusted.stderr
        assert _error_lines(untrusted.stderr) == [
            f"flext-mesh: error: TLS handshake with {address} failed: unable to get local "
            "issuer certificate (CERTIFICATE_VERIFY_FAILED) (check --tls-ca)"
        ]

        missing = await asyncio.to_thread(_cli, *base, "--tls-ca", str(tmp_path / "no.pem"))
        assert missing.returncode == 1
        assert _error_lines(missing.stderr) == [
            f"flext-mesh: error: --tls-ca {tmp_path / 'no.pem'}: No such file or directory"
        ]


async def test_a_failed_handshake_is_one_line_without_grpc_core_logs_unless_asked(
    tmp_path: Path, pki: Pki
) -> None:
    async with tls_plane(tmp_path, **pki.serving(pki.control_plane)) as plane:
        address = f"127.0.0.1:{plane.port}"
        base = ("services", "list", "--control-plane", address, "--tls-ca", str(pki.untrusted_ca))
        quiet, asked = await asyncio.gather(
            asyncio.to_thread(_cli, *base),
            # A GRPC_VERBOSITY the user set is theirs: the core's lines show.
            asyncio.to_thread(_cli, *base, GRPC_VERBOSITY="INFO"),
        )
    clean = (
        f"flext-mesh: error: TLS handshake with {address} failed: unable to get local "
        "issuer certificate (CERTIFICATE_VERIFY_FAILED) (check --tls-ca)\n"
    )
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (1, "", clean)
    assert asked.returncode == 1
    assert asked.stderr.endswith(clean)
    assert _GRPC_CORE_LINE.search(asked.stderr), asked.stderr


async def test_the_cli_takes_its_tls_settings_from_the_environment(
    tmp_path: Path, pki: Pki
) -> None:
    async with tls_plane(tmp_path, **pki.serving(pki.control_plane, "require")) as plane:
        address = f"127.0.0.1:{plane.port}"
        env = {
            "FLEXT_MESH_CONTROL_PLANE": address,
            "FLEXT_MESH_TLS_CA": str(pki.ca),
            "FLEXT_MESH_TLS_CERT": str(pki.admin.cert),
            "FLEXT_MESH_TLS_KEY": str(pki.admin.key),
        }
        proc = await asyncio.to_thread(
            subprocess.run,
            [str(BIN / "flext-mesh"), "services", "list", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
            env={"PATH": "/usr/bin:/bin", **env},
        )
        assert proc.returncode == 0, proc.stderr


async def test_the_facade_registers_and_discovers_over_mtls(tmp_path: Path, pki: Pki) -> None:
    async with tls_plane(tmp_path, **pki.serving(pki.control_plane, "require")) as plane:
        address = f"127.0.0.1:{plane.port}"
        registry = ServiceRegistry(address, timeout=5, security=pki.client(pki.payment))
        try:
            registered = await registry.aregister({"name": "payment", "endpoint": "127.0.0.1:9"})
            assert registered.is_success, registered.error
            found = await registry.adiscover("payment")
            assert found.is_success, found.error
        finally:
            await registry.aclose()
        without = ServiceRegistry(address, timeout=2, security=pki.client())
        try:
            failed = await without.adiscover("payment")
        finally:
            await without.aclose()
        assert failed.is_failure
        assert failed.code == "UNAVAILABLE"


def test_unusable_client_files_fail_before_any_call(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TransportError, match=r"no-ca\.pem: No such file"):
        open_channel("127.0.0.1:1", ClientSecurity(tls_ca=str(tmp_path / "no-ca.pem")))
    mismatched = ClientSecurity(
        tls_ca=str(pki.ca), tls_cert=str(pki.admin.cert), tls_key=str(pki.payment.key)
    )
    with pytest.raises(TransportError, match="does not match the certificate"):
        mismatched.check()


def test_client_security_from_env_reads_the_flext_mesh_variables() -> None:
    security = ClientSecurity.from_env(
        {
            "FLEXT_MESH_TLS_CA": "ca.pem",
            "FLEXT_MESH_TLS_CERT": "me.crt",
            "FLEXT_MESH_TLS_KEY": "me.key",
            "FLEXT_MESH_TLS_SERVER_NAME": "cp.internal",
            "FLEXT_MESH_TOKEN": "t0ken",
        }
    )
    assert security == ClientSecurity(
        tls_ca="ca.pem",
        tls_cert="me.crt",
        tls_key="me.key",
        tls_server_name="cp.internal",
        token="t0ken",
    )
    assert security.tls
    assert "t0ken" not in repr(security)
    assert not ClientSecurity.from_env({}).tls


# -- the bearer token on every kind of call --------------------------------------------


@contextlib.asynccontextmanager
async def echo_server(
    credentials: grpc.ServerCredentials | None = None,
) -> AsyncIterator[tuple[int, list[str]]]:
    """A real server whose four methods (unary/stream in and out) record the
    ``authorization`` header they receive; yields (port, headers seen)."""
    seen: list[str] = []

    def header(context: grpc.aio.ServicerContext[Any, Any]) -> str:
        return dict(context.invocation_metadata() or ()).get("authorization", "")

    async def unary_unary(request: bytes, context: Any) -> bytes:
        seen.append(header(context))
        return request

    async def unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        seen.append(header(context))
        yield request

    async def stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
        seen.append(header(context))
        return b"".join([item async for item in requests])

    async def stream_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        seen.append(header(context))
        async for item in requests:
            yield item

    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "UU": grpc.unary_unary_rpc_method_handler(unary_unary),
            "US": grpc.unary_stream_rpc_method_handler(unary_stream),
            "SU": grpc.stream_unary_rpc_method_handler(stream_unary),
            "SS": grpc.stream_stream_rpc_method_handler(stream_stream),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port, seen
    finally:
        await server.stop(0)


async def test_the_token_rides_on_every_kind_of_aio_call_plaintext_and_tls(pki: Pki) -> None:
    tls = server_credentials(str(pki.control_plane.cert), str(pki.control_plane.key))
    for credentials, security in (
        (None, ClientSecurity(token="t-1")),
        (tls, pki.client(token="t-1")),
    ):
        async with echo_server(credentials) as (port, seen):
            async with open_channel(f"127.0.0.1:{port}", security) as channel:
                assert await channel.unary_unary("/test.Echo/UU")(b"a", timeout=3) == b"a"
                assert [r async for r in channel.unary_stream("/test.Echo/US")(b"b")] == [b"b"]
                assert await channel.stream_unary("/test.Echo/SU")(iter([b"c", b"d"])) == b"cd"
                call = channel.stream_stream("/test.Echo/SS")()  # written like KeepAlive
                await call.write(b"e")
                assert await call.read() == b"e"
                await call.done_writing()
                # A caller's own authorization header is kept, not doubled.
                await channel.unary_unary("/test.Echo/UU")(
                    b"f", metadata=(("authorization", "Bearer mine"),), timeout=3
                )
            assert seen == ["Bearer t-1"] * 4 + ["Bearer mine"]


async def test_the_token_rides_on_every_kind_of_sync_call() -> None:
    async with echo_server() as (port, seen):

        def calls() -> None:
            with open_channel(f"127.0.0.1:{port}", ClientSecurity(token="t-2"), aio=False) as ch:
                assert ch.unary_unary("/test.Echo/UU")(b"a", timeout=3) == b"a"
                assert list(ch.unary_stream("/test.Echo/US")(b"b", timeout=3)) == [b"b"]
                assert ch.stream_unary("/test.Echo/SU")(iter([b"c"]), timeout=3) == b"c"
                assert list(ch.stream_stream("/test.Echo/SS")(iter([b"d"]), timeout=3)) == [b"d"]
            with open_channel(f"127.0.0.1:{port}", aio=False) as ch:  # no token: no header
                ch.unary_unary("/test.Echo/UU")(b"a", timeout=3)

        await asyncio.to_thread(calls)
    assert seen == ["Bearer t-2"] * 4 + [""]
