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


def _call(
    url: str, token: str | None, *, body: bytes | None = None, kind: str = "application/json"
) -> tuple[int, dict[str, object]]:
    """A GET (no body) or a POST of ``body`` over plain HTTP."""
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if body is not None:
        request.add_header("Content-Type", kind)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def test_the_dashboards_actions_need_the_scope_of_their_rpc(tmp_path: Path) -> None:
    """Cancel from the page is CancelExecution: scope workflow or admin; the page asks
    /permissions to show only the buttons a token may use; a body that is not JSON (a
    form another site could send) is refused before anything runs."""
    async with secured_plane(tmp_path) as mesh:
        base = f"http://127.0.0.1:{mesh.plane.http_port}/api/v1"
        cancel = f"{base}/executions/no-such-execution/cancel"

        def call(url: str, token: str | None, **kwargs: object) -> tuple[int, dict[str, object]]:
            return _call(url, token, **kwargs)  # type: ignore[arg-type]

        status, body = await asyncio.to_thread(
            call, f"{base}/permissions", mesh.tokens["dashboard"]
        )
        assert (status, body) == (
            200,
            {"actions": {"cancel_execution": False, "retry_execution": False}},
        )
        status, body = await asyncio.to_thread(call, f"{base}/permissions", mesh.tokens["operator"])
        assert (status, body) == (
            200,
            {"actions": {"cancel_execution": True, "retry_execution": True}},
        )

        status, body = await asyncio.to_thread(call, cancel, None, body=b"{}")
        assert status == 401
        status, body = await asyncio.to_thread(call, cancel, mesh.tokens["dashboard"], body=b"{}")
        assert status == 403
        assert "needs scope admin or workflow" in json.dumps(body)
        status, body = await asyncio.to_thread(
            call,
            cancel,
            mesh.tokens["ci"],
            body=b"reason=x",
            kind="application/x-www-form-urlencoded",
        )
        assert status == 415
        status, body = await asyncio.to_thread(call, cancel, mesh.tokens["ci"], body=b"[1]")
        assert status == 400
        status, body = await asyncio.to_thread(
            call, cancel, mesh.tokens["ci"], body=b'{"reason": 7}'
        )
        assert status == 400
        assert body["error"]["field_violations"][0]["field"] == "reason"  # type: ignore[index]
        status, body = await asyncio.to_thread(call, cancel, mesh.tokens["ci"], body=b"{}")
        assert (status, body["error"]["status"]) == (404, "NOT_FOUND")  # type: ignore[index]
