"""Processors the xDS interop tests serve with ``--app tests.xds.apps:...``."""

from __future__ import annotations

from typing import Any

from flext_mesh import FlextResult, ServiceProcessor


class Broken(ServiceProcessor[dict[str, Any], None, dict[str, Any]]):
    """Refuses every call (FAILED_PRECONDITION): the control plane does not eject it
    for a business refusal; a gRPC client, which counts every non-OK call, does."""

    def process(self, request: dict[str, Any]) -> FlextResult[None]:
        return FlextResult[None].fail("backend down", code="FAILED_PRECONDITION")

    def build(self, result: None, *, correlation_id: str) -> dict[str, Any]:
        return {}


FAILING = {"charge": Broken()}
