"""Call counts survive a control-plane failover exactly (issue 18, defect 3).

Three ``flext-mesh serve`` replicas on one real etcd, two real sidecars serving calls
under a steady load. The sidecars report to the first replica of their list; it is
killed with SIGKILL, and then the one they moved to: the calls the control plane
counts (``GetServiceReport``, as a user reads it) equal the calls made, exactly. A
replica killed while the sidecars are idle adds no call that never happened.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc, processor_pb2, processor_pb2_grpc
from tests.conftest import ServeProcess, start_serve
from tests.etcd_server import EtcdServer
from tests.sidecar.test_sidecar_process import SidecarProcess, start_sidecar

pytestmark = pytest.mark.xdist_group("replicas")

NAMES = ("cp-a", "cp-b", "cp-c")
SERVICES = ("payment", "refunds")
_HTTP = re.compile(r"serving grpc=\S+ http=(?P<addr>\S+)")
_CALLS = re.compile(r"^flext_mesh_calls_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Cluster:
    tmp: Path
    etcd: EtcdServer
    ports: dict[str, int]
    replicas: dict[str, ServeProcess] = field(default_factory=dict)
    sidecars: dict[str, SidecarProcess] = field(default_factory=dict)

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{self.ports[name]}" for name in NAMES)

    def start(self, name: str) -> None:
        self.replicas[name] = start_serve(
            self.tmp,
            "--store",
            self.etcd.url,
            "--node-name",
            name,
            "--listen",
            f"127.0.0.1:{self.ports[name]}",
        )

    def alive(self) -> list[str]:
        return [name for name, plane in self.replicas.items() if plane.proc.poll() is None]

    def counted_here(self, name: str) -> int:
        """Calls this replica itself counted since it started (its Prometheus counter)."""
        match = _HTTP.search(self.replicas[name].log())
        assert match, "the replica logs its HTTP address"
        with urllib.request.urlopen(f"http://{match['addr']}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        return sum(
            int(float(m["value"]))
            for m in _CALLS.finditer(text)
            if any(f'service="{service}"' in m["labels"] for service in SERVICES)
        )

    def reporting_to(self, within: float = 10.0) -> str:
        """The replica whose own count grows: the one the sidecars report to now."""
        deadline = time.monotonic() + within
        before = {name: self.counted_here(name) for name in self.alive()}
        while True:
            time.sleep(0.3)
            now = {name: self.counted_here(name) for name in self.alive()}
            grown = [name for name in now if now[name] > before.get(name, 0)]
            if len(grown) == 1:
                return grown[0]
            assert time.monotonic() < deadline, f"no single replica counting: {before} {now}"
            before = now

    def counted(self) -> int:
        """Calls of both services counted by the mesh, read from a live replica."""
        name = self.alive()[0]
        with grpc.insecure_channel(f"127.0.0.1:{self.ports[name]}") as channel:
            stub = metrics_pb2_grpc.MetricsServiceStub(channel)
            total = 0
            for service in SERVICES:
                try:
                    report = stub.GetServiceReport(
                        metrics_pb2.GetServiceReportRequest(service_name=service), timeout=5
                    ).report
                except grpc.RpcError as exc:
                    if exc.code() is grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                        continue
                    raise
                total += report.summary.total_calls
        return total


class Load:
    """Calls every sidecar directly, steadily, from one thread each; counts the answers."""

    def __init__(self, sidecars: list[SidecarProcess], interval: float = 0.004) -> None:
        self.made = 0
        self.failures: list[str] = []
        self._interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(s,)) for s in sidecars]

    def _run(self, sidecar: SidecarProcess) -> None:
        with grpc.insecure_channel(sidecar.address) as channel:
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            request = processor_pb2.InvokeRequest(operation="charge")
            request.payload.update({"customer_id": "c-1", "amount": 5})
            while not self._stop.is_set():
                try:
                    stub.Invoke(request, timeout=5)
                except grpc.RpcError as exc:
                    self.failures.append(repr(exc))
                    return
                with self._lock:
                    self.made += 1
                time.sleep(self._interval)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


def _settled(read: Callable[[], int], expected: int, within: float) -> int:
    """Poll ``read`` until it equals ``expected`` (or ``within`` passes); the last value."""
    deadline = time.monotonic() + within
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        value = read()
    return value


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    etcd = EtcdServer.start(tmp_path)
    cluster = Cluster(tmp_path, etcd, {name: _free_port() for name in NAMES})
    try:
        for name in NAMES:
            cluster.start(name)
        for service in SERVICES:
            cluster.sidecars[service] = start_sidecar(
                tmp_path, cluster.addresses, "--service", service, "--ttl", "3"
            )
        yield cluster
    finally:
        for sidecar in cluster.sidecars.values():
            sidecar.proc.send_signal(signal.SIGTERM)
        for plane in cluster.replicas.values():
            if plane.proc.poll() is None:
                plane.kill()
        for sidecar in cluster.sidecars.values():
            try:
                sidecar.proc.wait(15)
            except subprocess.TimeoutExpired:
                sidecar.proc.kill()
        etcd.stop()


def test_calls_are_counted_exactly_once_across_two_replica_kills(cluster: Cluster) -> None:
    started = time.monotonic()
    killed: list[str] = []
    with Load(list(cluster.sidecars.values())) as load:
        for _ in range(2):
            time.sleep(1.5)
            active = cluster.reporting_to()
            cluster.replicas[active].kill()  # SIGKILL, mid-stream, under load
            killed.append(active)
            moved = cluster.reporting_to()  # the sidecars carry on with another one
            assert moved not in killed
        time.sleep(1.0)
    assert load.failures == []
    assert load.made > 500

    counted = _settled(cluster.counted, load.made, within=15)
    # Nothing comes late: a batch re-sent after a kill is never counted again.
    time.sleep(1.5)
    counted_later = cluster.counted()
    print(  # the figures, with -s
        f"\nkilled {killed}: made {load.made}, counted {counted}, then {counted_later}, "
        f"took {time.monotonic() - started:.1f} s"
    )
    assert (counted, counted_later) == (load.made, load.made)


def test_a_replica_killed_while_the_sidecars_are_idle_adds_no_call(cluster: Cluster) -> None:
    with Load(list(cluster.sidecars.values())) as load:
        time.sleep(2.0)
        active = cluster.reporting_to()
    made = load.made
    assert load.failures == []
    assert _settled(cluster.counted, made, within=15) == made

    cluster.replicas[active].kill()  # idle: every call was reported and counted
    time.sleep(3.0)
    after_kill = cluster.counted()

    # The sidecars report again (to another replica) once they have calls to report.
    with Load(list(cluster.sidecars.values())) as more:
        time.sleep(1.5)
    assert more.failures == []
    final = _settled(cluster.counted, made + more.made, within=15)
    print(
        f"\nidle kill of {active}: made {made}, counted {after_kill} after the kill; "
        f"then made {made + more.made}, counted {final}"
    )
    assert after_kill == made
    assert final == made + more.made
