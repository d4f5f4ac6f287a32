"""Unit tests of the ``${...}`` references of step inputs."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flext_mesh.orchestrator.templates import UnresolvedReference, references, resolve

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
