"""Unit tests of workflow specs: the guide's workflows, validation, retries."""

from __future__ import annotations

from collections import Counter
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format
from hypothesis import given
from hypothesis import strategies as st

from flext_mesh.errors import INFRASTRUCTURE_CODES, InvalidArgument
from flext_mesh.orchestrator.formats import workflow_from_dict
from flext_mesh.orchestrator.spec import (
    MAX_DEPENDS_ON,
    MAX_STEPS,
    RetrySpec,
    WorkflowSpec,
    validate_workflow,
)
from flext_mesh.retry import DEFAULT_RETRYABLE
from flext_mesh.v1 import orchestrator_pb2

ORDER_FULFILLMENT = {
    "workflow_id": "order_fulfillment_123",
    "steps": [
        {"step": "validate_payment", "service": "payment", "required": True},
        {"step": "reserve_inventory", "service": "inventory", "required": True},
    ],
}

WORKFLOW_DATA: dict[str, Any] = {
    "auth_data": {"user_id": "u-1", "token": "t0k"},
    "payment_data": {
        "amount": 1999,
        "currency": "EUR",
        "user": "${steps.authenticate_user.output.user_id}",
    },
    "notification_data": None,
}
COMPLEX = {
    "workflow_id": "complex_workflow_42",
    "steps": [
        {
            "step": "authenticate_user",
            "service": "auth",
            "input": WORKFLOW_DATA.get("auth_data"),
            "required": True,
            "timeout_ms": 5000,
        },
        {
            "step": "process_payment",
            "service": "payment",
            "input": WORKFLOW_DATA.get("payment_data"),
            "required": True,
            "depends_on": ["authenticate_user"],
            "timeout_ms": 10000,
        },
        {
            "step": "send_confirmation",
            "service": "notification",
            "input": WORKFLOW_DATA.get("notification_data"),
            "required": False,
            "depends_on": ["process_payment"],
            "timeout_ms": 3000,
        },
    ],
}

ETL = {
    "workflow_id": "etl_pipeline-7",
    "steps": [
        {"step": "extract", "service": "tap", "timeout_ms": 300000},
        {"step": "transform", "service": "transform", "depends_on": ["extract"]},
        {"step": "load", "service": "target", "depends_on": ["transform"]},
    ],
}


def spec_of(data: dict[str, Any]) -> WorkflowSpec:
    return validate_workflow(workflow_from_dict(data))


def violations(exc: pytest.ExceptionInfo[InvalidArgument]) -> list[tuple[str, str]]:
    return [(v.field, v.description) for v in exc.value.violations]


def step(name: str, service: str = "svc", **fields: Any) -> orchestrator_pb2.WorkflowStep:
    return orchestrator_pb2.WorkflowStep(name=name, service=service, **fields)


def workflow(*steps: orchestrator_pb2.WorkflowStep, name: str = "wf") -> orchestrator_pb2.Workflow:
    return orchestrator_pb2.Workflow(name=name, steps=steps)


# -- the guide's workflows ----------------------------------------------------------------


def test_order_fulfillment_gets_every_default() -> None:
    spec = spec_of(ORDER_FULFILLMENT)

    assert spec.name == "order_fulfillment_123"
    assert spec.timeout is None
    assert [s.name for s in spec.steps] == ["validate_payment", "reserve_inventory"]
    payment = spec.step("validate_payment")
    assert (payment.service, payment.operation) == ("payment", "validate_payment")
    assert payment.input is None  # the execution input is sent
    assert payment.required is True
    assert payment.depends_on == ()
    assert payment.timeout == 30.0
    assert payment.compensation is None
    assert payment.retry == RetrySpec(
        max_attempts=3,
        initial_backoff=0.1,
        multiplier=2.0,
        max_backoff=5.0,
        jitter=0.2,
        retryable=INFRASTRUCTURE_CODES,
    )
    assert spec.ancestors("reserve_inventory") == frozenset()  # no depends_on: parallel


def test_complex_workflow_keeps_timeouts_optional_step_inputs_and_graph() -> None:
    spec = spec_of(COMPLEX)

    assert [s.timeout for s in spec.steps] == [5.0, 10.0, 3.0]
    assert [s.required for s in spec.steps] == [True, True, False]
    auth, payment, confirm = spec.steps
    assert auth.input == {"user_id": "u-1", "token": "t0k"}
    # Whole numbers come back as ints, the reference is kept for run time.
    assert payment.input == {
        "amount": 1999,
        "currency": "EUR",
        "user": "${steps.authenticate_user.output.user_id}",
    }
    assert confirm.input is None
    assert spec.ancestors("send_confirmation") == {"authenticate_user", "process_payment"}
    assert spec.dependents("authenticate_user") == ("process_payment",)
    assert spec.dependents("send_confirmation") == ()


def test_etl_pipeline_runs_in_a_chain_with_a_long_extract() -> None:
    spec = spec_of(ETL)

    assert [(s.name, s.service, s.timeout) for s in spec.steps] == [
        ("extract", "tap", 300.0),
        ("transform", "transform", 30.0),
        ("load", "target", 30.0),
    ]
    assert all(s.required for s in spec.steps)  # required unless said otherwise
    assert spec.ancestors("load") == {"extract", "transform"}
    assert spec.dependents("extract") == ("transform",)
    with pytest.raises(KeyError):
        spec.step("publish")


def test_saga_with_compensation_shorthand_defaults_to_the_step() -> None:
    spec = spec_of(
        {
            "saga_id": "booking",
            "steps": [
                {
                    "name": "reserve",
                    "service": "inventory",
                    "timeout": "2s",
                    "compensation": "release",
                },
                {
                    "name": "charge",
                    "service": "payment",
                    "depends_on": ["reserve"],
                    "compensation": {
                        "service": "refunds",
                        "operation": "refund",
                        "input": {"charge": "${steps.charge.output.id}", "n": 1},
                        "timeout_ms": 1500,
                        "retry": {"max_attempts": 2},
                    },
                },
            ],
        }
    )

    release = spec.step("reserve").compensation
    assert release is not None
    assert (release.service, release.operation, release.input) == ("inventory", "release", None)
    assert release.timeout == 2.0
    assert release.retry.max_attempts == 5
    refund = spec.step("charge").compensation
    assert refund is not None
    assert (refund.service, refund.timeout, refund.retry.max_attempts) == ("refunds", 1.5, 2)
    assert refund.input == {"charge": "${steps.charge.output.id}", "n": 1}


# -- validate_workflow --------------------------------------------------------------------


def test_every_violation_kind_is_reported_in_one_error() -> None:
    bad = orchestrator_pb2.Workflow(
        name="",
        description="x" * 1025,
        timeout=duration_pb2.Duration(seconds=8 * 24 * 3600),
        steps=[
            step(
                "a",
                service="",
                operation="bad op",
                timeout={"seconds": 7200},
                retry={
                    "max_attempts": 11,
                    "initial_backoff": {"nanos": 100_000},
                    "backoff_multiplier": 0.5,
                    "max_backoff": {"seconds": 301},
                    "jitter": 1.5,
                    "retryable_codes": ["INVALID_ARGUMENT", "NOPE", "UNAVAILABLE"],
                },
                depends_on=["a", "ghost", "b", "b"],
            ),
            step(
                "a",
                input=json_format.ParseDict(
                    {"x": "${steps.c.output}", "y": ["${bogus}", "${steps.nope.output.id}"]},
                    orchestrator_pb2.WorkflowStep().input,
                ),
            ),
            step(
                "b",
                depends_on=["c"],
                input=json_format.ParseDict(
                    {"self": "${steps.b.output}"}, orchestrator_pb2.WorkflowStep().input
                ),
                compensation={
                    "operation": "",
                    "service": "bad service",
                    "timeout": {},
                    "retry": {"max_backoff": {"nanos": 1_000_000}},
                },
            ),
            step("c", depends_on=["b"]),
            step("-x"),
        ],
    )

    with pytest.raises(InvalidArgument) as exc:
        validate_workflow(bad)

    found = violations(exc)
    assert Counter(f for f, _ in found) == Counter(
        {
            "workflow.name": 1,
            "workflow.description": 1,
            "workflow.timeout": 1,
            "workflow.steps[0].service": 1,
            "workflow.steps[0].operation": 1,
            "workflow.steps[0].timeout": 1,
            "workflow.steps[0].retry.max_attempts": 1,
            "workflow.steps[0].retry.initial_backoff": 1,
            "workflow.steps[0].retry.backoff_multiplier": 1,
            "workflow.steps[0].retry.max_backoff": 1,
            "workflow.steps[0].retry.jitter": 1,
            "workflow.steps[0].retry.retryable_codes[0]": 1,
            "workflow.steps[0].retry.retryable_codes[1]": 1,
            "workflow.steps[0].depends_on[0]": 1,  # itself
            "workflow.steps[0].depends_on[1]": 1,  # unknown
            "workflow.steps[0].depends_on[3]": 1,  # listed twice
            "workflow.steps[1].name": 1,  # duplicate
            "workflow.steps[1].input": 3,  # not an ancestor, malformed, unknown step
            "workflow.steps[2].input": 1,  # its own output
            "workflow.steps[2].compensation.operation": 1,
            "workflow.steps[2].compensation.service": 1,
            "workflow.steps[2].compensation.timeout": 1,
            "workflow.steps[2].compensation.retry.max_backoff": 1,
            "workflow.steps[4].name": 1,
            "workflow.steps": 1,  # the cycle b -> c -> b
        }
    )
    assert len(found) == 27
    text = {d for _, d in found}
    assert "duplicate step name 'a' (also steps[0])" in text
    assert "a step cannot depend on itself" in text
    assert "'b' is listed twice (also depends_on[2])" in text
    assert "cycle: b -> c -> b (each step depends on the next)" in text
    assert any("business codes are never retried" in d for d in text)
    assert any(d.startswith("${steps.nope.output.id}: unknown step 'nope'") for d in text)
    assert any(d.startswith("${bogus}: must start with") for d in text)
    assert "${steps.c.output}: steps.c is not an ancestor of a: add it to depends_on" in text


@pytest.mark.parametrize(
    ("edges", "cycle"),
    [
        ({"a": ["b"], "b": ["c"], "c": ["a"]}, "a -> b -> c -> a"),
        ({"start": [], "x": ["start", "y"], "y": ["z"], "z": ["x"]}, "x -> y -> z -> x"),
        ({"p": ["q"], "q": ["p"]}, "p -> q -> p"),
    ],
)
def test_cycles_are_named(edges: dict[str, list[str]], cycle: str) -> None:
    wf = workflow(*(step(name, depends_on=deps) for name, deps in edges.items()))
    with pytest.raises(InvalidArgument) as exc:
        validate_workflow(wf)
    assert violations(exc) == [
        ("workflow.steps", f"cycle: {cycle} (each step depends on the next)")
    ]


def test_a_diamond_is_not_a_cycle() -> None:
    spec = validate_workflow(
        workflow(
            step("top"),
            step("left", depends_on=["top"]),
            step("right", depends_on=["top"]),
            step("bottom", depends_on=["left", "right"]),
        )
    )
    assert spec.ancestors("bottom") == {"top", "left", "right"}
    assert spec.dependents("top") == ("left", "right")


def test_references_must_follow_depends_on() -> None:
    def with_input(data: dict[str, Any], **fields: Any) -> dict[str, Any]:
        return {"service": "s", "input": data, **fields}

    good = {
        "name": "w",
        "steps": [
            {"name": "a", **with_input({"id": "${input.id}"})},
            {"name": "b", "depends_on": ["a"], **with_input({"x": "${steps.a.output.x}"})},
            # a is a transitive ancestor through b.
            {"name": "c", "depends_on": ["b"], **with_input({"x": "${steps.a.output}"})},
        ],
    }
    spec_of(good)

    bad = {
        "name": "w",
        "steps": [
            {"name": "a", "service": "s"},
            {"name": "b", **with_input({"x": "id ${steps.a.output.x}"})},
        ],
    }
    with pytest.raises(InvalidArgument) as exc:
        spec_of(bad)
    assert violations(exc) == [
        (
            "workflow.steps[1].input",
            "${steps.a.output.x}: steps.a is not an ancestor of b: add it to depends_on",
        )
    ]


def test_a_compensation_may_use_its_own_steps_output_but_not_a_later_step() -> None:
    data: dict[str, Any] = {
        "name": "w",
        "steps": [
            {"name": "a", "service": "s"},
            {
                "name": "b",
                "service": "s",
                "depends_on": ["a"],
                "compensation": {
                    "operation": "undo",
                    "input": {"mine": "${steps.b.output.id}", "up": "${steps.a.output}"},
                },
            },
        ],
    }
    spec_of(data)

    data["steps"][0]["compensation"] = {"operation": "undo", "input": {"x": "${steps.b.output}"}}
    with pytest.raises(InvalidArgument) as exc:
        spec_of(data)
    assert violations(exc) == [
        (
            "workflow.steps[0].compensation.input",
            "${steps.b.output}: steps.b is not an ancestor of a: add it to depends_on",
        )
    ]


def test_step_count_and_depends_on_limits() -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate_workflow(workflow())
    assert violations(exc) == [("workflow.steps", "needs at least one step")]

    validate_workflow(workflow(*(step(f"s{i}") for i in range(MAX_STEPS))))
    with pytest.raises(InvalidArgument) as exc:
        validate_workflow(workflow(*(step(f"s{i}") for i in range(MAX_STEPS + 1))))
    assert violations(exc) == [("workflow.steps", "has 101 steps; at most 100")]

    many = [step(f"s{i}") for i in range(MAX_DEPENDS_ON + 1)]
    last = step("last", depends_on=[s.name for s in many])
    with pytest.raises(InvalidArgument) as exc:
        validate_workflow(workflow(*many[:-1], last, name="w"))
    assert [f for f, _ in violations(exc)] == [
        "workflow.steps",  # 100 + 1 steps
        "workflow.steps[100].depends_on",  # 101 entries
        "workflow.steps[100].depends_on[100]",  # s100 is not a step here
    ]


def test_timeouts_and_retry_bounds_are_inclusive() -> None:
    wf = json_format.ParseDict(
        {
            "name": "w",
            "timeout": "604800s",
            "steps": [
                {
                    "name": "fast",
                    "service": "s",
                    "timeout": "0.001s",
                    "retry": {
                        "maxAttempts": 10,
                        "initialBackoff": "60s",
                        "backoffMultiplier": 10,
                        "maxBackoff": "300s",
                        "jitter": 1,
                    },
                },
                {"name": "slow", "service": "s", "timeout": "3600s", "retry": {"maxAttempts": 1}},
                {"name": "big", "service": "s", "retry": {"initialBackoff": "10s"}},
            ],
        },
        orchestrator_pb2.Workflow(),
    )
    spec = validate_workflow(wf)
    assert spec.timeout == 604800.0
    assert spec.step("fast").timeout == 0.001
    assert spec.step("fast").retry.max_backoff == 300.0
    assert spec.step("slow").retry.max_attempts == 1
    # The 5 s default cap never undercuts a longer initial backoff.
    assert spec.step("big").retry.max_backoff == 10.0


def test_field_prefix_is_configurable() -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate_workflow(workflow(step("a", service="")), field="inline_workflow")
    assert violations(exc) == [("inline_workflow.steps[0].service", "is required")]


# -- retries ------------------------------------------------------------------------------


def test_backoff_doubles_then_caps_without_jitter() -> None:
    retry = RetrySpec(jitter=0.0)
    waits = [retry.backoff(n, 0.999) for n in range(1, 9)]
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])


def test_jitter_shortens_the_wait_and_the_cap_holds_after_it() -> None:
    retry = RetrySpec()  # jitter 0.2
    assert retry.backoff(1, 0.0) == pytest.approx(0.1)
    assert retry.backoff(1, 0.5) == pytest.approx(0.09)
    capped = RetrySpec(initial_backoff=1.0, multiplier=2.0, max_backoff=5.0, jitter=0.5)
    # Base 8 s, jitter takes 45% away: 4.4 s, under the cap (capping first would give 2.75).
    assert capped.backoff(4, 0.9) == pytest.approx(4.4)
    assert capped.backoff(4, 0.0) == 5.0
    assert capped.backoff(10_000, 0.5) == 5.0  # no overflow
    with pytest.raises(ValueError, match="starts at 1"):
        capped.backoff(0, 0.5)
    with pytest.raises(ValueError, match="rand"):
        capped.backoff(1, 1.0)


@given(
    attempts=st.integers(1, 60),
    initial=st.floats(0.001, 60),
    multiplier=st.floats(1.0, 10.0),
    cap_over=st.floats(0, 300),
    jitter=st.floats(0, 1),
    rand=st.floats(0, 1, exclude_max=True),
)
def test_backoff_stays_between_the_jittered_and_the_full_wait(
    attempts: int, initial: float, multiplier: float, cap_over: float, jitter: float, rand: float
) -> None:
    cap = min(initial + cap_over, 300.0)
    retry = RetrySpec(
        initial_backoff=initial, multiplier=multiplier, max_backoff=cap, jitter=jitter
    )
    base = initial * multiplier ** (attempts - 1)
    wait = retry.backoff(attempts, rand)
    assert min(base * (1 - jitter), cap) * (1 - 1e-12) <= wait <= min(base, cap) * (1 + 1e-12)


def test_only_listed_codes_are_retried() -> None:
    assert DEFAULT_RETRYABLE == INFRASTRUCTURE_CODES
    default = RetrySpec()
    assert default.retries(grpc.StatusCode.UNAVAILABLE)
    assert default.retries(grpc.StatusCode.UNKNOWN)
    assert not default.retries(grpc.StatusCode.INVALID_ARGUMENT)
    assert not default.retries(grpc.StatusCode.ABORTED)
    spec = spec_of(
        {
            "name": "w",
            "steps": [{"name": "a", "service": "s", "retry": {"retryable_codes": ["ABORTED"]}}],
        }
    )
    retry = spec.step("a").retry
    assert retry.retries(grpc.StatusCode.ABORTED)
    assert not retry.retries(grpc.StatusCode.UNAVAILABLE)
