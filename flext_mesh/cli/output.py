"""What the operator commands print: aligned tables for people, JSON or YAML for scripts.

Every noun (services, workflows, executions, metrics, policy) renders through these
helpers so that each ``-o`` format looks the same across commands, as kubectl's do:

- ``table`` (the default): aligned columns, the ones worth a glance;
- ``wide``: the same table with more columns where there is more to show (the same
  as ``table`` where there is not);
- ``json``: the whole document, indented;
- ``yaml``: the same document as ``json``, in YAML block style, keys in the same order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

__all__ = [
    "COLUMN_GAP",
    "DOCUMENT_FORMATS",
    "EMPTY",
    "FORMATS",
    "enum_label",
    "enum_prefix",
    "enum_text",
    "format_date_time",
    "format_labels",
    "format_number",
    "format_time",
    "message_to_dict",
    "one_line",
    "render_document",
    "render_json",
    "render_messages",
    "render_stream_item",
    "render_table",
    "render_yaml",
]

#: Values of ``-o/--output``; the first is the default.
FORMATS = ("table", "json", "yaml", "wide")
#: The formats that print the whole document rather than a table.
DOCUMENT_FORMATS = ("json", "yaml")
#: Spaces between two table columns.
COLUMN_GAP = 3
#: What an empty cell shows, so that columns stay splittable by whitespace.
EMPTY = "-"


def _cell(value: object) -> str:
    text = str(value)
    if not text:
        return EMPTY
    if text.isprintable():
        return text
    # One row per line, whatever a label value or a note contains.
    return "".join(char if char.isprintable() else " " for char in text)


def one_line(text: str) -> str:
    """``text`` on one line: each run of white space (newlines too) as one space."""
    return " ".join(text.split())


def render_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns under a header row, one line per row, ending in a newline.

    Cells are ``str()``-ed; an empty cell shows ``-``. Lines carry no trailing spaces.
    ValueError when a row has not as many cells as there are headers.
    """
    table = [[str(h) for h in headers]]
    for number, row in enumerate(rows, start=1):
        if len(row) != len(headers):
            raise ValueError(f"row {number} has {len(row)} cells for {len(headers)} columns")
        table.append([_cell(value) for value in row])
    widths = [max(len(line[col]) for line in table) for col in range(len(headers))]
    gap = " " * COLUMN_GAP
    lines = (
        gap.join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )
    return "".join(f"{line}\n" for line in lines)


def message_to_dict(message: Message) -> dict[str, Any]:
    """A protobuf message as the JSON mapping of proto3, with the proto field names.

    Fields at their zero value are included, so scripts can rely on every key.
    """
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def render_json(document: object) -> str:
    """A JSON document (indented, ending in a newline) for ``-o json``."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def render_yaml(document: object) -> str:
    """The ``-o json`` document as YAML for ``-o yaml``: block style, keys in the JSON
    order, each value on its own line (no folding of long strings)."""
    text: str = yaml.safe_dump(
        document, sort_keys=False, default_flow_style=False, allow_unicode=True, width=float("inf")
    )
    return text


def render_document(document: object, output: str) -> str:
    """``document`` as ``-o json`` or ``-o yaml`` (``output``) prints it."""
    if output == "yaml":
        return render_yaml(document)
    return render_json(document)


def render_messages(messages: Message | Iterable[Message], output: str = "json") -> str:
    """``-o json|yaml`` of a message (an object) or of several (a list of them)."""
    if isinstance(messages, Message):
        return render_document(message_to_dict(messages), output)
    return render_document([message_to_dict(message) for message in messages], output)


def render_stream_item(message: Message, output: str) -> str:
    """One message of a live stream: a JSON object on one line, or one YAML document.

    ``-o json`` prints one object per line (JSON Lines); ``-o yaml`` starts each
    message with ``---``, so that the stream is a sequence of YAML documents.
    """
    document = message_to_dict(message)
    if output == "yaml":
        return "---\n" + render_yaml(document)
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False) + "\n"


def enum_label(name: str, prefix: str) -> str:
    """An enum value name without its prefix: ``HEALTH_STATUS_SERVING`` -> ``SERVING``."""
    return name.removeprefix(prefix)


def enum_prefix(enum: EnumDescriptor) -> str:
    """What an enum's value names start with: ``LOAD_BALANCING_STRATEGY_``, say.

    Taken from the zero value, ``PREFIX_UNSPECIFIED`` in Buf's style; "" without one.
    """
    zero = enum.values_by_number.get(0)
    if zero is not None and zero.name.endswith("_UNSPECIFIED"):
        return zero.name.removesuffix("UNSPECIFIED")
    return ""


def enum_text(enum: EnumDescriptor, value: int) -> str:
    """A value's name without the enum's prefix (``SERVING``); its number if unknown here."""
    found = enum.values_by_number.get(value)
    if found is None:  # a value newer than this CLI
        return str(value)
    return found.name.removeprefix(enum_prefix(enum))


def format_number(value: float, *, zero: str | None = None) -> str:
    """A measurement with one decimal; ``zero`` replaces 0 (e.g. ``-`` for "not measured")."""
    if value == 0 and zero is not None:
        return zero
    return f"{value:.1f}"


def format_labels(labels: Mapping[str, str]) -> str:
    """Labels as ``k=v,k=v`` sorted by key; ``-`` when there are none."""
    return ",".join(f"{key}={labels[key]}" for key in sorted(labels)) or EMPTY


def format_date_time(timestamp: Timestamp, *, millis: bool = False) -> str:
    """Local ``YYYY-MM-DD HH:MM:SS`` (then ``.mmm`` with ``millis``); ``-`` when unset."""
    if not (timestamp.seconds or timestamp.nanos):
        return EMPTY
    local = timestamp.ToDatetime(tzinfo=UTC).astimezone()
    text = local.strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{local.microsecond // 1000:03d}" if millis else text


def format_time(timestamp: Timestamp) -> str:
    """A timestamp as local ``HH:MM:SS`` (the date is left out: these are near times)."""
    return timestamp.ToDatetime(tzinfo=UTC).astimezone().strftime("%H:%M:%S")
