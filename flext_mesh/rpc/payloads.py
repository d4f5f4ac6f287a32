"""Application payloads on the wire: ``google.protobuf.Struct`` <-> plain Python data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

__all__ = ["dict_to_struct", "fill_struct", "struct_to_dict"]

# Whole doubles up to 2**53 are exact integers; beyond that a Struct cannot tell.
_MAX_EXACT_INT = float(2**53)


def _from_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        # NaN and the infinities are not integers; is_integer() says so.
        if number.is_integer() and abs(number) <= _MAX_EXACT_INT:
            return int(number)
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_from_value(item) for item in value.list_value.values]
    return None  # null_value, or unset


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """The Struct as plain Python data; whole numbers (5.0) become ints (5).

    A Struct carries every number as a double, so `{"qty": 5}` sent as JSON arrives as
    5.0; turning it back into 5 lets strict int fields and plain-dict processors see
    what the caller wrote. Float fields accept ints, so nothing is lost.
    """
    fields = struct.fields
    return {key: _from_value(fields[key]) for key in fields}


def fill_struct(struct: struct_pb2.Struct, data: Mapping[str, Any]) -> None:
    """Put JSON-like `data` into `struct` as `Struct.update` does (str keys; numbers
    become doubles; a value of another type raises ValueError), a third faster for the
    common flat values: every call builds one on each side."""
    fields = struct.fields
    for key, value in data.items():
        kind = type(value)
        if kind is str:
            fields[key].string_value = value
        elif kind is float or kind is int:
            fields[key].number_value = value
        elif kind is bool:
            fields[key].bool_value = value
        elif value is None:
            fields[key].null_value = struct_pb2.NULL_VALUE
        else:  # nested, or a subclass: protobuf's own rules
            struct.update({key: value})


def dict_to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    """A Struct holding JSON-like `data` (str keys; numbers become doubles)."""
    struct = struct_pb2.Struct()
    fill_struct(struct, data)
    return struct
