"""RetryExecution of sagas that rolled back, in process: a real control plane calling
real step servers (the kill -9 and CLI cases are in tests/integration/test_retry_execution.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flext_mesh.v1 import orchestrator_pb2
from tests.orchestrator.conftest import Flow, kinds, state, states
from tests.orchestrator.test_engine import SAGA


async def _retry(flow: Flow, execution_id: str, *, wait: bool = True) -> orchestrator_pb2.Execution:
    reply = await flow.stub.RetryExecution(
        orchestrator_pb2.RetryExecutionRequest(execution_id=execution_id, wait=wait)
    )
    return reply.execution


async def _serve_saga(flow: Flow) -> None:
    await flow.serve("inventory", "reserve", "release")
    await flow.serve("payment", "charge", "refund")
    await flow.serve("notification", "notify")
    await flow.serve("shipping", "ship")


def _runs(flow: Flow, key: str) -> dict[str, int]:
    counted: dict[str, int] = {}
    for entry in flow.ledger.of(key):
        counted[entry["operation"]] = counted.get(entry["operation"], 0) + 1
    return counted


async def test_a_compensated_saga_is_retried_from_the_start(flow: Flow, tmp_path: Path) -> None:
    await _serve_saga(flow)
    down = tmp_path / "no-carrier"
    down.touch()
    behaviour: dict[str, Any] = {"ship": {"fail_while": str(down)}}
    old = await flow.wait(
        (await flow.start(SAGA, {"key": "s-1", "behaviour": behaviour})).execution_id
    )
    assert state(old) == "COMPENSATED"
    assert states(old)["notify"] == "SUCCEEDED"  # no compensation: its effect stands
    assert _runs(flow, "s-1") == {"reserve": 1, "charge": 1, "notify": 1, "refund": 1, "release": 1}

    down.unlink()
    new = await _retry(flow, old.execution_id)
    # The whole saga was rolled back: nothing is carried over, every step runs again.
    assert state(new) == "SUCCEEDED"
    assert new.retry_of == old.execution_id
    assert _runs(flow, "s-1") == {
        "reserve": 2,
        "charge": 2,
        "notify": 2,
        "refund": 1,
        "release": 1,
        "ship": 1,
    }
    history = await flow.get(new.execution_id, events=True)
    assert not [k for k in kinds(history.events) if k.startswith("STEP_CARRIED_OVER")]
    assert {s.idempotency_key for s in new.steps} == {
        f"{new.execution_id}/{name}" for name in ("reserve", "charge", "notify", "ship")
    }
    # The references of the re-run steps resolved from their new outputs.
    assert new.output["charge"]["charge_id"] == "charge-s-1"


async def test_a_compensation_failed_saga_reruns_what_was_undone_or_left(
    flow: Flow, tmp_path: Path
) -> None:
    await _serve_saga(flow)
    down = tmp_path / "no-carrier"
    down.touch()
    behaviour = {"ship": {"fail_while": str(down)}, "refund": {"fail": "UNAVAILABLE"}}
    saga = {
        **SAGA,
        "name": "saga_stuck",
        "steps": [
            SAGA["steps"][0],  # type: ignore[index]
            {
                **SAGA["steps"][1],  # type: ignore[index]
                "compensation": {
                    "operation": "refund",
                    "input": {"key": "${input.key}", "behaviour": "${input.behaviour}"},
                    "retry": {"max_attempts": 2, "initial_backoff_ms": 5},
                },
            },
            *SAGA["steps"][2:],  # type: ignore[index]
        ],
    }
    await flow.put(saga)
    old = await flow.wait(
        (await flow.start("saga_stuck", {"key": "s-2", "behaviour": behaviour})).execution_id
    )
    assert state(old) == "COMPENSATION_FAILED"
    assert states(old) == {
        "reserve": "COMPENSATED",
        "charge": "COMPENSATION_FAILED",
        "notify": "SUCCEEDED",
        "ship": "FAILED",
    }

    down.unlink()
    new = await _retry(flow, old.execution_id)
    assert state(new) == "SUCCEEDED"
    # notify's effect stood: carried over. reserve was undone and charge's undo failed
    # (an operator settles what it left): both run again, under new keys.
    runs = _runs(flow, "s-2")
    assert (runs["notify"], runs["reserve"], runs["charge"], runs["ship"]) == (1, 2, 2, 1)
    history = await flow.get(new.execution_id, events=True)
    assert "STEP_CARRIED_OVER notify" in kinds(history.events)
    carried = next(s for s in new.steps if s.step_name == "notify")
    assert carried.idempotency_key == f"{old.execution_id}/notify"
    assert carried.output == next(s for s in old.steps if s.step_name == "notify").output


async def test_retry_answers_at_once_without_wait_and_the_new_one_is_listed(
    flow: Flow, tmp_path: Path
) -> None:
    await _serve_saga(flow)
    down = tmp_path / "down"
    down.touch()
    workflow = {
        "name": "two",
        "steps": [
            {"name": "reserve", "service": "inventory"},
            {"name": "ship", "service": "shipping", "depends_on": ["reserve"]},
        ],
    }
    await flow.put(workflow)
    old = await flow.wait(
        (
            await flow.start(
                "two", {"key": "t-1", "behaviour": {"ship": {"fail_while": str(down)}}}
            )
        ).execution_id
    )
    assert state(old) == "FAILED"
    new = await _retry(flow, old.execution_id, wait=False)
    assert state(new) == "RUNNING"
    assert states(new)["reserve"] == "SUCCEEDED"
    # Still down: the retry fails again, and can itself be retried.
    again = await flow.wait(new.execution_id)
    assert state(again) == "FAILED"
    down.unlink()
    third = await _retry(flow, again.execution_id)
    assert state(third) == "SUCCEEDED"
    assert third.retry_of == again.execution_id
    assert _runs(flow, "t-1") == {"reserve": 1, "ship": 1}
    listed = await flow.stub.ListExecutions(orchestrator_pb2.ListExecutionsRequest())
    assert [e.execution_id for e in listed.executions] == [
        third.execution_id,
        new.execution_id,
        old.execution_id,
    ]
