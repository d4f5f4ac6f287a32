"""One batch of call records, read column-wise: the rules a record must pass, and its
records grouped by series.

Ingest reads each field of a batch's records into one list (a column), then checks
and groups whole columns: a rule costs a set lookup per distinct name or one numpy
comparison per batch, not Python work per record.

Reading a field of a protobuf record from Python costs about as much as parsing the
whole record did, so a batch that comes as a request is read a second way: its
encoding is parsed again as :data:`_COLUMNS`, a message whose ``records`` field (number
1, like the requests') is a *single* message holding every field of ``CallRecord`` as a
*repeated* field. Protobuf merges the occurrences of a singular message field, and a
repeated field collects the values of every occurrence: one parse in C yields each
field's values over the whole batch. A field left at its default is not on the wire,
so a column comes out whole only when every record sets that field (or none does).

A column that is neither (``success`` and ``status_code`` when some calls failed) has
its values, but not whose they are. For the fields that are varints on the wire, a
third parse tells which records set them: :data:`_PRESENCE` reads each record as a
message of those fields alone, typed ``bool``, and drops every other field; encoded
again, each record is then ``0x0a <length> (<tag> 0x01)*``, where the byte 0x0a can
only start a record and a tag only mark its field as set, so numpy finds every
record's fields at once. The column's non-zero values, in record order, belong to the
records that set the field (when a record repeats a field and the counts disagree,
the column is read record by record). Other partial columns are read record by
record.

The rules live here and only here (:func:`refusals`); a record that breaks several is
refused for the first of them, in this order:

1. ``service_name``, then ``operation``: 1-63 printable characters, not all spaces;
2. ``duration_ms``: finite, at least 0, at most one day;
3. ``status_code``: a gRPC status code (0-16);
4. ``side``: a ``CallSide``;
5. ``instance_id``, ``version``, ``caller_service`` (63 characters at most), then
   ``correlation_id`` (128);
6. ``time_unix_nano`` (0: when the batch came): at most 5 minutes in the future and
   not older than the retention.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Final, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from flext_mesh import errors
from flext_mesh.v1 import metrics_pb2

__all__ = [
    "INFRASTRUCTURE_CODES",
    "MAX_CORRELATION_ID",
    "MAX_DURATION_MS",
    "MAX_NAME",
    "CallBatch",
    "Columns",
    "Groups",
    "group_records",
    "outcome_runs",
    "records_of",
    "refusals",
    "valid_name",
]

#: Numbers of the gRPC codes that are infrastructure faults (``errors.INFRASTRUCTURE_CODES``),
#: as call records carry them.
INFRASTRUCTURE_CODES: Final = frozenset(code.value[0] for code in errors.INFRASTRUCTURE_CODES)
#: Longest service, operation, instance, version or caller name.
MAX_NAME: Final = 63
#: Longest correlation id a record may carry (as on the wire: rpc.metadata).
MAX_CORRELATION_ID: Final = 128
#: Longest call, ms (one day).
MAX_DURATION_MS: Final = 86_400_000.0
#: How far in the future a record's start may be, ns.
FUTURE_SLACK_NS: Final = 300 * 1_000_000_000
#: Width of the finest time bucket, ns.
TEN_SECONDS_NS: Final = 10_000_000_000
# CallSide numbers of metrics.proto (UNSPECIFIED, SERVER, CLIENT).
_SIDES: Final = np.array(sorted(metrics_pb2.CallSide.values()), dtype=np.int64)
_CLIENT: Final = metrics_pb2.CALL_SIDE_CLIENT
_MAX_STATUS_CODE: Final = 16
#: Outcome kind of a failed call by status code: 1 business error, 2 infrastructure
#: fault (a success is kind 0 whatever its code).
_FAILURE_KIND: Final = np.array(
    [2 if code in INFRASTRUCTURE_CODES else 1 for code in range(_MAX_STATUS_CODE + 1)],
    dtype=np.int8,
)
#: Known-good names remembered, at most (they skip the check next time).
_KNOWN_NAMES: Final = 100_000
# Largest number of possible keys a batch's grouping combines parts into before it
# numbers the keys it has anew (int64 arithmetic).
_MAX_KEY: Final = 2**40

_Floats = npt.NDArray[np.float64]
_Ints = npt.NDArray[np.int64]

#: A request holding call records as its field 1 (``records``).
CallBatch: TypeAlias = (
    metrics_pb2.ReportCallsRequest
    | metrics_pb2.StreamCallsRequest
    | metrics_pb2.DeliverCallsRequest
)


def _columns_message() -> type[Message]:
    """The message that reads a batch column-wise (see the module docstring), made
    from ``CallRecord``'s own descriptor so that the two never disagree. Message
    fields (``metadata``) are left out: they are skipped as unknown."""
    package = "flext_mesh.metrics.columns"
    file = descriptor_pb2.FileDescriptorProto(
        name="flext_mesh/metrics/columns.proto", package=package, syntax="proto3"
    )
    columns = file.message_type.add(name="CallRecordColumns")
    for source in metrics_pb2.CallRecord.DESCRIPTOR.fields:
        if source.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
            continue
        columns.field.add(
            name=source.name,
            number=source.number,
            label=FieldDescriptor.LABEL_REPEATED,
            # An enum is a varint on the wire; as int32 an unknown value stays a number.
            type=(
                FieldDescriptor.TYPE_INT32
                if source.type == FieldDescriptor.TYPE_ENUM
                else source.type
            ),
        )
    batch = file.message_type.add(name="CallBatchColumns")
    batch.field.add(
        name="records",
        number=metrics_pb2.StreamCallsRequest.RECORDS_FIELD_NUMBER,
        label=FieldDescriptor.LABEL_OPTIONAL,
        type=FieldDescriptor.TYPE_MESSAGE,
        type_name=f".{package}.CallRecordColumns",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return GetMessageClass(pool.FindMessageTypeByName(f"{package}.CallBatchColumns"))


_COLUMNS: Final = _columns_message()
#: Wire types of the fields :data:`_PRESENCE` reads (varints).
_VARINT_TYPES: Final = frozenset(
    {
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_ENUM,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_SINT64,
    }
)
_RECORD_TAG: Final = 0x0A  # field 1, length-delimited


def _presence_message() -> tuple[type[Message], dict[str, int]]:
    """The message that tells which records set their varint fields (see the module
    docstring), and the one-byte tag of each such field, by name."""
    package = "flext_mesh.metrics.presence"
    file = descriptor_pb2.FileDescriptorProto(
        name="flext_mesh/metrics/presence.proto", package=package, syntax="proto3"
    )
    row = file.message_type.add(name="CallRecordPresence")
    tags: dict[str, int] = {}
    for source in metrics_pb2.CallRecord.DESCRIPTOR.fields:
        # A record encodes as 0x0a, its length (2 bytes a field set, 8 at most), then
        # a tag and 0x01 per field set: with tags of one byte, multiples of 8 above 8,
        # none of these bytes can be taken for another.
        if source.type not in _VARINT_TYPES or not 2 <= source.number <= 15 or len(tags) == 4:
            continue
        row.field.add(
            name=source.name,
            number=source.number,
            label=FieldDescriptor.LABEL_OPTIONAL,
            type=FieldDescriptor.TYPE_BOOL,
        )
        tags[source.name] = source.number << 3  # wire type 0
    batch = file.message_type.add(name="CallBatchPresence")
    batch.field.add(
        name="records",
        number=metrics_pb2.StreamCallsRequest.RECORDS_FIELD_NUMBER,
        label=FieldDescriptor.LABEL_REPEATED,
        type=FieldDescriptor.TYPE_MESSAGE,
        type_name=f".{package}.CallRecordPresence",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    message = GetMessageClass(pool.FindMessageTypeByName(f"{package}.CallBatchPresence"))
    return message, tags


_PRESENCE, _PRESENCE_TAGS = _presence_message()
_SUCCESS_TAG: Final = _PRESENCE_TAGS["success"]


def valid_name(name: str, known: set[str]) -> bool:
    """Whether ``name`` is a good service or operation name (remembered in ``known``)."""
    if 0 < len(name) <= MAX_NAME and name.isprintable() and not name.isspace():
        if len(known) < _KNOWN_NAMES:
            known.add(name)
        return True
    return False


@dataclass(slots=True)
class Columns:
    """The fields of a batch's records, one list or array per field, in record order."""

    services: list[str]
    operations: list[str]
    instances: list[str]
    versions: list[str]
    callers: list[str]
    correlations: list[str]
    durations: _Floats
    codes: _Ints
    sides: _Ints
    successes: npt.NDArray[np.bool_]
    #: Start times, ns; a record without one gets the time the batch came.
    stamps: _Ints
    #: Distinct values of the string columns, by name, once asked for.
    seen: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, source: Sequence[metrics_pb2.CallRecord] | CallBatch, now_ns: int) -> Columns:
        """Read every field a rule or a report needs, one field at a time: from the
        encoding of a request (see the module docstring), or record by record."""
        reader = _Reader(source)
        stamps = np.array(reader.numbers("time_unix_nano"), dtype=np.int64)
        if not stamps.all():
            stamps[stamps == 0] = now_ns
        return cls(
            services=reader.strings("service_name"),
            operations=reader.strings("operation"),
            instances=reader.strings("instance_id"),
            versions=reader.strings("version"),
            callers=reader.strings("caller_service"),
            correlations=reader.strings("correlation_id"),
            durations=np.array(reader.numbers("duration_ms"), dtype=np.float64),
            codes=np.array(reader.numbers("status_code"), dtype=np.int64),
            sides=np.array(reader.numbers("side"), dtype=np.int64),
            successes=np.array(reader.numbers("success"), dtype=bool),
            stamps=stamps,
        )

    def __len__(self) -> int:
        return len(self.services)

    def distinct(self, name: str) -> set[str]:
        """The distinct values of the string column ``name`` ("services"...)."""
        found = self.seen.get(name)
        if found is None:
            found = self.seen[name] = set(getattr(self, name))
        return found


def records_of(
    source: Sequence[metrics_pb2.CallRecord] | CallBatch,
) -> Sequence[metrics_pb2.CallRecord]:
    """The records themselves, of a request or a sequence of records."""
    if isinstance(source, Sequence):
        return source
    return source.records


class _Reader:
    """The columns of one batch: whole from its encoding where every record (or none)
    sets the field, or where :data:`_PRESENCE` tells whose its values are; else record
    by record."""

    __slots__ = ("_columns", "_encoding", "_present", "_records", "_rows", "size")

    def __init__(self, source: Sequence[metrics_pb2.CallRecord] | CallBatch) -> None:
        self._columns: Any = None
        self._encoding = b""
        self._records = records_of(source)
        if not isinstance(source, Sequence):
            self._encoding = source.SerializeToString()
            columns: Any = _COLUMNS.FromString(self._encoding)
            self._columns = columns.records
        self._rows: list[metrics_pb2.CallRecord] | None = None
        # The batch encoded as _PRESENCE and where each record starts (False: unusable).
        self._present: tuple[npt.NDArray[np.uint8], _Ints] | Literal[False] | None = None
        self.size = len(self._records)

    def strings(self, name: str) -> list[str]:
        """The values of a string field, in record order."""
        if self._columns is not None:
            whole = getattr(self._columns, name)
            if len(whole) == self.size:
                return list(whole)
            if not whole:
                return [""] * self.size
        return list(map(attrgetter(name), self._each()))

    def numbers(self, name: str) -> Any:
        """The values of a numeric or boolean field, in record order (a sequence
        ``numpy.array`` takes)."""
        if self._columns is not None:
            whole = getattr(self._columns, name)
            if len(whole) == self.size:
                return whole
            if not whole:
                return np.zeros(self.size, dtype=np.int64)
            tag = _PRESENCE_TAGS.get(name)
            if tag is not None and (found := self._spread(tag, whole)) is not None:
                return found
        return list(map(attrgetter(name), self._each()))

    def _spread(self, tag: int, whole: Any) -> _Ints | None:
        """The values of a partial varint column put in their records (the others 0),
        or None when they cannot be told apart."""
        if self._present is None:
            self._present = _presence(self._encoding, self.size)
        if self._present is False:
            return None
        blob, starts = self._present
        # The records that set the field, in order.
        setting = np.searchsorted(starts, np.flatnonzero(blob == tag), side="right") - 1
        out = np.zeros(self.size, dtype=np.int64)
        if tag == _SUCCESS_TAG:
            out[setting] = 1  # a bool set is true
            return out
        values = np.array(whole, dtype=np.int64)
        values = values[values != 0]  # (a 0 on the wire is no value)
        if values.size != setting.size:
            return None  # a record that sets the field more than once
        out[setting] = values
        return out

    def _each(self) -> list[metrics_pb2.CallRecord]:
        if self._rows is None:
            self._rows = list(self._records)
        return self._rows


def _presence(encoding: bytes, size: int) -> tuple[npt.NDArray[np.uint8], _Ints] | Literal[False]:
    """A batch's encoding read as :data:`_PRESENCE` and encoded again, and where in it
    each record starts; False when that does not find ``size`` records."""
    message: Any = _PRESENCE.FromString(encoding)
    message.DiscardUnknownFields()
    blob = np.frombuffer(message.SerializeToString(), dtype=np.uint8)
    starts = np.flatnonzero(blob == _RECORD_TAG)
    if starts.size != size:  # pragma: no cover - every record is on the wire, tag first
        return False
    return blob, starts


def refusals(
    columns: Columns, *, known: set[str], now_ns: int, cutoff_ns: int
) -> dict[int, tuple[str, str]]:
    """The records that break a rule: index -> (field, reason), the first rule each
    breaks (see the module docstring). ``cutoff_ns``: the oldest start kept."""
    refused: dict[int, tuple[str, str]] = {}

    def refuse(path: str, indexes: Iterator[int] | _Ints, reason: Callable[[int], str]) -> None:
        for index in map(int, indexes):
            if index not in refused:
                refused[index] = (path, reason(index))

    for path, column in (("service_name", "services"), ("operation", "operations")):
        names: list[str] = getattr(columns, column)
        bad = {
            name
            for name in columns.distinct(column)
            if name not in known and not valid_name(name, known)
        }
        if bad:
            refuse(
                path,
                (i for i, name in enumerate(names) if name in bad),
                lambda _: "must be 1-63 printable characters",
            )
    durations = columns.durations
    if not (durations.min() >= 0.0 and durations.max() <= MAX_DURATION_MS):  # also NaN
        good = (durations >= 0.0) & (durations <= MAX_DURATION_MS)
        refuse(
            "duration_ms",
            np.flatnonzero(~good),
            lambda i: f"must be finite, at least 0 and at most 1 day, got {float(durations[i])}",
        )
    codes = columns.codes
    if not 0 <= codes.min() <= codes.max() <= _MAX_STATUS_CODE:
        refuse(
            "status_code",
            np.flatnonzero((codes < 0) | (codes > _MAX_STATUS_CODE)),
            lambda i: f"{int(codes[i])} is not a gRPC status code",
        )
    sides = columns.sides
    if not _SIDES[0] <= sides.min() <= sides.max() <= _SIDES[-1] or _SIDES.size != (
        _SIDES[-1] - _SIDES[0] + 1
    ):
        refuse(
            "side",
            np.flatnonzero(~np.isin(sides, _SIDES)),
            lambda i: f"{int(sides[i])} is not a CallSide",
        )
    for path, column, limit in (
        ("instance_id", "instances", MAX_NAME),
        ("version", "versions", MAX_NAME),
        ("caller_service", "callers", MAX_NAME),
        ("correlation_id", "correlations", MAX_CORRELATION_ID),
    ):
        values: list[str] = getattr(columns, column)
        # Names repeat (their distinct values are few); correlation ids do not.
        few = column != "correlations"
        if any(values) and max(map(len, columns.distinct(column) if few else values)) > limit:
            refuse(
                path,
                (i for i, value in enumerate(values) if len(value) > limit),
                lambda i, values=values, limit=limit: (  # type: ignore[misc]
                    f"is {len(values[i])} characters long; at most {limit}"
                ),
            )
    stamps = columns.stamps
    if stamps.max() > now_ns + FUTURE_SLACK_NS:
        refuse(
            "time_unix_nano",
            np.flatnonzero(stamps > now_ns + FUTURE_SLACK_NS),
            lambda _: "is more than 5 minutes in the future",
        )
    if stamps.min() < cutoff_ns:
        refuse(
            "time_unix_nano",
            np.flatnonzero(stamps < cutoff_ns),
            lambda _: "is older than the retention",
        )
    return refused


@dataclass(slots=True)
class Groups:
    """The good records of a batch by (service, operation, instance, version, 10 s
    bucket, side): the distinct keys in order of first appearance, and per record the
    number of its key."""

    #: (service, operation, instance, version, bucket start s, client side) per key.
    keys: list[tuple[str, str, str, str, int, bool]]
    #: Per good record (in batch order), the number of its key.
    key_of: _Ints
    #: Index in the batch of each good record.
    index: _Ints
    #: Per good record: duration ms, and outcome kind (0 success, 1 business error,
    #: 2 infrastructure fault).
    durations: _Floats
    kinds: npt.NDArray[np.int8]


def group_records(columns: Columns, refused: dict[int, Any]) -> Groups:
    """The records of ``columns`` not in ``refused`` (the :func:`refusals` of these
    columns), grouped (see :class:`Groups`)."""
    n = len(columns)
    durations, codes = columns.durations, columns.codes
    successes, sides = columns.successes, columns.sides
    tens = columns.stamps // TEN_SECONDS_NS
    index = np.arange(n, dtype=np.int64)
    # The key holds only what varies: in the usual batch, one service and version,
    # server side only, one 10 s bucket. Each part is a number per record (a name's
    # number among the column's distinct names), and the key their combination.
    parts: list[tuple[_Ints, int]] = []
    for column in ("services", "operations", "instances", "versions"):
        distinct = columns.distinct(column)
        if len(distinct) > 1:
            parts.append((_numbers(getattr(columns, column), distinct), len(distinct)))
    if refused:
        keep = np.ones(n, dtype=bool)
        keep[list(refused)] = False
        index = index[keep]
        durations, codes, successes = durations[keep], codes[keep], successes[keep]
        sides, tens = sides[keep], tens[keep]
        parts = [(numbers[keep], radix) for numbers, radix in parts]
    if successes.all():
        kinds = np.zeros(index.size, dtype=np.int8)
    else:
        kinds = _FAILURE_KIND[codes]  # 0-16: a record with another code was refused
        kinds[successes] = 0
    if not index.size:
        return Groups([], np.zeros(0, np.int64), index, durations, kinds)
    client = sides == _CLIENT
    if tens.min() != tens.max():
        low, span = tens.min(), int(tens.max() - tens.min()) + 1
        if span <= 4 * tens.size:
            parts.append((tens - low, span))
        else:
            distinct_tens, numbers = np.unique(tens, return_inverse=True)
            parts.append((numbers.astype(np.int64), distinct_tens.size))
    if client.any():
        parts.append((client.astype(np.int64), 2))
    if not parts:
        key_of = np.zeros(index.size, dtype=np.int64)
        firsts = np.zeros(1, dtype=np.int64)
    else:
        key, space = parts[0]
        for numbers, radix in parts[1:]:
            if space * radix > _MAX_KEY:
                distinct_keys, key = np.unique(key, return_inverse=True)
                space = distinct_keys.size
            key, space = key * radix + numbers, space * radix
        key_of, firsts = _first_seen(key, space)
    # Each distinct key's full values: those of its first record.
    at = index[firsts]
    starts = (tens[firsts] * 10).tolist()
    sides_of = client[firsts].tolist()
    services, operations = columns.services, columns.operations
    instances, versions = columns.instances, columns.versions
    keys = [
        (services[i], operations[i], instances[i], versions[i], start, side)
        for i, start, side in zip(at.tolist(), starts, sides_of, strict=True)
    ]
    return Groups(keys, key_of, index, durations, kinds)


def _first_seen(key: _Ints, space: int) -> tuple[_Ints, _Ints]:
    """The distinct values of ``key`` (each in ``[0, space)``) numbered in order of
    their first appearance: per value of ``key`` its number, and per number where it
    first appears."""
    size = key.size
    if space <= 4 * size + 1024:  # few possible keys: no sort of the records
        first_of = np.full(space, size, dtype=np.int64)
        np.minimum.at(first_of, key, np.arange(size))
        present = np.flatnonzero(first_of < size)
        seen = present[np.argsort(first_of[present])]
        number = np.empty(space, dtype=np.int64)
        number[seen] = np.arange(seen.size)
        return number[key], first_of[seen]
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse.ravel()], first[order]


def caller_numbers(columns: Columns, at: _Ints) -> tuple[list[str], _Ints]:
    """The callers of the records at ``at``: the distinct callers of the batch, and per
    record its caller's number among them."""
    distinct = columns.distinct("callers")
    if len(distinct) == 1:
        return list(distinct), np.zeros(at.size, dtype=np.int64)
    return list(distinct), _numbers(columns.callers, distinct)[at]


def _numbers(values: list[str], distinct: set[str]) -> _Ints:
    """Per value, its number among ``distinct`` (which holds every value)."""
    number = {value: i for i, value in enumerate(distinct)}
    return np.fromiter(map(number.__getitem__, values), dtype=np.int64, count=len(values))


def outcome_runs(infrastructure: npt.NDArray[np.bool_]) -> list[bool]:
    """The outcomes of one instance, in order (True: not an infrastructure fault), with
    each run of successes told once: outlier ejection counts consecutive faults, and a
    success only resets that count. Work in the number of faults."""
    flags: list[bool] = []
    previous = -1
    for fault in np.flatnonzero(infrastructure).tolist():
        if fault > previous + 1:
            flags.append(True)  # the successes since the previous fault
        flags.append(False)
        previous = fault
    if previous < infrastructure.size - 1:
        flags.append(True)
    return flags
