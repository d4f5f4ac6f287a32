"""Step processors for the orchestrator tests, served in-process or by real sidecars.

Every operation appends to a process-wide *ledger* when it really runs (not when a
sidecar replays it from its idempotency cache): the side effect the tests count. The
execution input steers what an operation does, per operation name::

    {"key": "order-7",
     "behaviour": {"reserve_inventory": {"sleep": 0.3},          # seconds, async
                   "charge": {"fail": "FAILED_PRECONDITION"},    # business failure
                   "refund": {"sleep_first": 2},                 # only the first call
                   "ship": {"unavailable_first": 2},             # infra faults first
                   "reserve": {"fail_while": "/tmp/x/down"}}}    # while that file is

The ``ledger`` operation returns the entries of a key, so a test can count side
effects in a sidecar process it does not share memory with.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from flext_mesh import FlextResult, ServiceProcessor

__all__ = ["LEDGER", "Ledger", "Step", "processors"]


class Ledger:
    """Side effects that really happened, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.entries: list[dict[str, Any]] = []
        self._calls: dict[tuple[str, str], int] = {}

    def call_number(self, operation: str, key: str) -> int:
        """How many times ``operation`` was called for ``key``, this call included."""
        with self._lock:
            n = self._calls.get((operation, key), 0) + 1
            self._calls[(operation, key)] = n
            return n

    def add(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.entries.append(entry)

    def of(self, key: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self.entries if e["key"] == key]


LEDGER = Ledger()


class Step(ServiceProcessor[dict[str, Any], dict[str, Any], dict[str, Any]]):
    """One operation: behave as the input asks, record the side effect, answer."""

    def __init__(self, service: str, operation: str, ledger: Ledger = LEDGER) -> None:
        super().__init__()
        self.service = service
        self.operation = operation
        self.ledger = ledger

    async def process(self, request: dict[str, Any]) -> FlextResult[dict[str, Any]]:
        key = str(request.get("key", ""))
        behaviour = (request.get("behaviour") or {}).get(self.operation) or {}
        call = self.ledger.call_number(self.operation, key)
        started = time.time()
        if call <= int(behaviour.get("unavailable_first", 0)):
            return FlextResult.fail(f"{self.operation} is overloaded", code="UNAVAILABLE")
        await asyncio.sleep(float(behaviour.get("sleep", 0)))
        if call == 1:
            await asyncio.sleep(float(behaviour.get("sleep_first", 0)))
        down = behaviour.get("fail_while")
        if down and await asyncio.to_thread(os.path.exists, down):
            return FlextResult.fail(
                f"{self.operation}: {down} says it is down",
                code="FAILED_PRECONDITION",
            )
        if behaviour.get("fail"):
            return FlextResult.fail(
                behaviour.get("message", f"{self.operation} refused"), code=behaviour["fail"]
            )
        self.ledger.add(
            {
                "service": self.service,
                "operation": self.operation,
                "key": key,
                "started": started,
                "ended": time.time(),
                "request": request,
            }
        )
        return FlextResult.ok(
            {
                "operation": self.operation,
                "key": key,
                "done_by": self.service,
                f"{self.operation}_id": f"{self.operation}-{key}",
                "call": call,
            }
        )

    def build(self, domain: dict[str, Any], *, correlation_id: str) -> dict[str, Any]:
        return domain


class LedgerQuery(ServiceProcessor[dict[str, Any], list[dict[str, Any]], dict[str, Any]]):
    """The ledger entries of a key."""

    def __init__(self, ledger: Ledger = LEDGER) -> None:
        super().__init__()
        self.ledger = ledger

    def process(self, request: dict[str, Any]) -> FlextResult[list[dict[str, Any]]]:
        return FlextResult.ok(self.ledger.of(str(request.get("key", ""))))

    def build(self, entries: list[dict[str, Any]], *, correlation_id: str) -> dict[str, Any]:
        return {"entries": entries}


def processors(service: str, *operations: str, ledger: Ledger = LEDGER) -> dict[str, Any]:
    """The operations of one service, plus ``ledger``."""
    served: dict[str, Any] = {op: Step(service, op, ledger) for op in operations}
    served["ledger"] = LedgerQuery(ledger)
    return served


# The guide's services, for `flext-sidecar --app tests.orchestrator.apps:NAME`.
PAYMENT = processors(
    "payment", "validate_payment", "process_payment", "refund_payment", "charge", "refund"
)
INVENTORY = processors("inventory", "reserve_inventory", "release_inventory", "reserve", "release")
SHIPPING = processors("shipping", "ship", "cancel_shipment", "create_shipment")
AUTH = processors("auth", "authenticate_user", "authenticate_request")
USERS = processors("users", "create_user_profile", "delete_user_profile", "validate_user")
NOTIFICATION = processors(
    "notification", "send_confirmation", "send_welcome_notification", "send_welcome_email"
)
