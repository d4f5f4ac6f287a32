"""Real certificates for the security tests: the session-scoped ``pki`` fixture.

``pki`` is a development CA made once per test session (per xdist worker) in a
temporary directory, with certificates it signed, each valid for localhost, 127.0.0.1
and ::1, for serving and as a client certificate:

- ``pki.control_plane``: the control plane (URI ``spiffe://flext-mesh/control-plane/main``);
- ``pki.payment``: a "payment" service's sidecar (``spiffe://flext-mesh/service/payment``);
- ``pki.admin``: an operator's client, scope admin (``spiffe://flext-mesh/admin/operator``);
- ``pki.intruder``: signed by a *second*, untrusted CA (``pki.untrusted_ca``), claiming
  the payment identity: every process trusting ``pki.ca`` must refuse it.

``pki.issue(name, uris=...)`` signs more with the trusted CA; ``pki.client(pair)``
gives the ClientSecurity of a client showing ``pair``; ``pki.serving(pair)`` the
TLS settings (ServerConfig or SidecarConfig keywords) of a server serving it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from flext_mesh.rpc.channels import ClientSecurity
from flext_mesh.security.certs import Issued, issue, make_ca, spiffe_id

_LOOPBACK_DNS = ("localhost",)
_LOOPBACK_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Pair:
    """A certificate file and its key file (mode 0600)."""

    cert: Path
    key: Path
    uri: str = ""


@dataclass(frozen=True)
class Pki:
    """A trusted dev CA, an untrusted one, and certificates (see the module docstring)."""

    dir: Path
    ca: Path
    """ca.crt: the CA every process of the tests trusts."""
    ca_issued: Issued
    untrusted_ca: Path
    control_plane: Pair
    payment: Pair
    admin: Pair
    intruder: Pair

    def issue(
        self,
        name: str,
        *,
        uris: Iterable[str] = (),
        dns_names: Iterable[str] = _LOOPBACK_DNS,
        ip_addresses: Iterable[str] = _LOOPBACK_IPS,
    ) -> Pair:
        """Sign another certificate with the trusted CA, written as NAME.crt/NAME.key."""
        uris = tuple(uris)
        issued = issue(
            self.ca_issued, name, dns_names=dns_names, ip_addresses=ip_addresses, uris=uris
        )
        cert, key = issued.write(self.dir, name)
        return Pair(cert, key, uris[0] if uris else "")

    def client(
        self, pair: Pair | None = None, *, token: str = "", ca: Path | None = None
    ) -> ClientSecurity:
        """TLS trusting ``ca`` (default the trusted CA), showing ``pair`` when given."""
        return ClientSecurity(
            tls_ca=str(ca or self.ca),
            tls_cert=str(pair.cert) if pair else "",
            tls_key=str(pair.key) if pair else "",
            token=token,
        )

    def serving(self, pair: Pair, client_auth: str = "none") -> dict[str, str]:
        """Keywords of ServerConfig/SidecarConfig serving ``pair`` and trusting the CA."""
        return {
            "tls_cert": str(pair.cert),
            "tls_key": str(pair.key),
            "tls_ca": str(self.ca),
            "tls_client_auth": client_auth,
        }

    def serve_flags(self, pair: Pair, client_auth: str = "none") -> list[str]:
        """The same as command-line flags of ``flext-mesh serve`` and ``flext-sidecar``."""
        flags: list[str] = []
        for name, value in self.serving(pair, client_auth).items():
            flags += [f"--{name.replace('_', '-')}", value]
        return flags


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The session's certificates (see the module docstring)."""
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca("flext-mesh test CA")
    ca_cert, _ = ca.write(directory, "ca")
    other = make_ca("untrusted test CA")
    other_cert, _ = other.write(directory, "untrusted-ca")

    def signed(by: Issued, name: str, uri: str) -> Pair:
        issued = issue(by, name, dns_names=_LOOPBACK_DNS, ip_addresses=_LOOPBACK_IPS, uris=[uri])
        cert, key = issued.write(directory, name)
        return Pair(cert, key, uri)

    return Pki(
        dir=directory,
        ca=ca_cert,
        ca_issued=ca,
        untrusted_ca=other_cert,
        control_plane=signed(ca, "control-plane", spiffe_id("control-plane", "main")),
        payment=signed(ca, "payment", spiffe_id("service", "payment")),
        admin=signed(ca, "admin", spiffe_id("admin", "operator")),
        intruder=signed(other, "intruder", spiffe_id("service", "payment")),
    )
