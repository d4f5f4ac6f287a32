"""``flext-mesh xds bootstrap``: the bootstrap file of a proxyless gRPC client.

A gRPC client dialing ``xds:///SERVICE`` reads the file that ``GRPC_XDS_BOOTSTRAP``
names (or the JSON in ``GRPC_XDS_BOOTSTRAP_CONFIG``) when it creates its first xDS
channel: where the control plane is (``xds_servers``), how to reach it
(``channel_creds``: ``insecure``, or ``tls`` with a CA and optionally a client
certificate), and who the client is (``node``: its id and locality; the locality is
always present because grpc-js-xds refuses a node without one). Nothing here talks to a
control plane.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from flext_mesh.addresses import DEFAULT_LISTEN, split_addresses
from flext_mesh.cli.common import add_noun
from flext_mesh.errors import ConfigError
from flext_mesh.names import MAX_NAME

__all__ = ["BootstrapError", "add_commands", "bootstrap", "run"]


class BootstrapError(ConfigError):
    """The bootstrap cannot be written as asked; the message says why."""


def add_commands(nouns: argparse._SubParsersAction[Any]) -> None:
    """Add the ``xds`` noun with its ``bootstrap`` verb."""
    verbs = add_noun(
        nouns,
        "xds",
        help="proxyless gRPC clients (xds:///SERVICE): their bootstrap",
        description="Let gRPC clients in any language route through the mesh with no "
        "flext code: they dial xds:///SERVICE and read this bootstrap (see docs/xds.md).",
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
    """Run the parsed ``xds`` command; returns the text to print (BootstrapError)."""
    text: str = args.run(args)
    return text


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
