"""A real etcd on loopback for tests: started from the ``etcd`` binary, never mocked.

Importable by any test package (store tests, registry or integration tests later):
``etcd_or_skip()`` gives the binary or skips (fails under ``CI=true``, where a missing
etcd is a broken set-up, not a reason to test less), ``EtcdServer.start(tmp)`` starts
one member on two free ports with a throw-away data directory.

The member runs with a 10 ms heartbeat and 100 ms election timeout: etcd derives its
minimum lease TTL from them (1.5 x election timeout, rounded up to whole seconds), so
leases of 1 s are honoured instead of being raised to etcd's default minimum of 2 s.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["EtcdServer", "etcd_or_skip"]


def etcd_or_skip() -> str:
    """The etcd binary; skips the test when it is missing (fails when ``CI=true``)."""
    found = shutil.which("etcd")
    if found:
        return found
    message = "etcd is not installed (`make test` installs Debian's etcd-server)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


@dataclass
class EtcdServer:
    """One etcd member on 127.0.0.1 (client and peer ports free when it started)."""

    proc: subprocess.Popen[bytes]
    binary: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client URL."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        """The store URL for this member (``etcd://127.0.0.1:PORT``)."""
        return f"etcd://{self.endpoint}"

    @classmethod
    def start(
        cls,
        directory: Path,
        *,
        binary: str | None = None,
        timeout: float = 20.0,
        max_txn_ops: int = 4096,
    ) -> EtcdServer:
        """Start a member with its data under ``directory``; wait until it is healthy.

        Retries with new ports when another process took one between the probe and
        etcd's bind (the ports are free, not reserved).
        """
        binary = binary or etcd_or_skip()
        last_log = ""
        for attempt in range(3):
            client, peer = _free_ports(2)
            server = cls._launch(
                binary, client, peer, directory / f"etcd-data-{attempt}", directory, max_txn_ops
            )
            if server._wait_healthy(timeout):
                return server
            server.stop()
            last_log = server.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"etcd did not become healthy; its log ends with:\n{last_log}")

    def restart(self, timeout: float = 20.0) -> EtcdServer:
        """Start the stopped member again on the same ports and data (an outage ends)."""
        self.stop()
        server = self._launch(
            self.binary, self.client_port, self.peer_port, self.data_dir, self.log_path.parent
        )
        if not server._wait_healthy(timeout):
            server.stop()
            log = server.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"etcd did not restart; its log ends with:\n{log}")
        return server

    @classmethod
    def _launch(
        cls,
        binary: str,
        client: int,
        peer: int,
        data_dir: Path,
        log_dir: Path,
        max_txn_ops: int = 4096,
    ) -> EtcdServer:
        log_path = log_dir / f"etcd-{client}-{time.monotonic_ns()}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    "--name=test",
                    f"--data-dir={data_dir}",
                    f"--listen-client-urls=http://127.0.0.1:{client}",
                    f"--advertise-client-urls=http://127.0.0.1:{client}",
                    f"--listen-peer-urls=http://127.0.0.1:{peer}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                    f"--initial-cluster=test=http://127.0.0.1:{peer}",
                    "--heartbeat-interval=10",
                    "--election-timeout=100",
                    # The metrics checkpoint writes every changed bucket in one
                    # transaction; docs/operations.md's set-up raises etcd's default of 128 too.
                    f"--max-txn-ops={max_txn_ops}",
                    "--logger=zap",
                    "--log-level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return cls(proc, binary, client, peer, data_dir, log_path)

    def _wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1.0) as reply:
                    if b'"true"' in reply.read():
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Terminate the member (SIGTERM, then SIGKILL after 10 s) and reap it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
