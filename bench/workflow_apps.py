"""The processors ``bench.orchestrator`` chains: three trivial async steps over dicts.

A sidecar serves them as service ``chain`` (``flext-sidecar --service chain --app
bench.workflow_apps:PROCESSORS``); the benchmark runs them as the workflow
``a -> b -> c`` through the orchestrator, and calls them directly, in the same order,
as its baseline. Each step needs the previous step's output, so a chain that passes the
wrong data fails instead of measuring nothing:

- ``a`` takes ``{"key": K}`` (the execution input) and returns ``{"id": "a-K"}``;
- ``b`` takes ``{"a_id": ID}`` (``${steps.a.output.id}``) and returns ``{"id": "b-ID"}``;
- ``c`` takes ``{"b_id": ID}`` (``${steps.b.output.id}``) and returns ``{"id": "c-ID"}``.

A missing field is a business rejection (``INVALID_ARGUMENT``): no retry, the step fails.
"""

from __future__ import annotations

from typing import Any

from flext_mesh import FlextResult, ServiceProcessor

__all__ = ["INPUT", "PROCESSORS", "SERVICE", "Link", "expected_output"]

SERVICE = "chain"
"""The service name the sidecar registers the processors under."""
INPUT: dict[str, Any] = {"key": "k-0042"}
"""The input of every execution and of every direct chain's first call."""


class Link(ServiceProcessor[dict[str, Any], dict[str, Any], dict[str, Any]]):
    """One step: read ``needs`` from the request, answer ``{"id": "<name>-<value>"}``."""

    def __init__(self, name: str, needs: str) -> None:
        super().__init__()
        self.name = name
        self.needs = needs

    async def process(self, request: dict[str, Any]) -> FlextResult[dict[str, Any]]:
        value = request.get(self.needs)
        if not isinstance(value, str) or not value:
            return FlextResult[dict[str, Any]].fail(
                f"{self.name} needs a non-empty string {self.needs!r}", code="INVALID_ARGUMENT"
            )
        return FlextResult[dict[str, Any]].ok({"id": f"{self.name}-{value}"})

    def build(self, domain: dict[str, Any], *, correlation_id: str) -> dict[str, Any]:
        return domain


PROCESSORS: dict[str, ServiceProcessor[Any, Any, Any]] = {
    "a": Link("a", "key"),
    "b": Link("b", "a_id"),
    "c": Link("c", "b_id"),
}
"""Operation name -> processor, for ``--app bench.workflow_apps:PROCESSORS``."""


def expected_output(key: str = INPUT["key"]) -> str:
    """What ``c`` answers at the end of a correct chain started with ``key``."""
    return f"c-b-a-{key}"
