"""The dashboard page's static files, served from the package (no CDN, no build step).

Files are read once, when the dashboard is built, and served with a strong ``ETag``:
browsers revalidate (``Cache-Control: no-cache``) and get a bodiless 304 while the
control plane runs the same version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = ["SECURITY_HEADERS", "Asset", "load_assets"]

_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
#: Sent with every dashboard response: no framing by other sites, no sniffing, scripts
#: and styles from this origin only (uPlot sets inline styles, hence 'unsafe-inline').
SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}


@dataclass(frozen=True, slots=True)
class Asset:
    """One static file: its bytes, content type and entity tag."""

    body: bytes
    content_type: str
    etag: str

    async def serve(self, request: web.Request) -> web.Response:
        """The file, or 304 when the browser's copy is current."""
        headers = {**SECURITY_HEADERS, "ETag": self.etag, "Cache-Control": "no-cache"}
        matches = {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}
        if self.etag in matches or "*" in matches:
            return web.Response(status=304, headers=headers)
        return web.Response(body=self.body, headers={**headers, "Content-Type": self.content_type})


def load_assets(prefix: str) -> Mapping[str, Handler]:
    """Routes ``prefix + relative path`` for every file under ``static/``, and
    ``prefix`` itself for ``index.html``."""
    root = resources.files("flext_mesh.dashboard") / "static"
    routes: dict[str, Handler] = {}
    pending = [("", root)]
    while pending:
        relative, folder = pending.pop()
        for entry in folder.iterdir():
            name = f"{relative}{entry.name}"
            if entry.is_dir():
                pending.append((f"{name}/", entry))
                continue
            suffix = "." + entry.name.rpartition(".")[2]
            content_type = _TYPES.get(suffix)
            if content_type is None:  # a license text or a README line: not served
                continue
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            routes[prefix + name] = Asset(body, content_type, etag).serve
    routes[prefix] = routes[prefix + "index.html"]
    return routes
