"""A Node.js client (@grpc/grpc-js) of a control plane serving TLS with tokens and
client certificates: the security settings are not Python-only (real certificates,
a real tokens file, a real `flext-mesh serve`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from flext_mesh.security.certs import spiffe_id
from flext_mesh.security.tokens import add_token
from tests.conftest import REPO, start_serve
from tests.security.conftest import Pki

NODE_TEST = REPO / "tests" / "polyglot" / "secure.test.mjs"


def test_a_node_client_uses_tls_tokens_and_its_certificate_identity(
    tmp_path: Path, pki: Pki
) -> None:
    node = shutil.which("node")
    assert node, "node not found: install Node.js 20+ and run 'make install-dev' (npm ci)"
    tokens = tmp_path / "tokens.yaml"
    token = add_token(tokens, "node-payments", ["service:node-payments"])
    anonymous = pki.issue("node-anonymous")
    orders = pki.issue("node-orders", uris=[spiffe_id("service", "node-orders")])
    # Client certificates are required (`optional` is refused, see SECURITY.md); a
    # token, when sent, decides over the certificate.
    server = start_serve(
        tmp_path,
        *pki.serve_flags(pki.control_plane, "require"),
        "--auth-tokens-file",
        str(tokens),
    )
    try:
        proc = subprocess.run(
            [node, "--test", str(NODE_TEST.relative_to(REPO))],
            cwd=REPO,
            env={
                **os.environ,
                "FLEXT_MESH_ADDRESS": server.address,
                "FLEXT_MESH_TLS_CA": str(pki.ca),
                "FLEXT_MESH_TLS_CERT": str(anonymous.cert),
                "FLEXT_MESH_TLS_KEY": str(anonymous.key),
                "FLEXT_MESH_ID_CERT": str(orders.cert),
                "FLEXT_MESH_ID_KEY": str(orders.key),
                "FLEXT_MESH_TOKEN": token,
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, (
            f"node --test exited {proc.returncode}\n--- stdout ---\n{proc.stdout}\n"
            f"--- stderr ---\n{proc.stderr}\n--- server log ---\n{server.log()}"
        )
        assert "# fail 0" in proc.stdout, proc.stdout
    finally:
        if server.proc.poll() is None:
            server.kill()
