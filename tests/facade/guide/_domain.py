"""What the filled-in sections share: a JSON-in, JSON-out base for the guide's services."""

from __future__ import annotations

from typing import Any

from flext_mesh import FlextResult, FlextServices

Json = dict[str, Any]


class JsonService(FlextServices.ServiceProcessor[Json, Json, Json]):
    """A service the orchestrator calls with a JSON object; remembers what it handled.

    Subclasses write ``handle(request) -> FlextResult[Json]``; ``handled`` lists the
    requests received, so a test can see what the control plane sent.
    """

    def __init__(self) -> None:
        super().__init__()
        self.handled: list[Json] = []

    def handle(self, request: Json) -> FlextResult[Json]:
        """The business rule of the service."""
        return FlextResult.ok({})

    def process(self, request: Json, /) -> FlextResult[Json]:
        self.handled.append(request)
        return self.handle(request)

    def build(self, domain: Json, /, *, correlation_id: str) -> Json:
        return domain
