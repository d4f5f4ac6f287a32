"""One ADS stream (state of the world): subscriptions, versions, nonces, ACKs, NACKs.

The protocol, as go-control-plane's SotW server and gRFC A27 describe it:

- each response of a type carries a new ``version_info`` (a counter per stream and
  type) and a new ``nonce`` (a counter per stream);
- a request whose ``response_nonce`` is not the last nonce sent for its type is stale
  (it crossed a newer response) and is ignored;
- a request with that nonce ACKs (``error_detail`` unset: ``version_info`` is now the
  accepted version) or NACKs (``error_detail`` set: the error is recorded, the accepted
  version stays, and the rejected resources are not sent again until they change);
- a request's ``resource_names`` replace the type's subscription; a name newly
  subscribed is answered at once when it exists;
- Listeners and Clusters: every response carries every subscribed resource that
  exists (a resource left out is one the client treats as deleted); a name that does
  not exist is never sent, and gRPC clients fail calls to it after their
  does-not-exist timer (15 s). RouteConfigurations and ClusterLoadAssignments: a
  response carries only the resources that changed; an assignment of a cluster
  nothing backs is sent empty.

:class:`ClientState` is what a status view reads; nothing here knows gRPC.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from flext_mesh.xds.resources import CDS, LDS, TYPES, service_of

__all__ = ["ALL_RESOURCES_TYPES", "AdsStream", "ClientState", "StreamTotals", "TypeState"]

#: Types whose responses carry every subscribed resource (absent means deleted).
ALL_RESOURCES_TYPES = frozenset({LDS, CDS})
#: Most resource names one request may subscribe to.
MAX_NAMES = 1000
#: Longest resource name kept (a service name, ``:PORT`` and ``/VERSION``).
MAX_NAME_LENGTH = 200
#: Longest NACK message kept, characters.
MAX_ERROR = 2000

_ids = itertools.count(1)

#: Resources of one type for some names: name -> packed resource (None: does not exist).
Resolver = Callable[[str, Iterable[str], str], Mapping[str, any_pb2.Any | None]]


@dataclass(slots=True)
class TypeState:
    """One resource type on one stream, as a status view shows it."""

    #: Names subscribed (for Listeners and Clusters, empty before the first request
    #: or when the client asked for every resource: see ``wildcard``).
    subscribed: set[str] = field(default_factory=set)
    #: The client asked for every resource of the type (empty names on its first
    #: request; gRPC clients never do).
    wildcard: bool = False
    #: ``version_info`` of the last response sent; "" before any.
    version_sent: str = ""
    #: Nonce of the last response sent; "" before any.
    nonce_sent: str = ""
    #: When the last response was sent, epoch seconds; 0 before any.
    sent_time: float = 0.0
    #: The version the client last accepted; "" before any ACK.
    version_acked: str = ""
    #: When the last ACK came, epoch seconds; 0 before any.
    ack_time: float = 0.0
    #: The last NACK's error message (""  when none since the last ACK).
    nack_error: str = ""
    #: When the last NACK came, epoch seconds; 0 before any.
    nack_time: float = 0.0
    #: The version the last NACK rejected (``version_sent`` when it came).
    nack_version: str = ""
    #: NACKs received on this stream.
    nacks: int = 0
    #: Responses sent.
    responses: int = 0
    #: What the client was last sent, by name (the encoded resource), to send only
    #: changes.
    sent: dict[str, bytes] = field(default_factory=dict)


@dataclass(slots=True)
class StreamTotals:
    """Responses sent and NACKs received by every stream since start, per type URL
    (shared by the streams of one hub; Prometheus counters read them)."""

    responses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TYPES, 0))
    nacks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TYPES, 0))


@dataclass(slots=True)
class ClientState:
    """One connected xDS client: who it is and where each type stands."""

    #: A number unique in this process.
    stream_id: int
    #: The peer address as gRPC gives it.
    peer: str
    #: When the stream opened, epoch seconds.
    connected_time: float
    #: ``node.id`` from the bootstrap ("" until a request carries a node).
    node_id: str = ""
    #: ``node.locality`` (region, zone, sub_zone).
    region: str = ""
    zone: str = ""
    sub_zone: str = ""
    #: ``node.user_agent_name`` and version (e.g. "gRPC Python", "1.85.4").
    user_agent: str = ""
    #: Per type URL.
    types: dict[str, TypeState] = field(default_factory=lambda: {t: TypeState() for t in TYPES})
    #: Requests ignored because their nonce was stale.
    stale_requests: int = 0


class AdsStream:
    """The protocol state of one ADS stream; the servicer feeds requests and writes
    what :meth:`responses` returns."""

    def __init__(
        self,
        peer: str,
        resolve: Resolver,
        now: Callable[[], float] = time.time,
        totals: StreamTotals | None = None,
    ) -> None:
        """``resolve(type_url, names, caller_zone)`` gives the current resources;
        ``totals`` counts this stream's responses and NACKs with others'."""
        self.state = ClientState(stream_id=next(_ids), peer=peer, connected_time=now())
        self._resolve = resolve
        self._now = now
        self._totals = totals if totals is not None else StreamTotals()
        self._nonces = itertools.count(1)
        self._versions = {t: itertools.count(1) for t in TYPES}

    @property
    def services(self) -> set[str]:
        """Services this stream subscribed to, in any type (for the hub's index)."""
        return {service_of(n) for t in self.state.types.values() for n in t.subscribed}

    @property
    def wildcard(self) -> bool:
        """Whether the stream asked for every Listener or Cluster."""
        return any(t.wildcard for t in self.state.types.values())

    def handle(self, request: discovery_pb2.DiscoveryRequest) -> bool:
        """Apply one request; True when the subscription changed (re-index the stream).

        Raises ValueError for a request the stream cannot follow (unknown type, too
        many or too long names): the servicer ends the stream INVALID_ARGUMENT.
        """
        state = self.state
        if request.HasField("node") and not state.node_id:
            node = request.node
            state.node_id = node.id[:MAX_NAME_LENGTH]
            state.region = node.locality.region[:MAX_NAME_LENGTH]
            state.zone = node.locality.zone[:MAX_NAME_LENGTH]
            state.sub_zone = node.locality.sub_zone[:MAX_NAME_LENGTH]
            state.user_agent = f"{node.user_agent_name} {node.user_agent_version}".strip()[
                :MAX_NAME_LENGTH
            ]
        kind = state.types.get(request.type_url)
        if kind is None:
            raise ValueError(f"type_url {request.type_url[:200]!r} is not served")
        names = set(request.resource_names)
        if len(names) > MAX_NAMES:
            raise ValueError(f"resource_names has {len(names)} names; at most {MAX_NAMES}")
        if any(len(n) > MAX_NAME_LENGTH for n in names):
            raise ValueError(f"a resource name is longer than {MAX_NAME_LENGTH} characters")
        nonce = request.response_nonce
        if nonce and nonce != kind.nonce_sent:
            state.stale_requests += 1
            return False
        if not nonce:  # a first request, or the first after a reconnect: send everything
            kind.sent.clear()
            kind.wildcard = not names and request.type_url in ALL_RESOURCES_TYPES
        elif request.HasField("error_detail"):
            kind.nack_error = request.error_detail.message[:MAX_ERROR]
            kind.nack_time = self._now()
            kind.nack_version = kind.version_sent
            kind.nacks += 1  # the accepted version stays what the last ACK said
            self._totals.nacks[request.type_url] += 1
        else:
            kind.version_acked = request.version_info
            kind.ack_time = self._now()
            kind.nack_error = ""
        changed = names != kind.subscribed
        kind.subscribed = names
        if not names:
            kind.sent.clear()
        return changed

    def responses(
        self, all_names: Callable[[str], Iterable[str]] | None = None
    ) -> list[discovery_pb2.DiscoveryResponse]:
        """The responses to send now, types in make-before-break order (often none):
        what changed since each type's last response. ``all_names(type_url)`` names
        every resource of a type, for a wildcard subscription."""
        out = []
        for type_url in TYPES:
            response = self._response(type_url, all_names)
            if response is not None:
                out.append(response)
        return out

    def _response(
        self, type_url: str, all_names: Callable[[str], Iterable[str]] | None
    ) -> discovery_pb2.DiscoveryResponse | None:
        kind = self.state.types[type_url]
        names: Iterable[str] = kind.subscribed
        if kind.wildcard and all_names is not None:
            names = all_names(type_url)
        elif not names:
            return None
        current = self._resolve(type_url, names, self.state.zone)
        # Any.value is the resource's encoding: equal bytes, nothing to send. A resource
        # the client NACKed stays in ``sent``, so it is not sent again until it changes.
        encoded = {n: r.value for n, r in current.items() if r is not None}
        if type_url in ALL_RESOURCES_TYPES:
            if encoded == kind.sent:
                return None
            send = encoded
            kind.sent = dict(encoded)
        else:
            send = {n: b for n, b in encoded.items() if kind.sent.get(n) != b}
            if not send:
                return None
            kind.sent.update(send)
        version = str(next(self._versions[type_url]))
        nonce = str(next(self._nonces))
        kind.version_sent, kind.nonce_sent = version, nonce
        kind.sent_time = self._now()
        kind.responses += 1
        self._totals.responses[type_url] += 1
        return discovery_pb2.DiscoveryResponse(
            version_info=version,
            resources=[current[n] for n in sorted(send)],
            type_url=type_url,
            nonce=nonce,
        )
