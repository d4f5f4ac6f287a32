"""Durable state of the control plane behind one interface (see :mod:`.base`).

The backends (:mod:`.sqlite`, :mod:`.etcd`) are imported by :func:`open_store` when a
URL names them, so importing the interface loads neither SQLite nor etcd's client.
"""

from __future__ import annotations

from flext_mesh.store.base import (
    COMMIT_BUCKETS_SECONDS,
    CommitTimes,
    Compacted,
    Compare,
    Delete,
    Event,
    EventType,
    KeyValue,
    LeaseInfo,
    LeaseNotFound,
    Listener,
    Put,
    Store,
    StoreOpenError,
    Subscription,
    SubscriptionLagged,
    TxnResult,
    follow,
)

__all__ = [
    "COMMIT_BUCKETS_SECONDS",
    "CommitTimes",
    "Compacted",
    "Compare",
    "Delete",
    "Event",
    "EventType",
    "KeyValue",
    "LeaseInfo",
    "LeaseNotFound",
    "Listener",
    "Put",
    "Store",
    "StoreOpenError",
    "Subscription",
    "SubscriptionLagged",
    "TxnResult",
    "follow",
    "open_store",
]


def open_store(url: str) -> Store:
    """The Store for a URL (not yet opened): ``sqlite:///path`` or
    ``etcd://host:port[,host:port...][/prefix]`` (keys under ``/flext-mesh`` unless a
    prefix is given)."""
    if url.startswith("sqlite:///"):
        from flext_mesh.store.sqlite import SqliteStore  # noqa: PLC0415

        return SqliteStore(url[len("sqlite:///") :])
    if url.startswith("etcd://"):
        hosts, slash, prefix = url[len("etcd://") :].partition("/")
        if not hosts:
            raise StoreOpenError(f"{url!r} names no etcd endpoint: use etcd://host:port")
        from flext_mesh.store.etcd import EtcdStore, parse_endpoints  # noqa: PLC0415

        return EtcdStore(
            parse_endpoints(hosts), "/" + prefix if slash and prefix else "/flext-mesh"
        )
    raise StoreOpenError(f"{url!r} is not a store URL: use sqlite:///path.db or etcd://host:port")
