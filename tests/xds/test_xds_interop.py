"""Real grpcio clients (gRPC C core's xDS client) dialing ``xds:///SERVICE`` through a
real control plane to real sidecars: weights, splits, policy changes, a killed
instance, outlier ejection, a TLS control plane.

Each client is a fresh ``python`` subprocess (tests/xds/client.py) with
GRPC_XDS_BOOTSTRAP pointing at a file ``flext-mesh xds bootstrap`` wrote. Every test
uses its own service on one control plane.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from tests.conftest import BIN, REPO, ServeProcess, start_serve
from tests.sidecar.test_sidecar_process import SidecarProcess, start_sidecar

pytestmark = [pytest.mark.xdist_group("xds"), pytest.mark.timeout(60)]


def bootstrap(tmp_path: Path, plane: str, *args: str) -> Path:
    """A bootstrap file written by ``flext-mesh xds bootstrap``."""
    out = subprocess.run(
        [str(BIN / "flext-mesh"), "xds", "bootstrap", "--node-id", "test-client",
         "--control-plane", plane, *args],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    path = tmp_path / "bootstrap.json"
    path.write_text(out)
    return path


def client(
    boot: Path, mode: str, service: str, amount: float, operation: str = "charge", **payload: object
) -> subprocess.Popen[str]:
    if not payload and operation == "charge":
        payload = {"customer_id": "c-1", "amount": 1}
    env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(boot), "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.xds.client", mode, f"xds:///{service}", str(amount),
         operation, json.dumps(payload)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def count(boot: Path, service: str, calls: int) -> Counter[str]:
    proc = client(boot, "count", service, calls)
    out, err = proc.communicate(timeout=45)
    assert proc.returncode == 0, err
    return Counter(json.loads(out.splitlines()[-1]))


class Watch:
    """A client calling in a loop; its results, (start time, instance or code), live."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.results: list[tuple[float, str]] = []
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        assert self.ready.wait(20), proc.stderr.read() if proc.poll() is not None else "no ready"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "ready":
                self.ready.set()
                continue
            started, outcome = line.split()
            self.results.append((float(started), outcome))

    def after(self, moment: float) -> list[tuple[float, str]]:
        return [r for r in list(self.results) if r[0] >= moment]

    def wait_for(self, moment: float, done: object, limit: float = 5.0) -> float:
        """Seconds from ``moment`` to the start of the first call for which
        ``done(results from it on)`` holds."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            results = self.after(moment)
            for i, (started, _) in enumerate(results):
                if done(results[i:]):  # type: ignore[operator]
                    return started - moment
            time.sleep(0.05)
        pytest.fail(f"not seen within {limit} s: {self.after(moment)[-20:]}")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._thread.join(5)


def registry(plane: ServeProcess) -> registry_pb2_grpc.RegistryServiceStub:
    return registry_pb2_grpc.RegistryServiceStub(grpc.insecure_channel(plane.address))


def put_policy(plane: ServeProcess, policy: registry_pb2.ServicePolicy) -> float:
    """Store a policy; returns when the control plane said it did (epoch s)."""
    registry(plane).PutServicePolicy(registry_pb2.PutServicePolicyRequest(policy=policy))
    return time.time()


def start(
    tmp_path: Path,
    plane: ServeProcess,
    service: str,
    instance: str,
    *args: str,
    app: str = "tests.sidecar.apps:PROCESSORS",
) -> SidecarProcess:
    sidecar = start_sidecar(
        tmp_path, plane.address, "--service", service, "--instance-id", instance, *args, app=app
    )
    # A sidecar serves before its registration lands: wait for it, so that a policy
    # naming its version is accepted and the first xDS answer holds it.
    deadline = time.monotonic() + 10
    with grpc.insecure_channel(plane.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        while True:
            try:
                answer = stub.Discover(
                    registry_pb2.DiscoverRequest(service_name=service, healthy_only=False),
                    timeout=5,
                )
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.NOT_FOUND:
                    raise
            else:
                if any(i.instance_id == instance for i in answer.instances):
                    return sidecar
            assert time.monotonic() < deadline, f"{service}/{instance} never registered"
            time.sleep(0.05)


def light_share_during(
    plane: ServeProcess, service: str, run: Callable[[], Counter[str]]
) -> tuple[Counter[str], list[float]]:
    """``run()``'s counts, and the effective share of instance ``light`` (against
    ``heavy``) sampled every 50 ms meanwhile: the effective weights move during a run
    (the latency factor follows the health checks' round trips, slower on the busier
    instance), so a client is held to their average over the run."""
    shares: list[float] = []
    done = threading.Event()

    def sample() -> None:
        stub = registry(plane)
        while not done.is_set():
            answer = stub.Discover(registry_pb2.DiscoverRequest(service_name=service, explain=True))
            weights = {e.instance_id: e.effective_weight for e in answer.explanations}
            shares.append(weights["light"] / (weights["light"] + weights["heavy"]))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        counts = run()
    finally:
        done.set()
        sampler.join(5)
    return counts, shares


def test_calls_follow_the_instances_weights(
    tmp_path: Path, plane: ServeProcess, sidecars: list[SidecarProcess]
) -> None:
    sidecars.append(start(tmp_path, plane, "weighted", "light", "--weight", "25"))
    sidecars.append(start(tmp_path, plane, "weighted", "heavy", "--weight", "75"))
    boot = bootstrap(tmp_path, plane.address)

    # The client follows the effective weights (base x health x latency x errors).
    counts, shares = light_share_during(plane, "weighted", lambda: count(boot, "weighted", 2000))

    assert set(counts) == {"light", "heavy"}, counts  # every call succeeded
    expected = statistics.fmean(shares)
    share = counts["light"] / 2000
    print(
        f"light share {share:.3f}, expected {expected:.3f} (weights 25:75; effective "
        f"share from {min(shares):.3f} to {max(shares):.3f} during the run)"
    )
    assert abs(share - expected) < 0.04
    assert "xds NACK" not in plane.log()


def test_a_version_split_is_followed(
    tmp_path: Path, plane: ServeProcess, sidecars: list[SidecarProcess]
) -> None:
    sidecars.append(start(tmp_path, plane, "split", "old", "--version", "v1"))
    sidecars.append(start(tmp_path, plane, "split", "new", "--version", "v2"))
    put_policy(
        plane,
        registry_pb2.ServicePolicy(
            service_name="split",
            splits=[
                registry_pb2.VersionSplit(version="v1", weight=90),
                registry_pb2.VersionSplit(version="v2", weight=10),
            ],
        ),
    )
    counts = count(bootstrap(tmp_path, plane.address), "split", 2000)
    assert set(counts) == {"old", "new"}, counts
    share = counts["new"] / 2000
    print(f"v2 share {share:.3f} of 2000 calls (split 90/10)")
    assert abs(share - 0.10) < 0.03
    assert "xds NACK" not in plane.log()


def test_policy_changes_reach_a_running_client_within_a_second(
    tmp_path: Path, plane: ServeProcess, sidecars: list[SidecarProcess]
) -> None:
    sidecars.append(start(tmp_path, plane, "live", "old", "--version", "v1"))
    sidecars.append(start(tmp_path, plane, "live", "new", "--version", "v2"))
    watch = Watch(client(bootstrap(tmp_path, plane.address), "watch", "live", 20, "slow",
                         seconds=0.02))  # fmt: skip
    try:
        time.sleep(0.5)
        assert {o for _, o in watch.after(0)} == {"old", "new"}

        # A split sending everything to v2.
        policy = registry_pb2.ServicePolicy(
            service_name="live", splits=[registry_pb2.VersionSplit(version="v2", weight=100)]
        )
        policy.retry.max_attempts = 3  # sent as the route's retry_policy
        policy.retry.retryable_codes.append("UNAVAILABLE")
        moved = put_policy(plane, policy)
        split_delay = watch.wait_for(
            moved, lambda rs: len(rs) >= 20 and all(o == "new" for _, o in rs)
        )
        # A timeout shorter than the operation: calls end DEADLINE_EXCEEDED.
        policy.default_timeout.FromMilliseconds(5)
        timed = put_policy(plane, policy)
        timeout_delay = watch.wait_for(
            timed, lambda rs: len(rs) >= 5 and all(o == "DEADLINE_EXCEEDED" for _, o in rs[:5])
        )
    finally:
        watch.stop()
    print(f"split applied after {split_delay:.3f} s, timeout after {timeout_delay:.3f} s")
    assert split_delay < 1.0
    assert timeout_delay < 1.0
    assert "xds NACK" not in plane.log()  # nor the retry policy's, nor the timeouts


def assert_calls_go_on_after_a_kill(
    tmp_path: Path,
    plane: ServeProcess,
    sidecars: list[SidecarProcess],
    service: str,
    caller: Callable[[Path, str, str, float], subprocess.Popen[str]],
) -> None:
    """Two instances of ``service``, a client (``caller(bootstrap, "watch", service,
    seconds)``) calling in a loop, one instance SIGKILLed: at most 3 calls fail, all in
    the first second, and only the survivor answers after it."""
    sidecars.append(start(tmp_path, plane, service, "doomed"))
    sidecars.append(start(tmp_path, plane, service, "survivor"))
    watch = Watch(caller(bootstrap(tmp_path, plane.address), "watch", service, 20))
    try:
        time.sleep(0.5)
        assert {o for _, o in watch.after(0)} == {"doomed", "survivor"}
        killed = time.time()
        sidecars[0].proc.send_signal(signal.SIGKILL)
        time.sleep(3.0)
        after = watch.after(killed)
    finally:
        watch.stop()
    failures = [(round(t - killed, 3), o) for t, o in after if o not in ("doomed", "survivor")]
    print(f"{service}: {len(failures)} failed calls of {len(after)} after the kill: {failures}")
    assert len(failures) <= 3
    assert all(t < 1.0 for t, _ in failures)
    assert {o for t, o in after if t - killed > 1.0} == {"survivor"}
    assert "xds NACK" not in plane.log()


def test_calls_go_on_when_an_instance_is_killed(
    tmp_path: Path, plane: ServeProcess, sidecars: list[SidecarProcess]
) -> None:
    assert_calls_go_on_after_a_kill(tmp_path, plane, sidecars, "sturdy", client)


def test_the_client_ejects_an_instance_that_fails_every_call(
    tmp_path: Path, plane: ServeProcess, sidecars: list[SidecarProcess]
) -> None:
    policy = registry_pb2.ServicePolicy(service_name="flaky")
    policy.outlier_detection.consecutive_failures = 5
    policy.outlier_detection.base_ejection_time.FromSeconds(30)
    sidecars.append(start(tmp_path, plane, "flaky", "good"))
    sidecars.append(start(tmp_path, plane, "flaky", "bad", app="tests.xds.apps:FAILING"))
    put_policy(plane, policy)
    watch = Watch(client(bootstrap(tmp_path, plane.address), "watch", "flaky", 20))
    try:
        began = time.time()
        ejected = watch.wait_for(
            began, lambda rs: len(rs) >= 100 and all(o == "good" for _, o in rs), limit=6
        )
    finally:
        watch.stop()
    answer = registry(plane).Discover(
        registry_pb2.DiscoverRequest(service_name="flaky", explain=True)
    )
    print(
        f"failing instance ejected {ejected:.2f} s after the client started calling; "
        f"control plane: {[(e.instance_id, e.ejected) for e in answer.explanations]}"
    )
    assert ejected < 4.0
    # A business refusal: the control plane did not eject it, the client did.
    assert not any(e.ejected for e in answer.explanations)
    assert "xds NACK" not in plane.log()


def test_a_client_reaches_a_tls_control_plane(
    tmp_path: Path, sidecars: list[SidecarProcess]
) -> None:
    pki = tmp_path / "pki"
    for args in (("init",), ("issue", "control-plane")):
        subprocess.run(
            [str(BIN / "flext-mesh"), "certs", *args, "--dir", str(pki)], check=True,
            capture_output=True, timeout=30,
        )  # fmt: skip
    ca, cert, key = pki / "ca.crt", pki / "control-plane.crt", pki / "control-plane.key"
    secured = start_serve(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        sidecars.append(
            start_sidecar(tmp_path, secured.address, "--service", "secure", "--tls-ca", str(ca))
        )
        boot = bootstrap(tmp_path, secured.address, "--tls-ca", str(ca))
        assert json.loads(boot.read_text())["xds_servers"][0]["channel_creds"] == [
            {"type": "tls", "config": {"ca_certificate_file": str(ca.resolve())}}
        ]
        counts = count(boot, "secure", 20)
        assert sum(counts.values()) == 20
        assert set(counts) == {sidecars[0].instance}, counts
    finally:
        secured.kill()


def test_a_server_in_another_language_joins_with_no_flext_code_on_either_side(
    tmp_path: Path, plane: ServeProcess
) -> None:
    """The minimal xDS-era instance: a Node.js server that only registers (Register,
    then Heartbeat) and serves, called by a grpcio client that has only a bootstrap
    file. Neither side runs a line of flext-mesh."""
    node = shutil.which("node")
    assert node, "node not found: install Node.js 20+ and run 'make install-dev' (npm ci)"
    server = REPO / "tests" / "polyglot" / "processor_server.mjs"
    stderr = (tmp_path / "node.stderr").open("w")
    proc = subprocess.Popen(
        [node, str(server.relative_to(REPO))],
        cwd=REPO,
        env={**os.environ, "FLEXT_MESH_ADDRESS": plane.address},
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.startswith("ready "), (ready, (tmp_path / "node.stderr").read_text())
        caller = client(
            bootstrap(tmp_path, plane.address), "count", "node-greeter", 20, "greet", name="x"
        )
        out, err = caller.communicate(timeout=45)
        assert caller.returncode == 0, err
        assert json.loads(out.splitlines()[-1]) == {"node-1": 20}
        assert "xds NACK" not in plane.log()
    finally:
        proc.terminate()  # it deregisters and exits 0
        assert proc.wait(10) == 0
        stderr.close()
