"""The dashboard follows the control plane's security settings: HTTPS with its
certificate, a token with scope read when authentication is on (real certificates, a
real tokens file, a real control plane, HTTP over the network)."""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.security.conftest import Pki
from tests.security.test_auth import secured_plane


def _get(url: str, token: str | None, context: ssl.SSLContext) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_the_dashboard_serves_https_and_asks_for_a_read_token(
    tmp_path: Path, pki: Pki
) -> None:
    async with secured_plane(tmp_path, **pki.serving(pki.control_plane)) as mesh:
        url = f"https://127.0.0.1:{mesh.plane.http_port}/api/v1/services"
        trusting = ssl.create_default_context(cafile=str(pki.ca))

        def get(token: str | None) -> tuple[int, dict[str, object]]:
            return _get(url, token, trusting)

        status, body = await asyncio.to_thread(get, None)
        assert status == 401
        assert "read" in json.dumps(body)
        assert (await asyncio.to_thread(get, "fm_not-a-token"))[0] == 401
        status, body = await asyncio.to_thread(get, mesh.tokens["ci"])  # workflow scope
        assert status == 403
        assert "needs scope read" in json.dumps(body)
        for reader in ("dashboard", "operator", "payment-sidecar"):
            status, body = await asyncio.to_thread(get, mesh.tokens[reader])
            assert status == 200, (reader, body)

        # The certificate is the control plane's: a client trusting another CA refuses it.
        strangers = ssl.create_default_context(cafile=str(pki.untrusted_ca))
        with pytest.raises(urllib.error.URLError) as refused:
            await asyncio.to_thread(_get, url, mesh.tokens["dashboard"], strangers)
        assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
