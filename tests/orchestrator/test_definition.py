"""Unit tests of workflow definitions: shapes, validation, references, retries, files."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, json_format
from hypothesis import given
from hypothesis import strategies as st

from flext_mesh.errors import INFRASTRUCTURE_CODES, InvalidArgument
from flext_mesh.orchestrator.definition import (
    DEFAULT_RETRYABLE,
    MAX_DEPENDS_ON,
    MAX_STEPS,
    RetrySpec,
    UnresolvedReference,
    WorkflowSpec,
    load_workflow_file,
    references,
    resolve,
    validate_workflow,
    workflow_from_dict,
)
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


# -- workflow_from_dict -------------------------------------------------------------------


def test_friendly_snake_and_camel_keys_give_the_proto_json_workflow() -> None:
    friendly = {
        "name": "checkout",
        "description": "buy things",
        "timeout": "2m",
        "steps": [
            {
                "name": "reserve",
                "service": "inventory",
                "operation": "Reserve",
                "input": {"sku": "${input.sku}", "qty": 2, "tags": ["a", None, True]},
                "timeout": 1.5,
                "retry": {
                    "maxAttempts": 4,
                    "initial_backoff_ms": 250,
                    "multiplier": 3,
                    "max_backoff": "1m30s",
                    "jitter": 0,
                    "retryable_codes": ["UNAVAILABLE", "ABORTED"],
                },
            },
            {
                "step": "charge",
                "service": "payment",
                "dependsOn": ["reserve"],
                "required": False,
                "timeout_ms": 250,
                "input": {},
                "compensation": {"operation": "refund", "timeout": "100ms", "retry": {}},
            },
        ],
    }
    canonical = {
        "name": "checkout",
        "description": "buy things",
        "timeout": "120s",
        "steps": [
            {
                "name": "reserve",
                "service": "inventory",
                "operation": "Reserve",
                "input": {"sku": "${input.sku}", "qty": 2, "tags": ["a", None, True]},
                "timeout": "1.5s",
                "retry": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.25s",
                    "backoffMultiplier": 3,
                    "maxBackoff": "90s",
                    "jitter": 0,
                    "retryableCodes": ["UNAVAILABLE", "ABORTED"],
                },
            },
            {
                "name": "charge",
                "service": "payment",
                "dependsOn": ["reserve"],
                "required": False,
                "timeout": "0.25s",
                "input": {},
                "compensation": {"operation": "refund", "timeout": "0.1s", "retry": {}},
            },
        ],
    }

    converted = workflow_from_dict(friendly)

    assert converted == json_format.ParseDict(canonical, orchestrator_pb2.Workflow())
    assert converted.steps[1].HasField("input")  # {} is an (empty) template, not "unset"
    assert converted.steps[0].retry.HasField("jitter")  # 0 is "no jitter", not "default"
    spec = validate_workflow(converted)
    assert spec.timeout == 120.0
    reserve = spec.step("reserve")
    assert reserve.retry == RetrySpec(
        max_attempts=4,
        initial_backoff=0.25,
        multiplier=3.0,
        max_backoff=90.0,
        jitter=0.0,
        retryable=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}),
    )
    charge = spec.step("charge")
    assert (charge.input, charge.required, charge.timeout) == ({}, False, 0.25)
    assert charge.compensation is not None
    assert charge.compensation.service == "payment"
    assert charge.compensation.retry.max_attempts == 5


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        (".5s", 0.5),
        ("1500us", 0.0015),
        (2, 2.0),
        (0.75, 0.75),
    ],
)
def test_durations_in_every_accepted_form(value: Any, seconds: float) -> None:
    converted = workflow_from_dict({"name": "w", "steps": [{"name": "a", "timeout": value}]})
    assert converted.steps[0].timeout.ToNanoseconds() == round(seconds * 1e9)


def test_milliseconds_keys_take_numbers() -> None:
    converted = workflow_from_dict(
        {"name": "w", "timeout_ms": 90_000, "steps": [{"name": "a", "timeoutMs": 2.5}]}
    )
    assert converted.timeout.ToNanoseconds() == 90 * 10**9
    assert converted.steps[0].timeout.ToNanoseconds() == 2_500_000


def test_none_values_count_as_absent() -> None:
    converted = workflow_from_dict(
        {"name": "w", "description": None, "steps": [{"name": "a", "input": None, "retry": None}]}
    )
    assert not converted.steps[0].HasField("input")
    assert not converted.steps[0].HasField("retry")


def test_every_shape_problem_is_reported_with_its_path() -> None:
    data = {
        "workflow_id": "w",
        "name": "w2",
        "colour": "blue",
        "steps": [
            {
                "step": "a",
                "service": 7,
                "dependson": ["b"],
                "required": "yes",
                "timeout_ms": "5s",
                "input": {"big": 2**60, "when": {1, 2}, "ok": [1, 2.5]},
                "retry": {"max_attempts": "three", "jitter": "x", "retryable_codes": "UNAVAILABLE"},
            },
            {"name": "b", "timeout": "soon", "depends_on": ["a", 3], "compensation": 12},
            "c",
            {"name": "d", "input": ["not", "an", "object"], "timeout": math.inf},
        ],
    }

    with pytest.raises(InvalidArgument) as exc:
        workflow_from_dict(data)

    found = violations(exc)
    assert [f for f, _ in found] == [
        "workflow.name",
        "workflow.colour",
        "workflow.steps[0].dependson",
        "workflow.steps[0].service",
        "workflow.steps[0].input.big",
        "workflow.steps[0].input.when",
        "workflow.steps[0].required",
        "workflow.steps[0].timeout_ms",
        "workflow.steps[0].retry.max_attempts",
        "workflow.steps[0].retry.jitter",
        "workflow.steps[0].retry.retryable_codes",
        "workflow.steps[1].depends_on[1]",
        "workflow.steps[1].timeout",
        "workflow.steps[1].compensation",
        "workflow.steps[2]",
        "workflow.steps[3].input",
        "workflow.steps[3].timeout",
    ]
    by_field = dict(found)
    assert "repeats 'workflow_id'" in by_field["workflow.name"]
    assert "did you mean 'depends_on'" in by_field["workflow.steps[0].dependson"]
    assert "'soon' is not a duration" in by_field["workflow.steps[1].timeout"]
    assert "milliseconds" in by_field["workflow.steps[0].timeout_ms"]
    assert "2**53" in by_field["workflow.steps[0].input.big"]
    assert "workflow.steps[1].timeout" in str(exc.value)


def test_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="must be an object"):
        workflow_from_dict(["steps"], field="wf")  # type: ignore[arg-type]


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


# -- references ---------------------------------------------------------------------------

CONTEXT: dict[str, Any] = {
    "input": {"order_id": "o-1", "qty": 3, "items": [{"sku": "A"}, {"sku": "B"}], "ok": True},
    "steps": {"reserve": {"output": {"id": "r-9", "price": 12.5, "whole": 4.0, "meta": None}}},
    "execution": {"id": "exec-1", "correlation_id": "corr-1"},
}


def test_a_lone_reference_keeps_its_json_type() -> None:
    template = {
        "all": "${input}",
        "qty": "${input.qty}",
        "items": "${input.items}",
        "ok": "${input.ok}",
        "meta": "${steps.reserve.output.meta}",
        "exec": ["${execution.id}", "${execution.correlation_id}"],
    }
    assert resolve(template, CONTEXT) == {
        "all": CONTEXT["input"],
        "qty": 3,
        "items": [{"sku": "A"}, {"sku": "B"}],
        "ok": True,
        "meta": None,
        "exec": ["exec-1", "corr-1"],
    }


def test_references_inside_text_are_interpolated() -> None:
    assert resolve("order ${input.order_id}!", CONTEXT) == "order o-1!"
    assert (
        resolve(
            "${input.qty}x ${input.items.1} ok=${input.ok} meta=${steps.reserve.output.meta} "
            "p=${steps.reserve.output.price} w=${steps.reserve.output.whole}",
            CONTEXT,
        )
        == '3x {"sku":"B"} ok=true meta=null p=12.5 w=4'
    )
    assert resolve("${input.order_id}${input.qty}", CONTEXT) == "o-13"


def test_escapes_and_keys_are_left_alone() -> None:
    template = {"${input.order_id}": "$${input.order_id} costs $5 and $$ ${input.qty}"}
    assert resolve(template, CONTEXT) == {
        "${input.order_id}": "${input.order_id} costs $5 and $$ 3"
    }
    assert resolve("$${input}", CONTEXT) == "${input}"
    assert references("$${input} ${input.qty}") == ["input.qty"]


def test_list_indexing_and_missing_values() -> None:
    assert resolve("${input.items.0.sku}", CONTEXT) == "A"
    cases = {
        "${steps.reserve.output.reservation_id}": "output has no key 'reservation_id'",
        "${input.items.2}": "input.items has no index 2 (length 2)",
        "${input.items.first}": "input.items is a list; 'first' is not an index",
        "${input.qty.x}": "input.qty is a number, which has no key 'x'",
        "${steps.charge.output}": "step 'charge' has no output (it has not succeeded)",
        "${input.items.0.name}": "input.items.0 has no key 'name'",
    }
    for template, reason in cases.items():
        with pytest.raises(UnresolvedReference) as exc:
            resolve({"deep": [template]}, CONTEXT)
        assert str(exc.value) == f"{template}: {reason}"
        assert exc.value.reference == template
    with pytest.raises(UnresolvedReference, match="execution has no 'id'"):
        resolve("${execution.id}", {"input": {}})


def test_malformed_references_are_refused() -> None:
    for text, reason in [
        ("${}", "is empty"),
        ("${input.}", "path segments"),
        ("${input.a b}", "path segments"),
        ("${steps.a}", "steps.NAME.output"),
        ("${steps.a.result}", "steps.NAME.output"),
        ("${execution.owner}", "execution.id and execution.correlation_id"),
        ("${env.HOME}", "must start with"),
        ("a ${input.x", "has no closing '}'"),
    ]:
        with pytest.raises(UnresolvedReference, match=reason):
            resolve(text, CONTEXT)
        with pytest.raises(UnresolvedReference, match=reason):
            references({"k": [text]})


def test_references_lists_every_expression_once_in_order() -> None:
    template = {
        "a": "${steps.reserve.output.id}",
        "b": ["x ${input.order_id} ${execution.id}", {"c": "${input.order_id}"}],
        "n": 5,
    }
    assert references(template) == ["steps.reserve.output.id", "input.order_id", "execution.id"]


def test_resolve_copies_instead_of_sharing() -> None:
    template = {"items": "${input.items}", "fixed": [1, 2]}
    result = resolve(template, CONTEXT)
    result["items"][0]["sku"] = "Z"
    result["fixed"].append(3)
    assert CONTEXT["input"]["items"][0]["sku"] == "A"
    assert template == {"items": "${input.items}", "fixed": [1, 2]}


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False)
    | st.text().filter(lambda s: "${" not in s),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_a_template_without_references_resolves_to_itself(template: Any) -> None:
    assert resolve(template, {}) == template
    assert references(template) == []


@given(st.text(), st.text().filter(lambda s: "$" not in s))
def test_interpolated_text_is_inserted_verbatim(value: str, around: str) -> None:
    assert (
        resolve(f"{around}${{input.v}}{around}", {"input": {"v": value}}) == around + value + around
    )


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


# -- files --------------------------------------------------------------------------------


def test_yaml_file_with_several_documents(tmp_path: Path) -> None:
    path = tmp_path / "flows.yaml"
    path.write_text(
        """\
workflows:
  - workflow_id: order_fulfillment_123
    steps:
      - {step: validate_payment, service: payment, required: true}
      - {step: reserve_inventory, service: inventory, required: true}
  - name: etl
    steps:
      - {name: extract, service: tap, timeout_ms: 300000}
---
name: checkout
timeout: 90s
steps:
  - name: charge
    service: payment
    input: {amount: "${input.amount}"}
    retry: {max_attempts: 5, initial_backoff: 250ms}
---
"""
    )

    loaded = load_workflow_file(path)

    assert [w.name for w in loaded] == ["order_fulfillment_123", "etl", "checkout"]
    specs = [validate_workflow(w) for w in loaded]
    assert specs[1].step("extract").timeout == 300.0
    assert specs[2].timeout == 90.0
    assert specs[2].step("charge").retry.initial_backoff == 0.25
    assert specs[2].step("charge").input == {"amount": "${input.amount}"}


def test_json_file_with_a_list_or_one_object(tmp_path: Path) -> None:
    many = tmp_path / "many.json"
    many.write_text(json.dumps([ORDER_FULFILLMENT, ETL]))
    one = tmp_path / "one.json"
    one.write_text(json.dumps(COMPLEX))

    assert [w.name for w in load_workflow_file(many)] == ["order_fulfillment_123", "etl_pipeline-7"]
    (complex_workflow,) = load_workflow_file(str(one))
    assert validate_workflow(complex_workflow) == spec_of(COMPLEX)


def test_bad_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yml"
    path.write_text("name: x\nsteps:\n  - name: a\n   service: s\n")
    with pytest.raises(InvalidArgument) as exc:
        load_workflow_file(path)
    ((field, description),) = violations(exc)
    assert field == str(path)
    assert description.startswith("line 4, column 4: ")


def test_bad_json_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "name": "x",\n  "steps": [,]\n}\n')
    with pytest.raises(InvalidArgument, match=r"broken\.json: line 3, column 13"):
        load_workflow_file(path)


def test_conversion_problems_carry_the_file_and_index(tmp_path: Path) -> None:
    path = tmp_path / "flows.yaml"
    path.write_text(
        "name: good\nsteps: [{name: a, service: s}]\n---\n"
        "name: bad\nsteps: [{name: a, service: s, timeout: soon}]\n"
    )
    with pytest.raises(InvalidArgument) as exc:
        load_workflow_file(path)
    assert [f for f, _ in violations(exc)] == [f"{path}[1].steps[0].timeout"]


def test_unusable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(InvalidArgument, match=r"missing\.yaml: cannot be read"):
        load_workflow_file(missing)
    other = tmp_path / "flow.toml"
    other.write_text("name = 'x'")
    with pytest.raises(InvalidArgument, match=r"must end in \.yaml, \.yml or \.json"):
        load_workflow_file(other)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(InvalidArgument, match="holds no workflow"):
        load_workflow_file(empty)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"workflows": ORDER_FULFILLMENT, "extra": 1}))
    with pytest.raises(InvalidArgument) as exc:
        load_workflow_file(wrapped)
    assert [d for _, d in violations(exc)] == [
        "document 1: unexpected keys beside 'workflows': ['extra']",
        "document 1: 'workflows' must be a list",
    ]
