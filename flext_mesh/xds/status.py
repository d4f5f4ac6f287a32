"""Where each xDS client stands: one rule for ListXdsClients, ``flext-mesh xds status``,
the dashboard and the ``flext_mesh_xds_clients`` gauge.

Per resource type of one stream (:func:`type_state`):

- NOT_SENT: nothing of the type was sent yet;
- NACKED: the client NACKed the last version sent (it keeps the version it last ACKed);
- SYNCED: the client ACKed the last version sent;
- PENDING: the last version was sent less than :data:`STALE_AFTER` seconds ago and is
  not answered yet (normal for a few milliseconds after each push);
- STALE: it was sent longer ago than that and is still unanswered.

A client's state (:func:`client_state`) is the worst of its types' in the order
NACKED, STALE, PENDING, SYNCED; NOT_SENT when nothing at all was sent to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, Literal, TypeAlias

from google.protobuf import duration_pb2, timestamp_pb2

from flext_mesh.errors import FieldViolation
from flext_mesh.names import raise_if
from flext_mesh.paging import decode_page_token, encode_page_token
from flext_mesh.v1 import registry_pb2
from flext_mesh.xds.resources import CDS, EDS, LDS, RDS
from flext_mesh.xds.streams import ClientState, TypeState

__all__ = [
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "MAX_SUBSCRIBED_LISTED",
    "SHORT_NAMES",
    "STALE_AFTER",
    "STATES",
    "SyncState",
    "census",
    "client_message",
    "client_state",
    "list_clients",
    "type_state",
]

#: Seconds a version may go unanswered (neither ACKed nor NACKed) before its type, and
#: the client, is STALE. gRPC clients answer within milliseconds; 5 s leaves room for a
#: busy client or network without hiding one that stopped reading its stream.
STALE_AFTER: Final = 5.0
#: ListXdsClients' page size when the request gives none, and its largest.
DEFAULT_PAGE: Final = 100
MAX_PAGE: Final = 1000
#: Subscribed names listed per type (``subscribed_count`` says how many there are).
MAX_SUBSCRIBED_LISTED: Final = 100

SyncState: TypeAlias = Literal["NOT_SENT", "SYNCED", "PENDING", "STALE", "NACKED"]
#: Every state, best first (the gauge's label values).
STATES: Final[tuple[SyncState, ...]] = ("SYNCED", "PENDING", "STALE", "NACKED", "NOT_SENT")
#: Types in the order a status view shows them, with their short names.
SHORT_NAMES: Final = {LDS: "LDS", RDS: "RDS", CDS: "CDS", EDS: "EDS"}
_WORST_FIRST: Final[tuple[SyncState, ...]] = ("NACKED", "STALE", "PENDING", "SYNCED")
_ENUM: Final[dict[SyncState, registry_pb2.XdsSyncState.ValueType]] = {
    "NOT_SENT": registry_pb2.XDS_SYNC_STATE_NOT_SENT,
    "SYNCED": registry_pb2.XDS_SYNC_STATE_SYNCED,
    "PENDING": registry_pb2.XDS_SYNC_STATE_PENDING,
    "STALE": registry_pb2.XDS_SYNC_STATE_STALE,
    "NACKED": registry_pb2.XDS_SYNC_STATE_NACKED,
}
_QUERY: Final = "ListXdsClients"


def type_state(kind: TypeState, now: float, stale_after: float = STALE_AFTER) -> SyncState:
    """Where one type of one stream stands at ``now`` (epoch seconds)."""
    if not kind.version_sent:
        return "NOT_SENT"
    if kind.nack_error and kind.nack_version == kind.version_sent:
        return "NACKED"
    if kind.version_acked == kind.version_sent:
        return "SYNCED"
    return "STALE" if now - kind.sent_time > stale_after else "PENDING"


def client_state(client: ClientState, now: float, stale_after: float = STALE_AFTER) -> SyncState:
    """Where one client stands: the worst of its types' states."""
    states = {type_state(kind, now, stale_after) for kind in client.types.values()}
    return next((state for state in _WORST_FIRST if state in states), "NOT_SENT")


def census(clients: Iterable[ClientState], now: float) -> dict[str, int]:
    """Clients per state, every state present (0 when none)."""
    counts: dict[str, int] = dict.fromkeys(STATES, 0)
    for client in clients:
        counts[client_state(client, now)] += 1
    return counts


def list_clients(
    clients: Sequence[ClientState],
    revision: int,
    page_size: int,
    page_token: str,
    now: float,
) -> registry_pb2.ListXdsClientsResponse:
    """One page of ``clients`` (sorted by stream id, as the hub lists them) as
    ListXdsClients answers it; InvalidArgument for a bad page size or token."""
    violations: list[FieldViolation] = []
    if not 0 <= page_size <= MAX_PAGE:
        violations.append(FieldViolation("page_size", f"{page_size} is not in 0..{MAX_PAGE}"))
    raise_if(violations)
    cursor = decode_page_token(page_token, _QUERY)
    after = int(cursor) if cursor.isdigit() else 0
    size = page_size or DEFAULT_PAGE
    response = registry_pb2.ListXdsClientsResponse(
        registry_revision=revision, stale_after=duration_pb2.Duration(seconds=int(STALE_AFTER))
    )
    for client in clients:
        if client.stream_id <= after:
            continue
        if len(response.clients) == size:
            last = response.clients[-1].stream_id
            response.next_page_token = encode_page_token(str(last), _QUERY)
            break
        response.clients.append(client_message(client, now))
    return response


def client_message(client: ClientState, now: float) -> registry_pb2.XdsClient:
    """One client as ListXdsClients lists it."""
    message = registry_pb2.XdsClient(
        stream_id=client.stream_id,
        node_id=client.node_id,
        zone=client.zone,
        region=client.region,
        user_agent=client.user_agent,
        peer=client.peer,
        connect_time=_timestamp(client.connected_time),
        state=_ENUM[client_state(client, now)],
        stale_requests=client.stale_requests,
    )
    for type_url, short in SHORT_NAMES.items():
        kind = client.types[type_url]
        status = message.types.add(
            type_url=type_url,
            type=short,
            version_sent=kind.version_sent,
            version_acked=kind.version_acked,
            last_nack_error=kind.nack_error,
            nacks=kind.nacks,
            responses=kind.responses,
            subscribed_count=len(kind.subscribed),
            subscribed=sorted(kind.subscribed)[:MAX_SUBSCRIBED_LISTED],
            wildcard=kind.wildcard,
            state=_ENUM[type_state(kind, now)],
        )
        for field, epoch in (
            ("last_send_time", kind.sent_time),
            ("last_ack_time", kind.ack_time),
            ("last_nack_time", kind.nack_time),
        ):
            if epoch:
                getattr(status, field).CopyFrom(_timestamp(epoch))
    return message


def _timestamp(epoch: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(round(epoch * 1e9))
    return stamp
