"""``flext-mesh certs``: a development CA and the certificates it signs, on local files.

``certs init --dir DIR`` makes ``ca.crt`` and ``ca.key`` (kept when present, unless
``--force``); ``certs issue NAME --dir DIR`` writes ``NAME.crt`` and ``NAME.key``
signed by that CA, valid for serving and as a client certificate (mTLS). Without
``--dns`` or ``--ip`` a certificate names localhost, 127.0.0.1 and ::1;
``--service payment`` adds the identity ``spiffe://flext-mesh/service/payment``. Keys
are written with mode 0600. Nothing here talks to a control plane.

For demos, tests and getting started: production certificates come from the
organization's PKI, which ``--tls-cert``/``--tls-key``/``--tls-ca`` accept as is.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from pathlib import Path
from typing import Any

from cryptography import x509

from flext_mesh.cli.common import add_noun
from flext_mesh.errors import ConfigError
from flext_mesh.security.certs import Issued, issue, load_issued, make_ca, spiffe_id

__all__ = ["CertsError", "add_commands", "run"]

#: Subject alternative names of ``certs issue`` when neither --dns nor --ip is given.
DEFAULT_DNS = ("localhost",)
DEFAULT_IPS = ("127.0.0.1", "::1")
_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_SERVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_CA = "ca"


class CertsError(ConfigError):
    """A ``certs`` command cannot do what was asked; the message says why."""


def add_commands(nouns: argparse._SubParsersAction[Any]) -> None:
    """Add the ``certs`` noun with its ``init`` and ``issue`` verbs."""
    verbs = add_noun(
        nouns,
        "certs",
        aliases=["cert"],
        help="make a development CA and certificates for TLS and mTLS",
        description="Make a development CA and the certificates it signs (local files; "
        "for demos and tests: production certificates come from your PKI).",
    )

    init_p = verbs.add(
        "init",
        _init,
        help="make the CA: DIR/ca.crt and DIR/ca.key",
        description="Make a self-signed CA as DIR/ca.crt and DIR/ca.key (mode 0600). "
        "An existing CA is kept unless --force.",
    )
    init_p.add_argument("--dir", required=True, type=Path, help="directory of the files")
    init_p.add_argument("--days", type=_days, default=365, help="validity in days")
    init_p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA (certificates it "
        "signed are then no longer trusted by those who trust the new one)",
    )

    issue_p = verbs.add(
        "issue",
        _issue,
        help="write DIR/NAME.crt and DIR/NAME.key signed by the CA",
        description="Write DIR/NAME.crt and DIR/NAME.key (mode 0600), signed by DIR/ca.crt, "
        "valid to serve and as a client certificate. Without --dns or --ip the "
        "certificate names localhost, 127.0.0.1 and ::1.",
    )
    issue_p.add_argument("name", metavar="NAME", help="file name and certificate common name")
    issue_p.add_argument("--dir", required=True, type=Path, help="directory of the CA and files")
    issue_p.add_argument(
        "--dns", action="append", default=[], metavar="NAME", help="DNS name, repeatable"
    )
    issue_p.add_argument(
        "--ip", action="append", default=[], type=_ip, metavar="ADDR", help="IP, repeatable"
    )
    identity = issue_p.add_mutually_exclusive_group()
    identity.add_argument(
        "--service",
        type=_service,
        help="identity spiffe://flext-mesh/service/SERVICE (a URI SAN)",
    )
    identity.add_argument("--spiffe", type=_spiffe, metavar="URI", help="identity URI SAN")
    issue_p.add_argument("--days", type=_days, default=90, help="validity in days")
    issue_p.add_argument("--force", action="store_true", help="replace NAME.crt and NAME.key")


def run(args: argparse.Namespace) -> str:
    """Run the parsed ``certs`` command; returns the text to print (CertsError if it fails)."""
    text: str = args.run(args)
    return text


def _init(args: argparse.Namespace) -> str:
    directory: Path = args.dir
    cert, key = directory / f"{_CA}.crt", directory / f"{_CA}.key"
    present = [path for path in (cert, key) if path.exists()]
    if present and not args.force:
        return (
            f"kept the CA already in {directory} ({', '.join(p.name for p in present)}); "
            "--force makes a new one\n"
        )
    _write(make_ca(days=args.days), directory, _CA)
    return f"wrote {cert} and {key} (CA, valid {args.days} days)\n"


def _issue(args: argparse.Namespace) -> str:
    directory: Path = args.dir
    name: str = args.name
    if not _STEM.match(name) or name == _CA:
        raise CertsError(
            f"{name!r} is not a certificate name: letters, digits, '.', '_', '-' "
            f"(at most 63), not {_CA!r}"
        )
    ca = _load_ca(directory)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    if (cert.exists() or key.exists()) and not args.force:
        raise CertsError(f"{cert} or {key} exists already; --force replaces them")
    dns, ips = list(args.dns), list(args.ip)
    if not dns and not ips:
        dns, ips = list(DEFAULT_DNS), list(DEFAULT_IPS)
    uris = [spiffe_id("service", args.service)] if args.service else []
    if args.spiffe:
        uris = [args.spiffe]
    try:
        issued = issue(ca, name, dns_names=dns, ip_addresses=ips, uris=uris, days=args.days)
    except ValueError as exc:
        raise CertsError(f"cannot issue {name}: {exc}") from exc
    _write(issued, directory, name)
    names = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips] + [f"URI:{u}" for u in uris]
    return (
        f"wrote {cert} and {key} (CN {name}; {' '.join(names)}; valid {args.days} days; "
        f"signed by {directory / f'{_CA}.crt'})\n"
    )


def _load_ca(directory: Path) -> Issued:
    cert, key = directory / f"{_CA}.crt", directory / f"{_CA}.key"
    if not cert.exists() or not key.exists():
        raise CertsError(
            f"no CA in {directory} ({_CA}.crt and {_CA}.key): run "
            f"`flext-mesh certs init --dir {directory}` first"
        )
    try:
        ca = load_issued(cert, key)
        constraints = ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise CertsError(f"cannot use the CA in {directory}: {exc}") from exc
    if not constraints.value.ca:
        raise CertsError(f"{cert} is not a CA certificate")
    return ca


def _write(issued: Issued, directory: Path, stem: str) -> None:
    """Write the pair; existing files are removed first so the key is created 0600."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for suffix in (".crt", ".key"):
            (directory / f"{stem}{suffix}").unlink(missing_ok=True)
        issued.write(directory, stem)
    except OSError as exc:
        raise CertsError(f"cannot write {stem}.crt and {stem}.key in {directory}: {exc}") from exc


def _days(value: str) -> int:
    try:
        days = int(value)
    except ValueError:
        days = 0
    if not 1 <= days <= 3650:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of days in 1..3650")
    return days


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value.strip().strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an IP address") from None


def _service(value: str) -> str:
    if not _SERVICE.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a service name")
    return value


def _spiffe(value: str) -> str:
    if not re.match(r"^spiffe://[A-Za-z0-9._-]+/\S+$", value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a SPIFFE id (spiffe://TRUST-DOMAIN/PATH)"
        )
    return value
