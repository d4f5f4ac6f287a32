"""``flext-mesh certs init`` and ``certs issue``: files that real TLS servers accept."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from flext_mesh.cli import main
from flext_mesh.rpc.channels import ClientSecurity, open_channel, server_credentials


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``flext-mesh ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def sans(path: Path) -> x509.SubjectAlternativeName:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_makes_a_ca_once_and_force_makes_a_new_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pki = tmp_path / "pki"
    code, out, _ = run(capsys, "certs", "init", "--dir", str(pki))
    assert code == 0
    assert out == f"wrote {pki}/ca.crt and {pki}/ca.key (CA, valid 365 days)\n"
    assert mode(pki / "ca.key") == 0o600
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    first = (pki / "ca.crt").read_bytes()

    code, out, _ = run(capsys, "certs", "init", "--dir", str(pki))
    assert code == 0
    assert "kept the CA already in" in out
    assert "--force" in out
    assert (pki / "ca.crt").read_bytes() == first

    (pki / "ca.key").chmod(0o644)  # a replaced key is 0600 again, whatever was there
    code, _, _ = run(capsys, "certs", "init", "--dir", str(pki), "--force")
    assert code == 0
    assert (pki / "ca.crt").read_bytes() != first
    assert mode(pki / "ca.key") == 0o600


def test_issue_names_loopback_by_default_and_the_service_identity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "certs", "init", "--dir", str(tmp_path))
    code, out, err = run(capsys, "certs", "issue", "payment", "--dir", str(tmp_path),
                         "--service", "payment", "--days", "7")  # fmt: skip
    assert code == 0, err
    assert "spiffe://flext-mesh/service/payment" in out
    assert mode(tmp_path / "payment.key") == 0o600
    names = sans(tmp_path / "payment.crt")
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://flext-mesh/service/payment"
    ]

    code, _, err = run(capsys, "certs", "issue", "edge", "--dir", str(tmp_path),
                       "--dns", "edge.mesh.internal", "--ip", "10.1.2.3",
                       "--spiffe", "spiffe://flext-mesh/admin/ci")  # fmt: skip
    assert code == 0, err
    names = sans(tmp_path / "edge.crt")
    assert names.get_values_for_type(x509.DNSName) == ["edge.mesh.internal"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://flext-mesh/admin/ci"
    ]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("issue", "x", "--dir", "{empty}"), 1, "no CA in {empty} (ca.crt and ca.key): run "
         "`flext-mesh certs init --dir {empty}` first"),
        (("issue", "payment", "--dir", "{dir}"), 1, "exists already; --force replaces them"),
        (("issue", "ca", "--dir", "{dir}"), 1, "is not a certificate name"),
        (("issue", "../up", "--dir", "{dir}"), 1, "is not a certificate name"),
        (("issue", "x", "--dir", "{dir}", "--ip", "300.1.1.1"), 2, "is not an IP address"),
        (("issue", "x", "--dir", "{dir}", "--spiffe", "http://x"), 2, "is not a SPIFFE id"),
        (("issue", "x", "--dir", "{dir}", "--service", "a", "--spiffe", "spiffe://t/a"), 2,
         "not allowed with argument"),
        (("init", "--dir", "{dir}", "--days", "0"), 2, "is not a number of days"),
    ],
)  # fmt: skip
def test_mistakes_are_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    code: int,
    message: str,
) -> None:
    pki, empty = tmp_path / "pki", tmp_path / "empty"
    run(capsys, "certs", "init", "--dir", str(pki))
    run(capsys, "certs", "issue", "payment", "--dir", str(pki))
    values = {"dir": str(pki), "empty": str(empty)}
    got, out, err = run(capsys, "certs", *(arg.format(**values) for arg in args))
    assert got == code
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert message.format(**values) in err


async def test_issued_files_work_for_a_tls_server_and_an_mtls_client(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path)
    run(capsys, "certs", "init", "--dir", d)
    run(capsys, "certs", "issue", "server", "--dir", d)
    run(capsys, "certs", "issue", "client", "--dir", d, "--service", "payment")
    credentials = server_credentials(f"{d}/server.crt", f"{d}/server.key", f"{d}/ca.crt", "require")
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        for host in ("127.0.0.1", "localhost"):  # both names of the default SANs
            security = ClientSecurity(
                tls_ca=f"{d}/ca.crt", tls_cert=f"{d}/client.crt", tls_key=f"{d}/client.key"
            )
            async with open_channel(f"{host}:{port}", security) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=3
                )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with open_channel(f"127.0.0.1:{port}", ClientSecurity(tls_ca=f"{d}/ca.crt")) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:  # no client certificate
                await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=3
                )
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)
