"""``FlextServices.ServiceRegistry``: the guide's registry, backed by RegistryService.

``register(service_info)`` registers an instance under a lease that a background
:class:`flext_mesh.hosting.membership.Membership` keeps renewing on the bridge loop until
``deregister``, ``close`` or interpreter exit (which deregisters it too);
``discover(name)`` asks the control plane for one healthy instance picked by the
service's load-balancing strategy.

This module also holds :class:`ControlPlaneClient`, the base of the facade objects that
talk to the control plane: one channel per object, every call bounded by ``timeout``,
every ``grpc`` error turned into a failed ``FlextResult`` carrying its status code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import re
import threading
from collections.abc import Coroutine, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import grpc
from google.protobuf import json_format

from flext_mesh.errors import InvalidArgument
from flext_mesh.facade import control_plane_address
from flext_mesh.facade._bridge import Bridge, attach, detach
from flext_mesh.hosting.membership import Membership
from flext_mesh.result import FlextResult
from flext_mesh.rpc.channels import ClientSecurity, TransportError, open_channel
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc

__all__ = ["ControlPlaneClient", "ServiceRegistry"]

_log = logging.getLogger("flext_mesh.facade")
_T = TypeVar("_T")

# Extra time a blocking caller waits beyond ``timeout`` for the bridge to answer: the
# coroutine itself gives up at ``timeout`` and reports why.
_SLACK = 2.0
_DEFAULT_PORTS = {"http": 80, "https": 443}
_LABEL_KEY = re.compile(r"^[A-Za-z0-9._/-]{1,63}$")
_MAX_LABELS = 32
_MAX_LABEL_VALUE = 255
# Keys of a service_info dict that map to ServiceInstance fields rather than labels.
_FIELDS = frozenset(
    {
        "name",
        "type",
        "endpoint",
        "version",
        "capabilities",
        "zone",
        "weight",
        "instance_id",
        "health_check_mode",
        "labels",
        "metadata",
    }
)
_MODES = {
    "grpc": registry_pb2.HEALTH_CHECK_MODE_GRPC,
    "ttl_only": registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
    "ttl": registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
}


class ControlPlaneClient:
    """Base of the facade objects that call the control plane.

    Owns one ``grpc.aio`` channel, created and used on the bridge loop only. Blocking
    methods run their coroutine on the bridge with :meth:`_call`; their ``a``-prefixed
    twins await :meth:`_acall`. Either way a call ends within about ``timeout`` seconds
    and nothing raises to the caller. ``security`` secures the channel (TLS, client
    certificate, token); None reads it from the ``FLEXT_MESH_TLS_*`` and
    ``FLEXT_MESH_TOKEN`` variables, like the address from ``FLEXT_MESH_CONTROL_PLANE``.
    """

    def __init__(
        self, control_plane: str | None, *, timeout: float, security: ClientSecurity | None = None
    ) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        self.control_plane = control_plane_address(control_plane)
        """Address ``host:port`` of the control plane."""
        self.timeout = timeout
        """Seconds one call may take before it fails (UNAVAILABLE when never connected)."""
        self.security = ClientSecurity.from_env() if security is None else security
        """TLS and token of the channel to the control plane."""
        self._channel: grpc.aio.Channel | None = None
        self._closed = False
        self._bridge: Bridge | None = None
        self._bridge_lock = threading.Lock()

    # -- running calls -----------------------------------------------------------------

    def _loop_bridge(self) -> Bridge:
        """The bridge this object runs on (attached on first use, until closed)."""
        with self._bridge_lock:
            if self._bridge is None:
                self._bridge = attach(self)
            return self._bridge

    def _closed_failure(self, what: str) -> FlextResult[Any]:
        return FlextResult.fail(
            f"{what}: this {type(self).__name__} is closed", code="FAILED_PRECONDITION"
        )

    def _get_channel(self) -> grpc.aio.Channel:
        """The channel to the control plane (bridge loop only; created on first use)."""
        if self._channel is None:
            self._channel = open_channel(self.control_plane, self.security)
        return self._channel

    def _call(
        self,
        what: str,
        coroutine: Coroutine[Any, Any, FlextResult[_T]],
        *,
        allow_closed: bool = False,
    ) -> FlextResult[_T]:
        """Run ``coroutine`` on the bridge and wait (blocking methods)."""
        if self._closed and not allow_closed:
            coroutine.close()
            return self._closed_failure(what)
        guarded = self._guard(what, coroutine, allow_closed=allow_closed)
        try:
            return self._loop_bridge().run(guarded, self.timeout + _SLACK)
        except TimeoutError:
            return FlextResult.fail(
                f"{what}: no answer from the control plane at {self.control_plane} "
                f"within {self.timeout:g}s",
                code="DEADLINE_EXCEEDED",
            )
        except (RuntimeError, concurrent.futures.CancelledError) as exc:
            guarded.close()
            return FlextResult.fail(f"{what}: {exc or 'cancelled'}", code="FAILED_PRECONDITION")

    async def _acall(
        self,
        what: str,
        coroutine: Coroutine[Any, Any, FlextResult[_T]],
        *,
        allow_closed: bool = False,
    ) -> FlextResult[_T]:
        """Run ``coroutine`` on the bridge; the caller's loop keeps running."""
        if self._closed and not allow_closed:
            coroutine.close()
            return self._closed_failure(what)
        guarded = self._guard(what, coroutine, allow_closed=allow_closed)
        try:
            return await self._loop_bridge().run_async(guarded)
        except RuntimeError as exc:
            guarded.close()
            return FlextResult.fail(f"{what}: {exc}", code="FAILED_PRECONDITION")

    async def _guard(
        self,
        what: str,
        coroutine: Coroutine[Any, Any, FlextResult[_T]],
        *,
        allow_closed: bool = False,
    ) -> FlextResult[_T]:
        """Bound ``coroutine`` by ``timeout`` and turn every error into a failure."""
        if self._closed and not allow_closed:
            coroutine.close()
            return self._closed_failure(what)
        try:
            async with asyncio.timeout(self.timeout):
                return await coroutine
        except grpc.aio.AioRpcError as exc:
            return self._rpc_failure(what, exc)
        except TimeoutError:
            return self._timed_out(what)
        except TransportError as exc:  # a TLS file of ``security`` missing or wrong
            return FlextResult.fail(f"{what}: {exc}", code="FAILED_PRECONDITION")
        except Exception as exc:  # the facade's promise: nothing raises to the caller
            _log.exception("%s failed unexpectedly", what)
            return FlextResult.fail(f"{what}: unexpected error: {exc!r}", code="INTERNAL")

    def _connected(self) -> bool:
        channel = self._channel
        return channel is not None and channel.get_state() is grpc.ChannelConnectivity.READY

    def _timed_out(self, what: str) -> FlextResult[Any]:
        if self._connected():
            return FlextResult.fail(
                f"{what}: the control plane at {self.control_plane} did not answer "
                f"within {self.timeout:g}s",
                code="DEADLINE_EXCEEDED",
            )
        return FlextResult.fail(
            f"{what}: control plane at {self.control_plane} is unreachable "
            f"(no connection within {self.timeout:g}s)",
            code="UNAVAILABLE",
        )

    def _rpc_failure(self, what: str, exc: grpc.aio.AioRpcError) -> FlextResult[Any]:
        """A failure carrying the status code, message and field violations of ``exc``."""
        code = exc.code()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return self._timed_out(what)
        error = from_rpc_error(exc)
        if code is grpc.StatusCode.UNAVAILABLE:
            return FlextResult.fail(
                f"{what}: control plane at {self.control_plane} is unavailable ({error.message})",
                code="UNAVAILABLE",
            )
        violations = error.violations if isinstance(error, InvalidArgument) else ()
        name = code.name if code is not grpc.StatusCode.OK else "UNKNOWN"
        return FlextResult.fail(f"{what}: {error.message}", code=name, field_violations=violations)

    # -- lifecycle ---------------------------------------------------------------------

    async def _shutdown(self) -> FlextResult[None]:
        """Stop what the object started (bridge loop); subclasses extend it."""
        return FlextResult.ok(None)

    async def _close_on_loop(self) -> FlextResult[None]:
        if self._closed:
            return FlextResult.ok(None)
        self._closed = True
        try:
            return await self._shutdown()
        finally:
            channel, self._channel = self._channel, None
            if channel is not None:
                await channel.close()

    def _closing(self) -> Bridge | None:
        """The bridge to close on; None when there is nothing to close (never used,
        or closed already)."""
        with self._bridge_lock:
            if self._bridge is None:
                self._closed = True
            return None if self._closed else self._bridge

    def close(self) -> FlextResult[None]:
        """Stop everything this object started (deregister, flush) and close its channel;
        idempotent. Objects left open are closed at interpreter exit."""
        bridge = self._closing()
        if bridge is None:
            return FlextResult.ok(None)
        try:
            return self._call("close", self._close_on_loop(), allow_closed=True)
        finally:
            detach(self, bridge)

    async def aclose(self) -> FlextResult[None]:
        """Async twin of :meth:`close`."""
        bridge = self._closing()
        if bridge is None:
            return FlextResult.ok(None)
        try:
            return await self._acall("close", self._close_on_loop(), allow_closed=True)
        finally:
            detach(self, bridge)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _log_if_failed(self.close())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _log_if_failed(await self.aclose())


def _log_if_failed(result: FlextResult[Any]) -> None:
    if result.is_failure:
        _log.warning("%s", result.error)


class ServiceRegistry(ControlPlaneClient):
    """Registers services with the control plane and discovers them (the guide's API).

    ``ttl`` is the lease time to live in seconds (1 to 3600): a registration made here
    is renewed every ``ttl / 3`` in the background and disappears within ``ttl`` of
    this process dying. ``timeout`` bounds every call.
    """

    def __init__(
        self,
        control_plane: str | None = None,
        *,
        ttl: float = 10.0,
        timeout: float = 10.0,
        security: ClientSecurity | None = None,
    ) -> None:
        super().__init__(control_plane, timeout=timeout, security=security)
        if not (math.isfinite(ttl) and 1.0 <= ttl <= 3600.0):
            raise ValueError(f"ttl must be 1 to 3600 seconds, got {ttl}")
        self.ttl = ttl
        """Lease time to live of registrations, seconds."""
        self._memberships: dict[str, Membership] = {}  # by instance id; bridge loop only

    # -- register ----------------------------------------------------------------------

    def register(self, service_info: Mapping[str, object]) -> FlextResult[str]:
        """Register a service instance and keep it registered; returns its instance id.

        Keys: ``name`` and ``endpoint`` (required), ``type``, ``version``,
        ``capabilities`` (list of strings), ``zone``, ``weight`` (1 to 10000),
        ``instance_id`` (generated when absent), ``health_check_mode`` (``"ttl_only"``,
        the default, or ``"grpc"``: the control plane then calls grpc.health.v1 on the
        endpoint), ``labels`` and ``metadata`` (dicts).

        ``endpoint`` is ``host:port`` or a URL: ``https://payment.company.com`` becomes
        ``payment.company.com:443`` (``http`` 80); the path is dropped and the URL kept in
        metadata as ``endpoint_url``. Any other key becomes a label when its value is a
        string of at most 255 characters, a number or a bool (stored, and discovered, as
        a string; ``true``/``false`` for bools), else metadata (JSON-like). Registering
        the same name and endpoint again from this object replaces that registration.
        """
        built = _instance_from_info(service_info)
        if built.is_failure:
            return FlextResult.fail(
                built.error, code=built.code, field_violations=built.field_violations
            )
        return self._call("register", self._register(built.value))

    async def aregister(self, service_info: Mapping[str, object]) -> FlextResult[str]:
        """Async twin of :meth:`register`."""
        built = _instance_from_info(service_info)
        if built.is_failure:
            return FlextResult.fail(
                built.error, code=built.code, field_violations=built.field_violations
            )
        return await self._acall("register", self._register(built.value))

    async def _register(self, instance: registry_pb2.ServiceInstance) -> FlextResult[str]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        if not instance.instance_id:
            for membership in self._memberships.values():
                known = membership.instance
                if (known.service_name, known.endpoint) == (
                    instance.service_name,
                    instance.endpoint,
                ):
                    instance.instance_id = known.instance_id
                    break
        # Registered here first, so that a refusal or an unreachable control plane is
        # reported to the caller; Membership then registers the same instance id again
        # (the control plane keeps its health and timings) and renews the lease.
        request = registry_pb2.RegisterRequest(instance=instance)
        request.ttl.FromNanoseconds(int(self.ttl * 1e9))
        stub = registry_pb2_grpc.RegistryServiceStub(self._get_channel())
        reply = await stub.Register(request, timeout=self.timeout)
        instance.instance_id = reply.instance.instance_id
        previous = self._memberships.pop(instance.instance_id, None)
        if previous is not None:
            await previous.stop(deregister=False)
        membership = Membership(self._get_channel, instance, ttl=self.ttl)
        membership.start()
        self._memberships[instance.instance_id] = membership
        # Wait for Membership's own registration: a Register still in flight when the
        # caller deregisters at once would otherwise bring the instance back.
        remaining = started + self.timeout - loop.time() - 0.1
        with contextlib.suppress(TimeoutError):  # it keeps trying in the background
            async with asyncio.timeout(max(remaining, 0.0)):
                await membership.registered.wait()
        return FlextResult.ok(instance.instance_id)

    # -- deregister --------------------------------------------------------------------

    def deregister(self, name_or_instance_id: str) -> FlextResult[list[str]]:
        """Remove registrations made by this object: one instance by id, or every
        instance of a service by name. Returns the instance ids removed."""
        return self._call("deregister", self._deregister(name_or_instance_id))

    async def aderegister(self, name_or_instance_id: str) -> FlextResult[list[str]]:
        """Async twin of :meth:`deregister`."""
        return await self._acall("deregister", self._deregister(name_or_instance_id))

    async def _deregister(self, key: str) -> FlextResult[list[str]]:
        chosen = [m for i, m in self._memberships.items() if key in (i, m.instance.service_name)]
        if not chosen:
            return FlextResult.fail(
                f"deregister: no service or instance {key!r} was registered by this registry",
                code="NOT_FOUND",
            )
        stub = registry_pb2_grpc.RegistryServiceStub(self._get_channel())
        removed: list[str] = []
        for membership in chosen:
            instance = membership.instance
            self._memberships.pop(instance.instance_id, None)
            await membership.stop(deregister=False)
            try:
                await stub.Deregister(
                    registry_pb2.DeregisterRequest(
                        service_name=instance.service_name, instance_id=instance.instance_id
                    ),
                    timeout=self.timeout,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: already gone
                    failure = self._rpc_failure(f"deregister {instance.instance_id!r}", exc)
                    return FlextResult.fail(
                        f"{failure.error}; its lease is no longer renewed and expires "
                        f"within {self.ttl:g}s",
                        code=failure.code,
                    )
            removed.append(instance.instance_id)
        return FlextResult.ok(removed)

    # -- discover ----------------------------------------------------------------------

    def discover(self, name: str) -> FlextResult[dict[str, object]]:
        """One healthy instance of service ``name``, picked by the service's strategy.

        The dict has the registration's keys (``name``, ``type``, ``endpoint``,
        ``version``, ``capabilities``, ``zone``, ``weight``, labels and metadata merged
        back as keys) and the control plane's view: ``instance_id``, ``health``
        (``"SERVING"``, ...), ``effective_weight``, ``response_time_ms``,
        ``uptime_percentage``, ``ejected``. NOT_FOUND for an unknown service,
        UNAVAILABLE when it has no healthy instance.
        """
        return self._call("discover", self._discover(name))

    async def adiscover(self, name: str) -> FlextResult[dict[str, object]]:
        """Async twin of :meth:`discover`."""
        return await self._acall("discover", self._discover(name))

    async def _discover(self, name: str) -> FlextResult[dict[str, object]]:
        stub = registry_pb2_grpc.RegistryServiceStub(self._get_channel())
        try:
            reply = await stub.Discover(
                registry_pb2.DiscoverRequest(service_name=name, limit=1), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                return FlextResult.fail(
                    f"discover: service {name!r} is not registered", code="NOT_FOUND"
                )
            raise
        if not reply.instances:
            return FlextResult.fail(
                f"discover: service {name!r} has no healthy instance", code="UNAVAILABLE"
            )
        return FlextResult.ok(instance_to_dict(reply.instances[0]))

    # -- list --------------------------------------------------------------------------

    def list_services(self) -> FlextResult[list[dict[str, object]]]:
        """Every registered service: ``name``, instance counts, ``versions``, ``types``."""
        return self._call("list_services", self._list_services())

    async def alist_services(self) -> FlextResult[list[dict[str, object]]]:
        """Async twin of :meth:`list_services`."""
        return await self._acall("list_services", self._list_services())

    async def _list_services(self) -> FlextResult[list[dict[str, object]]]:
        stub = registry_pb2_grpc.RegistryServiceStub(self._get_channel())
        out: list[dict[str, object]] = []
        token = ""
        while True:
            reply = await stub.ListServices(
                registry_pb2.ListServicesRequest(page_size=1000, page_token=token),
                timeout=self.timeout,
            )
            out.extend(
                {
                    "name": s.service_name,
                    "instance_count": s.instance_count,
                    "healthy_count": s.healthy_count,
                    "unhealthy_count": s.unhealthy_count,
                    "ejected_count": s.ejected_count,
                    "versions": list(s.versions),
                    "types": list(s.types),
                    "policy_version": s.policy_version,
                }
                for s in reply.services
            )
            token = reply.next_page_token
            if not token:
                return FlextResult.ok(out)

    # -- lifecycle ---------------------------------------------------------------------

    async def _shutdown(self) -> FlextResult[None]:
        """Stop renewing every lease and deregister (best effort, within ``timeout``)."""
        memberships = list(self._memberships.values())
        self._memberships.clear()
        outcomes = await asyncio.gather(
            *(m.stop(deregister=True, within=self.timeout / 2) for m in memberships),
            return_exceptions=True,
        )
        for membership, outcome in zip(memberships, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                _log.warning(
                    "could not deregister %s: %r", membership.instance.instance_id, outcome
                )
        return FlextResult.ok(None)


# -- service_info <-> ServiceInstance --------------------------------------------------


def normalize_endpoint(endpoint: str) -> tuple[str, str]:
    """``(host:port, url)``: a URL becomes host:port (default port of its scheme);
    ``host:port`` is returned as is with an empty url. ValueError when a URL has no
    host, or no port and a scheme without a default one."""
    if "://" not in endpoint:
        return endpoint, ""
    parts = urlsplit(endpoint)
    host = parts.hostname
    if not host:
        raise ValueError(f"URL {endpoint!r} has no host")
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    if port is None:
        raise ValueError(f"URL {endpoint!r} has no port and {parts.scheme!r} no default port")
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{host}:{port}", endpoint


def _label_value(value: object) -> str | None:
    """The label form of a short scalar, None when the value belongs in metadata."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return str(value)
    if isinstance(value, str) and len(value) <= _MAX_LABEL_VALUE:
        return value
    return None


def _json_like(value: object) -> object:
    """``value`` made JSON-like (anything unknown becomes its string)."""
    return json.loads(json.dumps(value, default=str))


def _instance_from_info(info: Mapping[str, object]) -> FlextResult[registry_pb2.ServiceInstance]:
    """The ServiceInstance a ``register`` dict describes (see ``register``)."""
    if not isinstance(info, Mapping):
        return FlextResult.fail(
            f"register: service_info must be a dict, got {type(info).__name__}",
            code="INVALID_ARGUMENT",
        )
    violations: list[tuple[str, str]] = []
    name = info.get("name")
    endpoint = info.get("endpoint")
    if not isinstance(name, str) or not name:
        violations.append(("name", "is required (a non-empty string)"))
    if not isinstance(endpoint, str) or not endpoint:
        violations.append(("endpoint", "is required (host:port or a URL)"))
    instance = registry_pb2.ServiceInstance(
        service_name=name if isinstance(name, str) else "",
        health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
    )
    metadata: dict[str, object] = {}
    if isinstance(endpoint, str) and endpoint:
        try:
            instance.endpoint, url = normalize_endpoint(endpoint)
        except ValueError as exc:
            violations.append(("endpoint", str(exc)))
        else:
            if url:
                metadata["endpoint_url"] = url
    for key in ("type", "version", "zone", "instance_id"):
        value = info.get(key)
        if value is not None:
            setattr(instance, key, str(value))
    capabilities = info.get("capabilities")
    if isinstance(capabilities, str):
        instance.capabilities.append(capabilities)
    elif isinstance(capabilities, list | tuple | set | frozenset):
        instance.capabilities.extend(str(c) for c in capabilities)
    elif capabilities is not None:
        violations.append(("capabilities", "must be a list of strings"))
    weight = info.get("weight")
    if weight is not None:
        if (
            isinstance(weight, int | float)
            and not isinstance(weight, bool)
            and 1 <= weight <= 10000
        ):
            instance.weight = round(weight)
        else:
            violations.append(("weight", f"must be a number from 1 to 10000, got {weight!r}"))
    mode = info.get("health_check_mode")
    if mode is not None:
        found = _health_mode(mode)
        if found is None:
            violations.append(("health_check_mode", f"must be 'ttl_only' or 'grpc', got {mode!r}"))
        else:
            instance.health_check_mode = found
    extra_labels = info.get("labels") or {}
    extra_metadata = info.get("metadata") or {}
    if not isinstance(extra_labels, Mapping):
        violations.append(("labels", "must be a dict"))
        extra_labels = {}
    if not isinstance(extra_metadata, Mapping):
        violations.append(("metadata", "must be a dict"))
        extra_metadata = {}
    if violations:
        return FlextResult.fail(
            "register: invalid service_info: "
            + "; ".join(f"{field}: {text}" for field, text in violations),
            code="INVALID_ARGUMENT",
            field_violations=violations,
        )
    extras = [(str(k), v) for k, v in extra_labels.items()]
    extras += [(k, v) for k, v in info.items() if k not in _FIELDS and v is not None]
    for key, value in extras:
        label = _label_value(value)
        if label is not None and _LABEL_KEY.match(key) and len(instance.labels) < _MAX_LABELS:
            instance.labels[key] = label
        else:
            metadata[key] = value
    metadata.update((str(k), v) for k, v in extra_metadata.items())
    if metadata:
        instance.metadata.update(_json_like(metadata))  # type: ignore[arg-type]
    return FlextResult.ok(instance)


def _health_mode(mode: object) -> registry_pb2.HealthCheckMode.ValueType | None:
    if isinstance(mode, int) and not isinstance(mode, bool):
        return mode if mode in _MODES.values() else None  # type: ignore[return-value]
    if isinstance(mode, str):
        key = mode.lower().removeprefix("health_check_mode_")
        return _MODES.get(key)
    return None


def enum_name(prefix: str, name: str) -> str:
    """An enum value's name without its prefix (``HEALTH_STATUS_SERVING`` -> ``SERVING``)."""
    return name.removeprefix(prefix)


def instance_to_dict(instance: registry_pb2.ServiceInstance) -> dict[str, object]:
    """The guide's dict for a discovered instance (see ``ServiceRegistry.discover``)."""
    out: dict[str, object] = {}
    if instance.HasField("metadata"):
        out.update(json_format.MessageToDict(instance.metadata))
    out.update(instance.labels)
    out.update(
        {
            "name": instance.service_name,
            "type": instance.type,
            "endpoint": instance.endpoint,
            "version": instance.version,
            "capabilities": list(instance.capabilities),
            "zone": instance.zone,
            "weight": instance.weight,
            "instance_id": instance.instance_id,
            "health": enum_name("HEALTH_STATUS_", registry_pb2.HealthStatus.Name(instance.health)),
            "health_check_mode": enum_name(
                "HEALTH_CHECK_MODE_",
                registry_pb2.HealthCheckMode.Name(instance.health_check_mode),
            ),
            "effective_weight": instance.effective_weight,
            "response_time_ms": instance.response_time_ms,
            "uptime_percentage": instance.uptime_percentage,
            "ejected": instance.ejected,
        }
    )
    return out
