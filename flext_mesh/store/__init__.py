"""Durable state of the control plane behind one interface (see :mod:`.base`)."""

from __future__ import annotations

from flext_mesh.store.base import (
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
)
from flext_mesh.store.sqlite import SqliteStore

__all__ = [
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
    "SqliteStore",
    "Store",
    "StoreOpenError",
    "Subscription",
    "SubscriptionLagged",
    "TxnResult",
    "open_store",
]


def open_store(url: str) -> Store:
    """The Store for a URL (not yet opened): ``sqlite:///path`` or ``etcd://host:port``."""
    if url.startswith("sqlite:///"):
        return SqliteStore(url[len("sqlite:///") :])
    if url.startswith("etcd://"):
        raise StoreOpenError(
            "the etcd store arrives with multi-replica support; use sqlite:///path for now"
        )
    raise StoreOpenError(f"{url!r} is not a store URL: use sqlite:///path.db or etcd://host:port")
