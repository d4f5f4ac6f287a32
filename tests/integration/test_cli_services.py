"""``flext-mesh services ...`` as an operator runs it, against a real ``flext-mesh serve``."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from flext_mesh.cli.output import render_table
from flext_mesh.cli.services import INSTANCE_HEADERS, SERVICE_HEADERS, health_text
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from tests.conftest import BIN, start_serve

# Fast active checks, so that instances on closed ports turn NOT_SERVING at once.
_SERVE_ENV = {
    "FLEXT_MESH_HEALTH_CHECK_INTERVAL": "0.2",
    "FLEXT_MESH_HEALTH_CHECK_TIMEOUT": "0.2",
    "FLEXT_MESH_HEALTH_UNHEALTHY_THRESHOLD": "1",
}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def cli_command(*args: str) -> list[str]:
    """The real ``flext-mesh`` console script with ``args``."""
    return [str(BIN / "flext-mesh"), *args]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI run: ours, without FLEXT_MESH_* leaking in, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXT_MESH_")}
    return {**env, **extra}


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``flext-mesh args...`` and capture what a user would see."""
    return subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=cli_env(**env),
    )


def table(stdout: str) -> list[list[str]]:
    """The rows of a printed table (header first), split on the column gaps; the lines
    ``services discover`` prints above its table are left out."""
    return [
        re.split(r"\s{2,}", line)
        for line in stdout.splitlines()
        if line and not line.startswith(("strategy: ", "note: "))
    ]


def rows_by_first_cell(stdout: str) -> dict[str, list[str]]:
    """Data rows of a printed table keyed by their first cell."""
    return {row[0]: row for row in table(stdout)[1:]}


def register(
    stub: registry_pb2_grpc.RegistryServiceStub,
    service: str,
    instance_id: str,
    port: int,
    *,
    weight: int = 100,
    mode: registry_pb2.HealthCheckMode.ValueType = registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
    **fields: object,
) -> None:
    """Register one instance with a one-minute lease."""
    instance = registry_pb2.ServiceInstance(
        service_name=service,
        instance_id=instance_id,
        endpoint=f"127.0.0.1:{port}",
        weight=weight,
        health_check_mode=mode,
        **fields,  # type: ignore[arg-type]
    )
    stub.Register(
        registry_pb2.RegisterRequest(instance=instance, ttl=Duration(seconds=60)), timeout=10
    )


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A control plane with two services, ``payment`` (healthy) and ``ledger`` (1 of 3).

    payment: pay-a (weight 1, 1.0, eu-1a, tier=silver), pay-b (weight 3, 1.1, eu-1b,
    tier=gold). ledger: led-1 SERVING; led-2 and led-3 checked over gRPC on closed
    ports, so NOT_SERVING, which puts ledger's discovery in panic mode.
    """
    server = start_serve(tmp_path_factory.mktemp("cli-services"), env=_SERVE_ENV)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            register(
                stub,
                "payment",
                "pay-a",
                7001,
                weight=1,
                version="1.0",
                zone="eu-1a",
                type="payment",
                labels={"tier": "silver", "canary": "no"},
            )
            register(
                stub,
                "payment",
                "pay-b",
                7002,
                weight=3,
                version="1.1",
                zone="eu-1b",
                type="payment",
                labels={"tier": "gold"},
            )
            register(stub, "ledger", "led-1", 7101, type="store")
            for instance_id in ("led-2", "led-3"):
                register(
                    stub,
                    "ledger",
                    instance_id,
                    closed_port(),
                    mode=registry_pb2.HEALTH_CHECK_MODE_GRPC,
                    type="store",
                )
            deadline = time.monotonic() + 15
            while True:
                page = stub.ListServices(registry_pb2.ListServicesRequest(), timeout=10)
                ledger = next(s for s in page.services if s.service_name == "ledger")
                if ledger.unhealthy_count == 2:
                    break
                assert time.monotonic() < deadline, f"ledger never turned unhealthy: {ledger}"
                time.sleep(0.05)
        yield server.address
    finally:
        server.kill()


# -- services list ---------------------------------------------------------------------


def test_list_prints_an_aligned_row_per_service(address: str) -> None:
    run = cli("services", "list", "--control-plane", address)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    header, *lines = run.stdout.splitlines()
    assert header.split() == list(SERVICE_HEADERS)
    rows = rows_by_first_cell(run.stdout)
    assert list(rows) == ["ledger", "payment"]
    assert rows["ledger"] == ["ledger", "3", "1", "2", "0", "0", "-", "store"]
    assert rows["payment"] == ["payment", "2", "2", "0", "0", "0", "1.0,1.1", "payment"]
    # Columns line up under their headers.
    for title in ("INSTANCES", "VERSIONS", "TYPES"):
        column = header.index(title)
        assert all(line[column - 1] == " " and line[column] != " " for line in lines), title


def test_list_json_reads_the_address_from_the_environment_and_filters_by_type(
    address: str,
) -> None:
    run = cli("services", "list", "-o", "json", "--type", "store", FLEXT_MESH_CONTROL_PLANE=address)
    assert run.returncode == 0, run.stderr
    summaries = json.loads(run.stdout)
    assert [s["service_name"] for s in summaries] == ["ledger"]
    assert summaries[0]["instance_count"] == 3
    assert summaries[0]["healthy_count"] == 1
    assert summaries[0]["unhealthy_count"] == 2
    assert summaries[0]["ejected_count"] == 0
    assert summaries[0]["types"] == ["store"]


# -- services show ---------------------------------------------------------------------


def test_show_prints_every_instance_sorted_by_id(address: str) -> None:
    run = cli("services", "show", "payment", "--control-plane", address)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].split() == list(INSTANCE_HEADERS)
    rows = rows_by_first_cell(run.stdout)
    assert list(rows) == ["pay-a", "pay-b"]
    assert rows["pay-a"] == [
        "pay-a",
        "127.0.0.1:7001",
        "1.0",
        "eu-1a",
        "SERVING",
        "1",
        "1.0",
        "-",
        "100.0",
        "canary=no,tier=silver",
    ]
    assert rows["pay-b"][4:7] == ["SERVING", "3", "3.0"]


def test_show_includes_unhealthy_instances(address: str) -> None:
    run = cli("services", "show", "ledger", "--control-plane", address)
    assert run.returncode == 0, run.stderr
    rows = rows_by_first_cell(run.stdout)
    assert {k: v[4] for k, v in rows.items()} == {
        "led-1": "SERVING",
        "led-2": "NOT_SERVING",
        "led-3": "NOT_SERVING",
    }
    assert rows["led-2"][6] == "0.0"  # no effective weight while NOT_SERVING


def test_show_json_has_the_instances(address: str) -> None:
    run = cli("services", "show", "payment", "-o", "json", "--control-plane", address)
    assert run.returncode == 0, run.stderr
    instances = json.loads(run.stdout)
    assert [i["instance_id"] for i in instances] == ["pay-a", "pay-b"]
    assert instances[1]["labels"] == {"tier": "gold"}
    assert instances[1]["health"] == "HEALTH_STATUS_SERVING"
    assert instances[1]["weight"] == 3
    assert instances[1]["ejected"] is False


# -- services discover -----------------------------------------------------------------


def test_discover_weighted_round_robin_picks_both_instances_over_calls(address: str) -> None:
    command = cli_command("services", "discover", "payment", "--strategy", "weighted_round_robin")
    command += ["--control-plane", address]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    picks = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        rows = table(out)[1:]
        assert sorted(row[0] for row in rows) == ["pay-a", "pay-b"]
        picks.append(rows[0][0])
    # Weights 1 and 3: four consecutive picks hold pay-a once and pay-b three times.
    assert set(picks) == {"pay-a", "pay-b"}
    assert picks.count("pay-b") > picks.count("pay-a")


def test_discover_label_selector_filters(address: str) -> None:
    run = cli("services", "discover", "payment", "--label", "tier=gold", "--control-plane", address)
    assert run.returncode == 0, run.stderr
    assert list(rows_by_first_cell(run.stdout)) == ["pay-b"]


def test_discover_notes_panic_mode_above_the_table(address: str) -> None:
    run = cli("services", "discover", "ledger", "--control-plane", address)
    assert run.returncode == 0, run.stderr
    summary, first, header, *rows = run.stdout.splitlines()
    assert summary.split("   ")[0] == "strategy: WEIGHTED_ROUND_ROBIN"  # the default
    assert summary.endswith("panic mode: yes")
    assert first.startswith("note: panic mode: 1 of 3 instances healthy")
    assert header.split() == list(INSTANCE_HEADERS)
    assert len(rows) == 3


def test_discover_json_has_instances_panic_mode_notes_and_revision(address: str) -> None:
    run = cli("services", "discover", "ledger", "-o", "json", "--control-plane", address)
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["panic_mode"] is True
    assert sorted(i["instance_id"] for i in answer["instances"]) == ["led-1", "led-2", "led-3"]
    assert "panic mode" in answer["notes"][0]
    assert int(answer["revision"]) > 0


# -- services explain ------------------------------------------------------------------


def test_explain_shows_each_instance_factors_and_whether_it_is_picked(address: str) -> None:
    run = cli("services", "explain", "payment", "--control-plane", address)
    assert run.returncode == 0, run.stderr
    summary, header, *rows = run.stdout.splitlines()
    assert summary.startswith("strategy: WEIGHTED_ROUND_ROBIN")
    assert header.split("   ")[0] == "INSTANCE"
    cells = {row.split()[0]: row.split() for row in rows}
    assert sorted(cells) == ["pay-a", "pay-b"]
    # INSTANCE VERSION ZONE BASE HEALTH(2 words) LATENCY ERRORS EFFECTIVE SPLIT IN-ANSWER
    assert cells["pay-a"][1:4] == ["1.0", "eu-1a", "1"]
    assert cells["pay-b"][3] == "3"
    assert cells["pay-b"][-1] == "yes"


def test_explain_one_unhealthy_instance_factor_by_factor(address: str) -> None:
    run = cli("services", "explain", "ledger", "led-2", "--control-plane", address)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(":", 1) for line in run.stdout.splitlines()[1:])
    assert lines["health"].strip() == "x0 (NOT_SERVING)"
    assert lines["effective"].strip() == "0.0"
    assert lines["traffic split"].strip() == "none"
    # Panic mode: too few healthy instances, so the answer holds all of them.
    assert lines["in the answer"].strip() == "yes"
    assert run.stdout.splitlines()[0].endswith("panic mode: yes")


def test_explain_json_and_an_unknown_instance(address: str) -> None:
    run = cli("services", "explain", "payment", "-o", "json", "--control-plane", address)
    assert run.returncode == 0, run.stderr
    explained = {e["instance_id"]: e for e in json.loads(run.stdout)}
    assert explained["pay-b"]["base_weight"] == 3
    assert explained["pay-b"]["latency_factor"] == 1.0
    assert explained["pay-b"]["in_answer"] is True
    missing = cli("services", "explain", "payment", "pay-z", "--control-plane", address)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "flext-mesh: error: service 'payment' has no instance 'pay-z'"


# -- errors ----------------------------------------------------------------------------


def test_unknown_service_exits_1_with_one_line(address: str) -> None:
    run = cli("services", "show", "nope", "--control-plane", address)
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr == "flext-mesh: error: service 'nope' has no registered instance\n"


def test_invalid_argument_lists_the_field_violations(address: str) -> None:
    run = cli("services", "discover", "bad!name", "--control-plane", address)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1
    assert run.stderr.startswith("flext-mesh: error: invalid request: service_name: must be")


def test_unreachable_control_plane_exits_1_naming_the_address() -> None:
    target = f"127.0.0.1:{closed_port()}"
    run = cli("services", "list", "--control-plane", target, "--timeout", "5")
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1
    assert run.stderr.startswith(f"flext-mesh: error: cannot reach the control plane at {target}: ")


def test_unknown_strategy_is_a_usage_error() -> None:
    run = cli("services", "discover", "payment", "--strategy", "bogus")
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1
    assert "argument --strategy: invalid choice: 'bogus'" in run.stderr
    assert "Traceback" not in run.stderr


# -- rendering (unit) ------------------------------------------------------------------


def test_render_table_aligns_columns_under_headers() -> None:
    text = render_table(("NAME", "N", "NOTE"), [("a", 1, "x"), ("longer-name", 22, "")])
    assert text == (
        "NAME          N    NOTE\n"  # no trailing spaces, three between columns
        "a             1    x\n"
        "longer-name   22   -\n"
    )


def test_render_table_without_rows_is_the_header() -> None:
    assert render_table(("A", "B"), []) == "A   B\n"


def test_render_table_keeps_one_line_per_row() -> None:
    text = render_table(("K", "V"), [("k", "two\nlines\tand tab")])
    assert text.splitlines()[1] == "k   two lines and tab"


def test_render_table_rejects_a_row_of_the_wrong_width() -> None:
    with pytest.raises(ValueError, match="row 1 has 1 cells for 2 columns"):
        render_table(("A", "B"), [("only",)])


def test_health_text_shows_the_ejection_end() -> None:
    instance = registry_pb2.ServiceInstance(
        health=registry_pb2.HEALTH_STATUS_SERVING,
        ejected=True,
        ejected_until=Timestamp(seconds=int(time.time()) + 30),
    )
    assert re.fullmatch(r"SERVING, EJECTED until \d\d:\d\d:\d\d", health_text(instance))
    draining = registry_pb2.ServiceInstance(health=registry_pb2.HEALTH_STATUS_DRAINING)
    assert health_text(draining) == "DRAINING"
