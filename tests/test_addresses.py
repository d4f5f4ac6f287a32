"""Several control-plane addresses as one gRPC target, and clients failing over."""

from __future__ import annotations

import socket

import pytest

from flext_mesh.addresses import AddressError, grpc_target, split_addresses
from tests.conftest import ServeProcess
from tests.integration.test_cli_services import cli


def test_one_address_is_passed_as_is_and_several_become_one_target() -> None:
    assert grpc_target("127.0.0.1:50051") == "127.0.0.1:50051"
    assert grpc_target("mesh.internal:50051") == "mesh.internal:50051"  # DNS fails over
    assert grpc_target("127.0.0.1:1,127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert grpc_target("[::1]:1, [::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert grpc_target("localhost:1,127.0.0.1:2").startswith("ipv4:127.0.0.1:1,")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "names no HOST:PORT"),
        ("127.0.0.1", "is not HOST:PORT"),
        ("127.0.0.1:1,127.0.0.1:70000", "outside"),
        ("127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"),
    ],
)
def test_bad_address_lists_say_what_is_wrong(value: str, problem: str) -> None:
    with pytest.raises(AddressError, match=problem):
        grpc_target(value)


def test_split_addresses_strips_brackets_and_blanks() -> None:
    assert split_addresses("a:1,,[::1]:2 ") == [("a", 1), ("::1", 2)]


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_cli_moves_past_a_dead_replica(serve_process: ServeProcess) -> None:
    addresses = f"127.0.0.1:{_dead_port()},{serve_process.address}"
    result = cli("services", "list", "--control-plane", addresses)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("NAME")
