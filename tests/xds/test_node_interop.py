"""Real Node.js clients (@grpc/grpc-js + @grpc/grpc-js-xds) dialing ``xds:///SERVICE``
through a real control plane to real sidecars: calls, weights, a version split, a
killed instance.

Each client is a ``node tests/polyglot/xds_client.mjs`` subprocess with
GRPC_XDS_BOOTSTRAP pointing at a file ``flext-mesh xds bootstrap`` wrote (its node
carries a locality: grpc-js-xds refuses one without). Every test uses its own service.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from flext_mesh.v1 import registry_pb2
from tests.conftest import REPO, ServeProcess
from tests.sidecar.test_sidecar_process import SidecarProcess
from tests.xds.test_xds_interop import (
    assert_calls_go_on_after_a_kill,
    bootstrap,
    light_share_during,
    put_policy,
    start,
)

NODE = shutil.which("node")
CLIENT = REPO / "tests" / "polyglot" / "xds_client.mjs"
if NODE is None or not (REPO / "node_modules" / "@grpc" / "grpc-js-xds").is_dir():
    _why = "Node.js or node_modules/@grpc/grpc-js-xds is missing (`make install-dev` runs npm ci)"
    if os.environ.get("CI") == "true":
        pytest.fail(_why, pytrace=False)
    pytest.skip(_why, allow_module_level=True)

pytestmark = [pytest.mark.xdist_group("xds"), pytest.mark.timeout(60)]


def node_client(boot: Path, mode: str, service: str, amount: float) -> subprocess.Popen[str]:
    assert NODE is not None
    env = {**os.environ, "GRPC_XDS_BOOTSTRAP": str(boot)}
    return subprocess.Popen(
        [NODE, str(CLIENT), mode, f"xds:///{service}", str(amount)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )  # fmt: skip


def count(boot: Path, service: str, calls: int) -> Counter[str]:
    proc = node_client(boot, "count", service, calls)
    out, err = proc.communicate(timeout=45)
    assert proc.returncode == 0, err
    return Counter(json.loads(out.splitlines()[-1]))


def nacks(plane: ServeProcess) -> list[str]:
    return [line for line in plane.log().splitlines() if "xds NACK" in line]


def test_a_node_client_calls_through_xds(
    tmp_path: Path, plane: ServeProcess, sidecars: list[SidecarProcess]
) -> None:
    sidecars.append(start(tmp_path, plane, "node-pay", "only"))
    counts = count(bootstrap(tmp_path, plane.address, "--zone", "z1"), "node-pay", 20)
    assert counts == {"only": 20}
    assert nacks(plane) == []


def test_a_node_client_follows_the_instances_weights(
    tmp_path: Path, plane: ServeProcess, sidecars: list[SidecarProcess]
) -> None:
    sidecars.append(start(tmp_path, plane, "node-weighted", "light", "--weight", "25"))
    sidecars.append(start(tmp_path, plane, "node-weighted", "heavy", "--weight", "75"))

    boot = bootstrap(tmp_path, plane.address)
    counts, shares = light_share_during(
        plane, "node-weighted", lambda: count(boot, "node-weighted", 2000)
    )

    assert set(counts) == {"light", "heavy"}, counts  # every call succeeded
    expected = statistics.fmean(shares)
    share = counts["light"] / 2000
    print(
        f"node: light share {share:.3f}, expected {expected:.3f} (weights 25:75; effective "
        f"share from {min(shares):.3f} to {max(shares):.3f} during the run)"
    )
    assert abs(share - expected) < 0.04
    assert nacks(plane) == []


def test_a_node_client_follows_a_version_split(
    tmp_path: Path, plane: ServeProcess, sidecars: list[SidecarProcess]
) -> None:
    sidecars.append(start(tmp_path, plane, "node-split", "old", "--version", "v1"))
    sidecars.append(start(tmp_path, plane, "node-split", "new", "--version", "v2"))
    policy = registry_pb2.ServicePolicy(
        service_name="node-split",
        splits=[
            registry_pb2.VersionSplit(version="v1", weight=90),
            registry_pb2.VersionSplit(version="v2", weight=10),
        ],
    )
    # Sent as the route's retry policy and max stream duration, the cluster's outlier
    # detection: grpc-js-xds must accept them all (no NACK).
    policy.retry.max_attempts = 3
    policy.retry.retryable_codes.append("UNAVAILABLE")
    policy.default_timeout.FromSeconds(2)
    policy.outlier_detection.consecutive_failures = 5
    put_policy(plane, policy)

    counts = count(bootstrap(tmp_path, plane.address), "node-split", 2000)

    assert set(counts) == {"old", "new"}, counts
    share = counts["new"] / 2000
    print(f"node: v2 share {share:.3f} of 2000 calls (split 90/10)")
    assert abs(share - 0.10) < 0.03
    assert nacks(plane) == []


def test_a_node_clients_calls_go_on_when_an_instance_is_killed(
    tmp_path: Path, plane: ServeProcess, sidecars: list[SidecarProcess]
) -> None:
    assert_calls_go_on_after_a_kill(tmp_path, plane, sidecars, "node-sturdy", node_client)
