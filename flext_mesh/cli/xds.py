"""``flext-mesh xds bootstrap``: the bootstrap file of a proxyless gRPC client;
``flext-mesh xds status``: the clients connected and where each stands.

A gRPC client dialing ``xds:///SERVICE`` reads the file that ``GRPC_XDS_BOOTSTRAP``
names (or the JSON in ``GRPC_XDS_BOOTSTRAP_CONFIG``) when it creates its first xDS
channel: where the control plane is (``xds_servers``), how to reach it
(``channel_creds``: ``insecure``, or ``tls`` with a CA and optionally a client
certificate), and who the client is (``node``: its id and locality; the locality is
always present because grpc-js-xds refuses a node without one). ``bootstrap`` talks to
no control plane; ``status`` asks one (RegistryService.ListXdsClients), which computes
each state by the rule of :mod:`flext_mesh.xds.status`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from flext_mesh.addresses import DEFAULT_LISTEN, split_addresses
from flext_mesh.cli.common import add_noun, every_page
from flext_mesh.cli.output import (
    DOCUMENT_FORMATS,
    EMPTY,
    enum_text,
    format_date_time,
    one_line,
    render_messages,
    render_table,
)
from flext_mesh.errors import ConfigError
from flext_mesh.names import MAX_NAME
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc

__all__ = [
    "STATUS_HEADERS",
    "STATUS_WIDE_HEADERS",
    "BootstrapError",
    "add_commands",
    "bootstrap",
    "run",
    "status",
]

#: Columns of ``xds status``: the client, each type's state and version, the client's
#: state and the age of its last ACK.
STATUS_HEADERS = ("NODE", "ZONE", "LDS", "RDS", "CDS", "EDS", "STATE", "SINCE")
#: Columns ``xds status -o wide`` adds.
STATUS_WIDE_HEADERS = (*STATUS_HEADERS, "USER_AGENT", "PEER", "CONNECTED", "NACK_ERROR")
_STATE = registry_pb2.XdsSyncState.DESCRIPTOR
#: Longest NACK error shown in the wide table (``-o json`` has all of it).
_NACK_SHOWN = 120


class BootstrapError(ConfigError):
    """The bootstrap cannot be written as asked; the message says why."""


def add_commands(
    nouns: argparse._SubParsersAction[Any], parents: Sequence[argparse.ArgumentParser] = ()
) -> None:
    """Add the ``xds`` noun with its ``bootstrap`` and ``status`` verbs (``parents``:
    the flags of commands that call the control plane, taken by ``status``)."""
    verbs = add_noun(
        nouns,
        "xds",
        help="proxyless gRPC clients (xds:///SERVICE): their bootstrap, their status",
        description="Let gRPC clients in any language route through the mesh with no "
        "flext code: they dial xds:///SERVICE and read this bootstrap (see docs/xds.md); "
        "see where each connected client stands.",
    )
    verbs.add(
        "status",
        status,
        help="the xDS clients connected to the control plane and where each stands",
        description="One row per connected xDS client (ADS stream): per resource type "
        "(LDS, RDS, CDS, EDS) SYNCED (it ACKed the last version sent), PENDING (sent, "
        "not answered yet), STALE (sent more than 5 s ago and not answered), NACK (it "
        "rejected the last version: -o wide shows why) or - (nothing sent); the client's "
        "state, the worst of its types'; and how long ago it last ACKed. Only the "
        "clients of the replica asked are listed.",
        parents=parents,
    )
    boot = verbs.add(
        "bootstrap",
        _bootstrap,
        help="print the bootstrap JSON a gRPC client reads (GRPC_XDS_BOOTSTRAP)",
        description="Print the xDS bootstrap of one client: write it to a file and point "
        "GRPC_XDS_BOOTSTRAP at it before the client creates its channel.",
    )
    boot.add_argument("--node-id", required=True, help="the client's id, unique per process")
    boot.add_argument(
        "--zone",
        default=os.environ.get("FLEXT_MESH_ZONE", ""),
        help="the client's zone, for policies that prefer zones (env FLEXT_MESH_ZONE)",
    )
    boot.add_argument("--region", default="", help="the client's region (informational)")
    boot.add_argument(
        "--control-plane",
        metavar="HOST:PORT[,HOST:PORT]",
        default=os.environ.get("FLEXT_MESH_CONTROL_PLANE", DEFAULT_LISTEN),
        help="control plane gRPC address; several replicas comma separated, the next "
        "ones used while the first is unreachable (default: %(default)s; env "
        "FLEXT_MESH_CONTROL_PLANE)",
    )
    for flag, what in (
        ("tls-ca", "CA bundle that verifies the control plane; set, it turns TLS on"),
        ("tls-cert", "client certificate shown to a control plane requiring mTLS"),
        ("tls-key", "private key of --tls-cert"),
    ):
        variable = f"FLEXT_MESH_{flag.replace('-', '_').upper()}"
        boot.add_argument(
            f"--{flag}",
            metavar="FILE",
            default=os.environ.get(variable, ""),
            help=f"{what} (env {variable}); paths are written absolute",
        )


def run(args: argparse.Namespace) -> str:
    """Run the parsed ``xds bootstrap``; returns the text to print (BootstrapError)."""
    text: str = args.run(args)
    return text


def status(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """Every xDS client of the control plane, one row each (or the document)."""
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    clients: list[registry_pb2.XdsClient] = every_page(
        lambda token, size: stub.ListXdsClients(
            registry_pb2.ListXdsClientsRequest(page_size=size, page_token=token),
            timeout=args.timeout,
        ),
        lambda page: page.clients,
    )
    if args.output in DOCUMENT_FORMATS:
        return render_messages(clients, args.output)
    now = time.time()
    clients.sort(key=lambda c: (c.node_id, c.stream_id))
    wide = args.output == "wide"
    rows = [_row(client, now, wide=wide) for client in clients]
    return render_table(STATUS_WIDE_HEADERS if wide else STATUS_HEADERS, rows)


def _row(client: registry_pb2.XdsClient, now: float, *, wide: bool) -> tuple[str, ...]:
    acks = [t.last_ack_time.ToNanoseconds() / 1e9 for t in client.types if _set(t.last_ack_time)]
    row = (
        client.node_id or EMPTY,
        client.zone or EMPTY,
        *(_type_cell(t, now) for t in client.types),
        enum_text(_STATE, client.state),
        _ago(now - max(acks)) if acks else EMPTY,
    )
    if not wide:
        return row
    error = next((t.last_nack_error for t in client.types if t.last_nack_error), "")
    return (
        *row,
        client.user_agent or EMPTY,
        client.peer or EMPTY,
        format_date_time(client.connect_time),
        one_line(error)[:_NACK_SHOWN] or EMPTY,
    )


def _type_cell(kind: registry_pb2.XdsTypeStatus, now: float) -> str:
    """One type in short: ``SYNCED v12``, ``PENDING v13``, ``STALE v13 (sent 7s ago)``,
    ``NACK v13`` or ``-`` (nothing sent)."""
    state = kind.state
    if state == registry_pb2.XDS_SYNC_STATE_SYNCED:
        return f"SYNCED v{kind.version_acked}"
    if state == registry_pb2.XDS_SYNC_STATE_NACKED:
        return f"NACK v{kind.version_sent}"
    if state == registry_pb2.XDS_SYNC_STATE_STALE:
        sent = now - kind.last_send_time.ToNanoseconds() / 1e9
        return f"STALE v{kind.version_sent} (sent {_ago(sent)})"
    if state == registry_pb2.XDS_SYNC_STATE_PENDING:
        return f"PENDING v{kind.version_sent}"
    return EMPTY


def _set(stamp: Timestamp) -> bool:
    return bool(stamp.seconds or stamp.nanos)


def _ago(seconds: float) -> str:
    """``7s ago``, ``3m ago``, ``2h ago``."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds // 60:.0f}m ago"
    return f"{seconds // 3600:.0f}h ago"


def _bootstrap(args: argparse.Namespace) -> str:
    data = bootstrap(
        node_id=args.node_id,
        zone=args.zone,
        region=args.region,
        control_plane=args.control_plane,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    return json.dumps(data, indent=2) + "\n"


def bootstrap(
    *,
    node_id: str,
    control_plane: str = DEFAULT_LISTEN,
    zone: str = "",
    region: str = "",
    tls_ca: str = "",
    tls_cert: str = "",
    tls_key: str = "",
) -> dict[str, Any]:
    """The bootstrap JSON (as a dict) of one client; BootstrapError for bad input."""
    if not node_id.strip() or len(node_id) > 256:
        raise BootstrapError("--node-id must be 1 to 256 characters")
    for flag, value in (("--zone", zone), ("--region", region)):
        if len(value) > MAX_NAME:
            raise BootstrapError(f"{flag} is longer than {MAX_NAME} characters")
    try:
        servers = split_addresses(control_plane)
    except ValueError as exc:
        raise BootstrapError(f"--control-plane: {exc}") from None
    if bool(tls_cert) != bool(tls_key):
        raise BootstrapError("--tls-cert and --tls-key go together")
    if tls_cert and not tls_ca:
        raise BootstrapError("--tls-cert and --tls-key need --tls-ca")
    creds: dict[str, Any] = {"type": "insecure"}
    if tls_ca:
        config = {"ca_certificate_file": _file("--tls-ca", tls_ca)}
        if tls_cert:
            config["certificate_file"] = _file("--tls-cert", tls_cert)
            config["private_key_file"] = _file("--tls-key", tls_key)
        creds = {"type": "tls", "config": config}
    return {
        "xds_servers": [
            {
                "server_uri": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                "channel_creds": [creds],
                "server_features": ["xds_v3"],
            }
            for host, port in servers
        ],
        # grpc-js-xds refuses a node without a locality: always write one.
        "node": {"id": node_id, "locality": {"region": region, "zone": zone}},
    }


def _file(flag: str, path: str) -> str:
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise BootstrapError(f"{flag} {path}: no such file")
    return str(resolved)
