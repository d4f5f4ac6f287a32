"""The control plane's web dashboard: a live page and the JSON API it reads.

Served on the control plane's HTTP port beside ``/metrics`` (``/dashboard/`` and
``/api/v1/...``); see :mod:`flext_mesh.dashboard.api` and the README's Dashboard section.
"""

from __future__ import annotations

from flext_mesh.dashboard.api import (
    API_PREFIX,
    PAGE_PATH,
    TOKEN_COOKIE,
    Authorize,
    Dashboard,
    DashboardSettings,
    bearer_token,
    http_status,
)

__all__ = [
    "API_PREFIX",
    "PAGE_PATH",
    "TOKEN_COOKIE",
    "Authorize",
    "Dashboard",
    "DashboardSettings",
    "bearer_token",
    "http_status",
]
