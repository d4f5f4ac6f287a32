"""A refused registration is loud: real sidecars against a real control plane whose
tokens file says who may register what.

At start, a refusal is one line and exit 2; later (a token revoked while the sidecar
runs) it is one ERROR, health NOT_SERVING, registration retried with backoff until
the control plane accepts it again, and nothing left behind for asyncio to complain
about. The control plane logs each refusal at INFO, naming the client, never its token.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flext_mesh.rpc.channels import ClientSecurity, open_channel
from flext_mesh.security.certs import spiffe_id
from flext_mesh.security.tokens import add_token, load_entries, write_entries
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from tests.conftest import BIN, REPO, ServeProcess, start_serve
from tests.security.conftest import Pki, pki  # noqa: F401 - the session's certificates
from tests.sidecar.test_sidecar_process import start_sidecar

pytestmark = pytest.mark.xdist_group("refusals")

#: What asyncio and grpc print when tasks or loops are left behind.
LEFT_BEHIND = (
    "Task was destroyed",
    "Event loop is closed",
    "ERROR asyncio",
    "Task exception was never retrieved",
    "was never awaited",
    "Traceback",
)


@dataclass
class Mesh:
    """A control plane with authentication, its tokens file and the tokens it knows."""

    plane: ServeProcess
    tokens_file: Path
    tokens: dict[str, str]

    @property
    def address(self) -> str:
        return self.plane.address


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    directory = tmp_path_factory.mktemp("refusals")
    tokens_file = directory / "tokens.yaml"
    tokens = {
        name: add_token(tokens_file, name, scopes)
        for name, scopes in {
            "operator": ["admin"],
            "orders-sidecar": ["service:orders"],
        }.items()
    }
    plane = start_serve(
        directory, "--auth-tokens-file", str(tokens_file), "--health-check-interval", "0.5"
    )
    try:
        yield Mesh(plane, tokens_file, tokens)
    finally:
        if plane.proc.poll() is None:
            plane.kill()


def run_sidecar(mesh: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``flext-sidecar`` for service payment until it exits (bounded)."""
    return subprocess.run(
        [
            str(BIN / "flext-sidecar"),
            "--service",
            "payment",
            "--app",
            "tests.sidecar.apps:PROCESSORS",
            "--control-plane",
            mesh.address,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def discovered(mesh: Mesh) -> set[str]:
    """Instance ids of payment the control plane lists (healthy or not)."""
    security = ClientSecurity(token=mesh.tokens["operator"])
    with open_channel(mesh.address, security, aio=False) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        try:
            reply = stub.Discover(
                registry_pb2.DiscoverRequest(service_name="payment", healthy_only=False),
                timeout=5,
            )
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                return set()
            raise
    return {instance.instance_id for instance in reply.instances}


def accepted(mesh: Mesh, token: str) -> bool:
    """Whether the control plane takes ``token`` (for a read its scope allows)."""
    with open_channel(mesh.address, ClientSecurity(token=token), aio=False) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        try:
            stub.ListServices(registry_pb2.ListServicesRequest(), timeout=5)
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.UNAUTHENTICATED:
                raise
            return False
    return True


def health(address: str) -> int:
    """The sidecar's overall grpc.health.v1 status."""
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return reply.status


def wait_until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("credentials", "reason"),
    [
        (
            lambda mesh: ["--token", mesh.tokens["orders-sidecar"]],
            "PERMISSION_DENIED: token 'orders-sidecar' (scopes: service:orders) may not "
            "register instances of 'payment': needs scope admin or service:payment",
        ),
        (
            lambda mesh: ["--token", "fm_" + "x" * 43],
            "UNAUTHENTICATED: invalid bearer token: unknown or revoked",
        ),
        (
            lambda mesh: ["--token", mesh.tokens["operator"], "--label", "bad key=1"],
            "INVALID_ARGUMENT: invalid request: instance.labels['bad key']: key must be 1-63 "
            "letters, digits, '.', '_', '/' or '-'",
        ),
    ],
    ids=["permission-denied", "unauthenticated", "invalid-argument"],
)
def test_a_registration_refused_at_start_exits_2_with_one_line_naming_the_reason(
    mesh: Mesh, credentials: Callable[[Mesh], list[str]], reason: str
) -> None:
    done = run_sidecar(mesh, *credentials(mesh))

    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"flext-sidecar: error: the control plane at {mesh.address} refused to register "
        f"service 'payment': {reason}"
    ], done.stderr
    for sign in LEFT_BEHIND:
        assert sign not in done.stderr, done.stderr
    assert discovered(mesh) == set(), "it never joined the mesh"


def test_the_control_plane_logs_refusals_at_info_naming_the_client_not_the_token(
    mesh: Mesh,
) -> None:
    bad = "fm_" + "z" * 43
    run_sidecar(mesh, "--token", mesh.tokens["orders-sidecar"])
    run_sidecar(mesh, "--token", bad)
    run_sidecar(mesh, "--token", mesh.tokens["operator"], "--label", "bad key=1")

    log = mesh.plane.log()
    assert re.search(
        r" INFO flext_mesh\.security\.auth permission denied "
        r"method=flext_mesh\.v1\.RegistryService/Register client=token:orders-sidecar "
        r"reason=token 'orders-sidecar' \(scopes: service:orders\) may not register",
        log,
    ), log
    assert re.search(
        r" INFO flext_mesh\.security\.auth unauthenticated "
        r"method=flext_mesh\.v1\.RegistryService/Register client=address:127\.0\.0\.1 "
        r"reason=invalid bearer token: unknown or revoked",
        log,
    ), log
    assert re.search(
        r" INFO flext_mesh\.security\.auth invalid registration "
        r"method=flext_mesh\.v1\.RegistryService/Register client=token:operator "
        r"reason=invalid request: instance\.labels\['bad key'\]: key must be",
        log,
    ), log
    for token in (*mesh.tokens.values(), bad):
        assert token[3:] not in log


def test_a_revoked_token_is_one_error_not_serving_and_registration_retried(
    mesh: Mesh, tmp_path: Path
) -> None:
    token = add_token(mesh.tokens_file, "payment-sidecar", ["service:payment"])
    entry = next(e for e in load_entries(mesh.tokens_file) if e.name == "payment-sidecar")
    # The control plane reads the file again within a second: until then the new token
    # is refused (and a sidecar refused at start exits).
    wait_until(lambda: accepted(mesh, token), 5, "the control plane knows the new token")
    sidecar = start_sidecar(tmp_path, mesh.address, "--token", token)  # TTL 2 s
    try:
        wait_until(lambda: sidecar.instance in discovered(mesh), 15, "registered")
        assert health(sidecar.address) == health_pb2.HealthCheckResponse.SERVING

        revoke = ["tokens", "revoke", "payment-sidecar", "--file", str(mesh.tokens_file)]
        subprocess.run(
            [str(BIN / "flext-mesh"), *revoke], capture_output=True, timeout=30, check=True
        )
        revoked_at = time.monotonic()
        wait_until(lambda: "registration refused" in sidecar.log(), 10, "refusal logged")
        noticed = time.monotonic() - revoked_at
        assert health(sidecar.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        # Not renewed any more: it leaves the registry when its lease runs out.
        wait_until(lambda: sidecar.instance not in discovered(mesh), 10, "lease expired")
        refusal_lines = [
            line for line in sidecar.log().splitlines() if "registration refused" in line
        ]
        assert len(refusal_lines) == 1, sidecar.log()
        assert (
            " ERROR flext_sidecar.membership registration refused by the control plane: "
            "UNAUTHENTICATED: invalid bearer token: unknown or revoked;" in refusal_lines[0]
        ), refusal_lines

        # Put the same token back: the sidecar's next try registers it again.
        write_entries(mesh.tokens_file, [*load_entries(mesh.tokens_file), entry])
        restored_at = time.monotonic()
        wait_until(lambda: sidecar.instance in discovered(mesh), 20, "registered again")
        back = time.monotonic() - restored_at
        wait_until(
            lambda: health(sidecar.address) == health_pb2.HealthCheckResponse.SERVING,
            5,
            "SERVING again",
        )
        print(f"\nrefusal noticed in {noticed:.2f}s; registered {back:.2f}s after the fix")
    finally:
        sidecar.proc.send_signal(signal.SIGTERM)
        code = sidecar.proc.wait(30)
    log = sidecar.log()
    assert code == 0, log
    assert "registration accepted again after a refusal" in log
    assert len(re.findall(r"registration refused", log)) == 1, log
    for sign in LEFT_BEHIND:
        assert sign not in log, log
    assert token[3:] not in log


def test_a_certificate_not_allowed_to_register_exits_2_naming_its_identity(
    tmp_path: Path,
    pki: Pki,  # noqa: F811 - the fixture imported above
) -> None:
    orders = pki.issue("orders-sidecar", uris=[spiffe_id("service", "orders")])
    plane = start_serve(tmp_path, *pki.serve_flags(pki.control_plane, "require"))
    try:
        done = run_sidecar(Mesh(plane, tmp_path / "none", {}), *pki.serve_flags(orders))
    finally:
        plane.kill()
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"flext-sidecar: error: the control plane at {plane.address} refused to register "
        "service 'payment': PERMISSION_DENIED: certificate 'spiffe://flext-mesh/service/orders' "
        "(scopes: service:orders) may not register instances of 'payment': needs scope admin "
        "or service:payment"
    ), done.stderr
    for sign in LEFT_BEHIND:
        assert sign not in done.stderr, done.stderr
    assert re.search(
        r" INFO flext_mesh\.security\.auth permission denied method=flext_mesh\.v1\."
        r"RegistryService/Register client=certificate:spiffe://flext-mesh/service/orders ",
        plane.log(),
    ), plane.log()
