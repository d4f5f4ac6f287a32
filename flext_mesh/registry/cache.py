"""The registry's cache: every instance and policy, fed by the store, with revisions.

State lives in the Store under ``/registry/instances/<service>/<instance id>`` (a
serialized ServiceInstance attached to the instance's lease) and
``/registry/policies/<service>``. A store listener keeps this cache current, so it
holds every write before the writer's call returns; each batch of store events becomes
one batch of WatchEvents on the :class:`~flext_mesh.registry.watch.WatchHub`.

The cache knows no transport and no load-balancing strategy. Its objects are shared:
an instance object is replaced, never changed, when the store changes it (only
:meth:`InstanceCache.renewed` touches ``last_renew_time`` in place), so readers may keep
references. Each instance is encoded once, as one element of a repeated
``ServiceInstance`` field (DiscoverResponse and WatchSnapshot both number it 1), and
answers are built by joining those bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError

from flext_mesh.errors import FieldViolation, ResourceExhausted
from flext_mesh.names import check_name, raise_if
from flext_mesh.registry.watch import Watcher, WatchHub, make_batch
from flext_mesh.store.base import (
    Compacted,
    Event,
    EventType,
    KeyValue,
    Store,
    StoreOpenError,
    follow,
)
from flext_mesh.v1 import registry_pb2

__all__ = [
    "INSTANCES",
    "POLICIES",
    "REGISTRY",
    "InstanceCache",
    "InstanceChange",
    "encoded_field",
    "instance_key",
    "split_key",
]

_log = logging.getLogger("flext_mesh.registry")

#: Store prefix of everything the registry keeps (instances and policies).
REGISTRY = "/registry/"
#: Store prefix of instances.
INSTANCES = "/registry/instances/"
#: Traffic policies, one key a service: ``/registry/policies/<service>``.
POLICIES = "/registry/policies/"

_WE = registry_pb2.WatchEventType
# Fields a registration sets: a change of any of them is an UPDATED event.
_REG_FIELDS = (
    "endpoint",
    "version",
    "type",
    "zone",
    "labels",
    "capabilities",
    "weight",
    "health_check_mode",
    "metadata",
)
#: Tag of field 1 (length-delimited): DiscoverResponse.instances, WatchSnapshot.instances.
_INSTANCES_TAG = b"\x0a"
#: last_renew_time moves in the cache at most this often per instance, seconds.
RENEW_RESOLUTION = 1.0


@dataclass(frozen=True, slots=True)
class InstanceChange:
    """One instance written or removed, as the cache's listeners see it."""

    service: str
    instance_id: str
    old: registry_pb2.ServiceInstance | None
    new: registry_pb2.ServiceInstance | None
    #: A removal because its lease expired (else deregistered); False for a write.
    expired: bool = False


def stamp_now(stamp: timestamp_pb2.Timestamp) -> None:
    """Set ``stamp`` to now (the well-known-type helpers go through datetime: slower)."""
    now = time.time_ns()
    stamp.seconds, stamp.nanos = divmod(now, 1_000_000_000)


def varint(value: int) -> bytes:
    """``value`` as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encoded_field(instance: registry_pb2.ServiceInstance) -> bytes:
    """``instance`` as one encoded element of a repeated field numbered 1."""
    data = instance.SerializeToString()
    return _INSTANCES_TAG + varint(len(data)) + data


def instance_key(service: str, instance_id: str) -> str:
    """The store key of an instance."""
    return f"{INSTANCES}{service}/{instance_id}"


def split_key(key: str) -> tuple[str, str]:
    """(service, instance id) of an instance key."""
    service, _, instance_id = key[len(INSTANCES) :].partition("/")
    return service, instance_id


def service_of(key: str) -> str:
    """The service an instance or policy key belongs to."""
    if key.startswith(POLICIES):
        return key[len(POLICIES) :]
    return split_key(key)[0]


class InstanceCache:
    """Instances and policies by service, the registry revision, the watch fan-out."""

    def __init__(
        self,
        store: Store,
        hub: WatchHub,
        *,
        watch_chunk: int = 500,
        watch_progress_interval: float = 10.0,
    ) -> None:
        """``watch_chunk``: events per Watch message when replaying history;
        ``watch_progress_interval``: seconds between progress messages when idle."""
        self.store = store
        self.hub = hub
        self._watch_chunk = watch_chunk
        self._watch_progress = watch_progress_interval
        self.revision = 0
        """The latest registry revision applied."""
        self.policies: dict[str, registry_pb2.ServicePolicy] = {}
        """Committed policies by service."""
        self._services: dict[str, dict[str, registry_pb2.ServiceInstance]] = {}
        self._service_revision: dict[str, int] = {}
        # Lease id -> (service, instance id) of the instance it keeps registered.
        self._leases: dict[str, tuple[str, str]] = {}
        # (service, instance id) -> the encoded element of the cached instance object,
        # dropped whenever that object is replaced or renewed (bytes only: nothing here
        # for the garbage collector to walk).
        self._encodings: dict[tuple[str, str], bytes] = {}
        # Bumped when an instance of the service is renewed (its last_renew_time moved).
        self._renewals: dict[str, int] = {}
        # (service, instance id) -> the lock of writes that rewrite the whole instance
        # from what the cache holds (a registration, a drain); dropped when unused.
        self._write_locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._instance_listeners: list[Callable[[InstanceChange], None]] = []
        self._policy_listeners: list[Callable[[str], None]] = []
        self._unlisten: Callable[[], None] | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Load every instance and policy, then follow the store's changes."""
        revision, self._unlisten = await follow(self.store, REGISTRY, self._load, self._apply)
        self.revision = max(self.revision, revision)

    def stop(self) -> None:
        """Stop following the store and end every watch stream."""
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        self.hub.close_all()

    def on_instance(self, listener: Callable[[InstanceChange], None]) -> None:
        """Call ``listener`` on the loop after each instance write or removal."""
        self._instance_listeners.append(listener)

    def on_policy(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(service)`` on the loop after each policy write or removal."""
        self._policy_listeners.append(listener)

    # -- reads -------------------------------------------------------------------

    @property
    def services(self) -> dict[str, dict[str, registry_pb2.ServiceInstance]]:
        """Instances by service and instance id (read only)."""
        return self._services

    def instances(self, service: str) -> dict[str, registry_pb2.ServiceInstance]:
        """The service's instances by id (read only; empty when none)."""
        return self._services.get(service, {})

    def get(self, service: str, instance_id: str) -> registry_pb2.ServiceInstance | None:
        """The cached instance, or None."""
        return self._services.get(service, {}).get(instance_id)

    def write_lock(self, service: str, instance_id: str) -> asyncio.Lock:
        """The lock an instance's read-then-write changes hold on this replica, so that a
        registration writing the instance anew cannot undo a drain acknowledged between
        its read and its write (the cache holds every write before its writer's call
        returns, so the next holder reads it)."""
        key = (service, instance_id)
        lock = self._write_locks.get(key)
        if lock is None:
            lock = self._write_locks[key] = asyncio.Lock()
        return lock

    def service_revision(self, service: str) -> int:
        """Revision of the service's last instance or policy change; -1 when unknown."""
        return self._service_revision.get(service, -1)

    def renewals(self, service: str) -> int:
        """A counter that moves when an instance of the service is renewed."""
        return self._renewals.get(service, 0)

    def owner_of(self, lease_id: str) -> tuple[str, str] | None:
        """(service, instance id) that ``lease_id`` keeps registered; None if none."""
        return self._leases.get(lease_id)

    def encoded(self, instance: registry_pb2.ServiceInstance) -> bytes:
        """The instance's encoded element, made once per version of the instance."""
        key = (instance.service_name, instance.instance_id)
        encoded = self._encodings.get(key)
        if encoded is None or self._services.get(key[0], {}).get(key[1]) is not instance:
            encoded = encoded_field(instance)
            self.keep_encodings([(instance, encoded)])
        return encoded

    def encodings_of(
        self, instances: list[registry_pb2.ServiceInstance]
    ) -> tuple[list[bytes], list[tuple[registry_pb2.ServiceInstance, bytes]]]:
        """The instances' encoded elements, and those made now (for :meth:`keep_encodings`).

        Safe on a worker thread: it only reads the cache. An instance replaced meanwhile
        may get its newer version's bytes (the answer's revision is stale then anyway).
        """
        known = self._encodings
        out: list[bytes] = []
        fresh: list[tuple[registry_pb2.ServiceInstance, bytes]] = []
        for instance in instances:
            cached = known.get((instance.service_name, instance.instance_id))
            if cached is not None:
                out.append(cached)
            else:
                encoded = encoded_field(instance)
                out.append(encoded)
                fresh.append((instance, encoded))
        return out, fresh

    def keep_encodings(self, fresh: list[tuple[registry_pb2.ServiceInstance, bytes]]) -> None:
        """Keep encodings made by :meth:`encodings_of` for instances still current."""
        services = self._services
        for instance, encoded in fresh:
            name, ident = instance.service_name, instance.instance_id
            if services.get(name, {}).get(ident) is instance:
                self._encodings[(name, ident)] = encoded

    def renewed(
        self, lease_id: str, now: float | None = None, *, applied_revision: int = 0
    ) -> None:
        """Note that ``lease_id`` was renewed: its instance's ``last_renew_time`` moves
        (kept in memory; written to the store with the instance's next change), and its
        ``applied_revision`` when the renewal says a newer one."""
        owner = self._leases.get(lease_id)
        if owner is None:
            return
        instance = self._services.get(owner[0], {}).get(owner[1])
        if instance is None:
            return
        now = time.time() if now is None else now
        if applied_revision > instance.applied_revision:
            instance.applied_revision = applied_revision
            instance.applied_time.seconds, instance.applied_time.nanos = divmod(
                int(now * 1e9), 1_000_000_000
            )
            self._encodings.pop(owner, None)
            self._renewals[owner[0]] = self._renewals.get(owner[0], 0) + 1
        if now - instance.last_renew_time.seconds < RENEW_RESOLUTION:
            return
        instance.last_renew_time.seconds, instance.last_renew_time.nanos = divmod(
            int(now * 1e9), 1_000_000_000
        )
        self._encodings.pop(owner, None)
        self._renewals[owner[0]] = self._renewals.get(owner[0], 0) + 1

    # -- feeding from the store ----------------------------------------------------

    def _load(self, kvs: list[KeyValue]) -> None:
        """The start-up snapshot: every instance and policy into the cache."""
        for kv in kvs:
            try:
                if kv.key.startswith(POLICIES):
                    policy = registry_pb2.ServicePolicy.FromString(kv.value)
                    policy.revision = kv.mod_revision
                    self.policies[policy.service_name] = policy
                    continue
                instance = registry_pb2.ServiceInstance.FromString(kv.value)
            except DecodeError as exc:
                # Damage inside a record passes SQLite's structural check at open.
                raise StoreOpenError(
                    f"store {self.store.url} is corrupted: the record at {kv.key} cannot be "
                    f"decoded ({exc}); restore the store from a backup"
                ) from exc
            instance.revision = kv.mod_revision
            self._put(instance)

    def _put(self, instance: registry_pb2.ServiceInstance) -> registry_pb2.ServiceInstance | None:
        name = instance.service_name
        service = self._services.setdefault(name, {})
        previous = service.get(instance.instance_id)
        if previous is not None and previous.lease_id != instance.lease_id:
            self._leases.pop(previous.lease_id, None)
        service[instance.instance_id] = instance
        self._encodings.pop((name, instance.instance_id), None)
        if instance.lease_id:
            self._leases[instance.lease_id] = (name, instance.instance_id)
        self._service_revision[name] = max(self._service_revision.get(name, 0), instance.revision)
        return previous

    def _apply(self, events: list[Event]) -> None:
        """Store listener: update the cache and publish watch events (on the loop)."""
        out: list[registry_pb2.WatchEvent] = []
        changes: list[InstanceChange] = []
        policies: list[str] = []
        hub = self.hub
        for event in events:
            if event.key.startswith(POLICIES):
                out.append(self._apply_policy(event))
                policies.append(out[-1].service_name)
            else:
                change = self._apply_instance(event)
                changes.append(change)
                if hub.watched(change.service):  # no WatchEvent nobody would read
                    out.append(translate(event, change.new))
            self.revision = max(self.revision, event.revision)
        hub.publish(out)
        for change in changes:
            for instance_listener in self._instance_listeners:
                instance_listener(change)
        for service in policies:
            for policy_listener in self._policy_listeners:
                policy_listener(service)

    def _apply_instance(self, event: Event) -> InstanceChange:
        service_name, instance_id = split_key(event.key)
        if event.type is EventType.PUT:
            instance = registry_pb2.ServiceInstance.FromString(event.value)
            instance.revision = event.revision
            previous = self._put(instance)
            return InstanceChange(service_name, instance_id, previous, instance)
        service = self._services.get(service_name, {})
        gone = service.pop(instance_id, None)
        if gone is not None:
            self._leases.pop(gone.lease_id, None)
        self._encodings.pop((service_name, instance_id), None)
        if service:
            self._service_revision[service_name] = event.revision
        else:
            self._services.pop(service_name, None)
            self._service_revision.pop(service_name, None)
            self._renewals.pop(service_name, None)
        return InstanceChange(service_name, instance_id, gone, None, event.expired)

    def _apply_policy(self, event: Event) -> registry_pb2.WatchEvent:
        out = translate_event(event)
        name = out.service_name
        if event.type is EventType.PUT:
            self.policies[name] = out.policy
        else:
            self.policies.pop(name, None)
        # Discover answers depend on the policy: a new revision invalidates them.
        self._service_revision[name] = max(self._service_revision.get(name, 0), event.revision)
        return out

    # -- watch streams -------------------------------------------------------------

    async def watch(self, services: Sequence[str], from_revision: int) -> AsyncIterator[bytes]:
        """Serialized WatchResponses: history or a snapshot, then live changes."""
        violations = [
            v for i, name in enumerate(services) for v in check_name(f"service_names[{i}]", name)
        ]
        if from_revision < 0:
            violations.append(FieldViolation("from_revision", "must be >= 0"))
        raise_if(violations)
        watcher = self.hub.add(services)
        try:
            last = 0
            if from_revision and from_revision <= self.revision:
                try:
                    history = await self.store.events_since(from_revision, REGISTRY)
                except Compacted:
                    pass
                else:
                    last = from_revision
                    wanted = [e for e in history if watcher.wants(service_of(e.key))]
                    chunk = self._watch_chunk
                    for start in range(0, len(wanted), chunk):
                        part = [translate_event(e) for e in wanted[start : start + chunk]]
                        batch = make_batch(part)
                        if batch is not None:
                            last = batch.last_revision
                            yield batch.payload
                    if not wanted:
                        yield _progress(self.revision)
                        last = max(last, self.revision)
            if not last:
                last = self.revision
                yield self._snapshot(watcher, resync=from_revision != 0)
            async for payload in self._live(watcher, last):
                yield payload
        finally:
            self.hub.remove(watcher)

    def _snapshot(self, watcher: Watcher, *, resync: bool) -> bytes:
        """The WatchResponse of a snapshot, joined from the instances' encodings."""
        parts: list[bytes] = []
        for name in sorted(self._services):
            if watcher.wants(name):
                service = self._services[name]
                parts.extend([self.encoded(service[i]) for i in sorted(service)])
        tail = registry_pb2.WatchSnapshot(
            policies=[self.policies[n] for n in sorted(self.policies) if watcher.wants(n)],
            resync=resync,
        ).SerializeToString()
        parts.append(tail)
        snapshot = b"".join(parts)
        # WatchResponse: snapshot (field 2, length-delimited), revision (field 3, varint).
        return b"\x12" + varint(len(snapshot)) + snapshot + b"\x18" + varint(self.revision)

    async def _live(self, watcher: Watcher, last: int) -> AsyncIterator[bytes]:
        progress = self._watch_progress
        while True:
            try:
                batch = await watcher.next(progress)
            except TimeoutError:
                yield _progress(max(last, self.revision))
                continue
            if batch is None:
                if watcher.overflowed:
                    raise ResourceExhausted(
                        f"watch stream cut off: the client fell more than "
                        f"{watcher.max_pending} batches behind; resume from revision {last} "
                        "(from_revision) to miss nothing",
                        retry_after=0.1,
                    )
                return
            if batch.last_revision <= last:
                continue
            if batch.first_revision <= last:
                fresh = make_batch([e for e in batch.events if e.revision > last])
                if fresh is None:
                    continue
                batch = fresh
            last = batch.last_revision
            yield batch.payload


def _progress(revision: int) -> bytes:
    return registry_pb2.WatchResponse(revision=revision).SerializeToString()


def translate_event(event: Event) -> registry_pb2.WatchEvent:
    """The WatchEvent of a store event read back from history."""
    if event.key.startswith(POLICIES):
        out = registry_pb2.WatchEvent(
            revision=event.revision, service_name=event.key[len(POLICIES) :]
        )
        stamp_now(out.time)
        if event.type is EventType.PUT:
            out.type = _WE.WATCH_EVENT_TYPE_POLICY_PUT
            out.policy.ParseFromString(event.value)
            out.policy.revision = event.revision
        else:
            out.type = _WE.WATCH_EVENT_TYPE_POLICY_DELETED
        return out
    instance = (
        registry_pb2.ServiceInstance.FromString(event.value)
        if event.type is EventType.PUT
        else None
    )
    if instance is not None:
        instance.revision = event.revision
    return translate(event, instance)


def translate(
    event: Event, instance: registry_pb2.ServiceInstance | None
) -> registry_pb2.WatchEvent:
    """The WatchEvent of one instance event, classified against the previous value."""
    service_name, _ = split_key(event.key)
    out = registry_pb2.WatchEvent(revision=event.revision, service_name=service_name)
    stamp_now(out.time)
    if instance is None:
        out.type = _WE.WATCH_EVENT_TYPE_REMOVED
        out.instance.ParseFromString(event.value)
        out.removal_reason = (
            registry_pb2.REMOVAL_REASON_LEASE_EXPIRED
            if event.expired
            else registry_pb2.REMOVAL_REASON_DEREGISTERED
        )
        return out
    out.instance.CopyFrom(instance)
    if event.prev_value is None:
        out.type = _WE.WATCH_EVENT_TYPE_ADDED
        return out
    previous = registry_pb2.ServiceInstance.FromString(event.prev_value)
    if any(_field(previous, f) != _field(instance, f) for f in _REG_FIELDS) or (
        previous.lease_id != instance.lease_id
    ):
        out.type = _WE.WATCH_EVENT_TYPE_UPDATED
    elif (
        previous.maintenance != instance.maintenance
        or previous.maintenance_reason != instance.maintenance_reason
    ):
        out.type = _WE.WATCH_EVENT_TYPE_MAINTENANCE_CHANGED
    elif previous.health != instance.health or previous.ejected != instance.ejected:
        out.type = _WE.WATCH_EVENT_TYPE_HEALTH_CHANGED
    else:
        out.type = _WE.WATCH_EVENT_TYPE_WEIGHT_CHANGED
    return out


def _field(instance: registry_pb2.ServiceInstance, name: str) -> object:
    value = getattr(instance, name)
    if name == "labels":
        return dict(value)
    if name == "capabilities":
        return list(value)
    if name == "metadata":
        return value.SerializeToString(deterministic=True)
    return value
