"""``flext-mesh status`` over real sidecars: what each has applied of the registry.

Two real sidecars (their mesh clients follow the registry) say their applied revision on
KeepAlive and read OK once they caught up; a plain registration never says (-); and a
client that keeps renewing while its applied revision stays put (played here over the
real protocol by a KeepAlive stream that always says revision 1) is STALE.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from google.protobuf.duration_pb2 import Duration

from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from tests.conftest import ServeProcess
from tests.integration.test_cli_services import cli
from tests.sidecar.test_sidecar_process import start_sidecar


def _register(stub: registry_pb2_grpc.RegistryServiceStub, service: str, name: str) -> str:
    instance = registry_pb2.ServiceInstance(
        service_name=service,
        instance_id=name,
        endpoint="127.0.0.1:9",
        health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
    )
    reply = stub.Register(
        registry_pb2.RegisterRequest(instance=instance, ttl=Duration(seconds=60)), timeout=10
    )
    return reply.lease.lease_id


def _stuck_keep_alive(address: str, lease_id: str, stop: threading.Event) -> None:
    """Renew ``lease_id`` every 0.2 s, always saying revision 1 was applied."""
    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        outbox: queue.Queue[registry_pb2.KeepAliveRequest | None] = queue.Queue()

        def requests() -> Iterator[registry_pb2.KeepAliveRequest]:
            while (item := outbox.get()) is not None:
                yield item

        replies = stub.KeepAlive(requests())
        while not stop.is_set():
            outbox.put(registry_pb2.KeepAliveRequest(lease_ids=[lease_id], applied_revision=1))
            next(replies)
            time.sleep(0.2)
        outbox.put(None)


def _rows(address: str, *args: str) -> dict[str, list[str]]:
    run = cli("status", *args, "--control-plane", address)
    assert run.returncode == 0, run.stderr
    first, _header, *rows = run.stdout.splitlines()
    assert first.startswith("registry revision: ")
    return {row.split()[1]: row.split() for row in rows}


def test_status_tells_ok_stale_and_silent_sidecars_apart(
    serve_process: ServeProcess, tmp_path: Path
) -> None:
    address = serve_process.address
    payment = start_sidecar(tmp_path, address, "--instance-id", "pay-1")
    checkout = start_sidecar(
        tmp_path,
        address,
        "--service",
        "checkout",
        "--instance-id",
        "checkout-1",
        app="tests.sidecar.apps:CHECKOUT",
    )
    stop = threading.Event()
    try:
        with grpc.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            _register(stub, "legacy", "legacy-1")
            stuck = threading.Thread(
                target=_stuck_keep_alive,
                args=(address, _register(stub, "stuck", "stuck-1"), stop),
                daemon=True,
            )
            stuck.start()
            for i in range(3):  # the registry moves on
                _register(stub, "noise", f"noise-{i}")
        deadline = time.monotonic() + 20
        while True:
            rows = _rows(address, "--stale-after", "1")
            if rows["pay-1"][-1] == rows["checkout-1"][-1] == "OK" and rows["stuck-1"][-1] == (
                "STALE"
            ):
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.3)
        assert rows["legacy-1"][2:] == ["-", "-", "-", "-"]
        assert int(rows["stuck-1"][3]) > 0  # revisions behind
        assert rows["pay-1"][3] == "0"
        run = cli("status", "-o", "json", "--control-plane", address)
        applied = {i["instance_id"]: i for i in json.loads(run.stdout)}
        assert int(applied["stuck-1"]["applied_revision"]) == 1
        assert int(applied["legacy-1"].get("applied_revision", 0)) == 0  # never said
    finally:
        stop.set()
        for sidecar in (payment, checkout):
            sidecar.proc.terminate()
            sidecar.proc.wait(15)
