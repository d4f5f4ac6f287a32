"""Unit tests of workflow definitions as users write them: friendly dicts and files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from flext_mesh.errors import InvalidArgument
from flext_mesh.orchestrator.formats import load_workflow_file, workflow_from_dict
from flext_mesh.orchestrator.spec import RetrySpec, validate_workflow
from flext_mesh.v1 import orchestrator_pb2
from tests.orchestrator.test_spec import COMPLEX, ETL, ORDER_FULFILLMENT, spec_of, violations

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
        ("2", 2.0),  # seconds, as in policy files
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
