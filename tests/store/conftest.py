"""Store fixtures: every backend-independent test runs on SQLite and on a real etcd.

One etcd per test session (per xdist worker), on loopback and free ports; each test
gets its own key prefix, so tests share it without seeing each other's keys.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from flext_mesh.store import Store
from flext_mesh.store.etcd import EtcdStore
from flext_mesh.store.sqlite import SqliteStore
from tests.etcd_server import EtcdServer

#: Makes an unopened store of the test's backend (several calls: several replicas).
StoreFactory = Callable[[], Awaitable[Store]]


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A real etcd member for the session; skipped when etcd is missing (fails in CI)."""
    server = EtcdServer.start(tmp_path_factory.mktemp("etcd"))
    try:
        yield server
    finally:
        server.stop()


def etcd_store(server: EtcdServer, prefix: str, **options: float) -> EtcdStore:
    """An unopened EtcdStore on ``server`` under ``prefix``."""
    return EtcdStore([("127.0.0.1", server.client_port)], prefix, **options)


@pytest.fixture(params=["sqlite", "etcd"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreFactory:
    """Unopened stores of one backend; with etcd, every store of a test shares one prefix
    (several replicas of one control plane)."""
    if request.param == "sqlite":
        counter = iter(range(1000))

        async def make_sqlite() -> Store:
            return SqliteStore(tmp_path / f"state-{next(counter)}.db", sweep_interval=0.05)

        return make_sqlite
    server: EtcdServer = request.getfixturevalue("etcd_server")
    prefix = f"/test-{uuid.uuid4().hex[:12]}"

    async def make_etcd() -> Store:
        return etcd_store(server, prefix)

    return make_etcd


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[Store]:
    """An opened store of the test's backend, closed afterwards."""
    s = await make_store()
    await s.open()
    try:
        yield s
    finally:
        await s.close()
