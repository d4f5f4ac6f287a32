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
so a column comes out whole only when every record sets that field (or none does);
the other columns are read record by record.

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
from typing import Any, Final, TypeAlias

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
    sets the field, else record by record."""

    __slots__ = ("_columns", "_records", "_rows", "size")

    def __init__(self, source: Sequence[metrics_pb2.CallRecord] | CallBatch) -> None:
        self._columns: Any = None
        self._records = records_of(source)
        if not isinstance(source, Sequence):
            columns: Any = _COLUMNS.FromString(source.SerializeToString())
            self._columns = columns.records
        self._rows: list[metrics_pb2.CallRecord] | None = None
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
        return list(map(attrgetter(name), self._each()))

    def _each(self) -> list[metrics_pb2.CallRecord]:
        if self._rows is None:
            self._rows = list(self._records)
        return self._rows


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
    services, operations = columns.services, columns.operations
    instances, versions = columns.instances, columns.versions
    if refused:
        keep = np.ones(n, dtype=bool)
        keep[list(refused)] = False
        index = index[keep]
        durations, codes, successes = durations[keep], codes[keep], successes[keep]
        sides, tens = sides[keep], tens[keep]
        picked = keep.tolist()
        services = [v for v, k in zip(services, picked, strict=True) if k]
        operations = [v for v, k in zip(operations, picked, strict=True) if k]
        instances = [v for v, k in zip(instances, picked, strict=True) if k]
        versions = [v for v, k in zip(versions, picked, strict=True) if k]
    if successes.all():
        kinds = np.zeros(index.size, dtype=np.int8)
    else:
        kinds = _FAILURE_KIND[codes]  # 0-16: a record with another code was refused
        kinds[successes] = 0
    if not index.size:
        return Groups([], np.zeros(0, np.int64), index, durations, kinds)
    # The key holds only what varies: in the usual batch, one service and version,
    # server side only, one 10 s bucket.
    client = sides == _CLIENT
    parts: list[list[Any]] = [
        values
        for values, column in zip(
            (services, operations, instances, versions),
            ("services", "operations", "instances", "versions"),
            strict=True,
        )
        if len(columns.distinct(column)) > 1
    ]
    if tens.min() != tens.max():
        parts.append(tens.tolist())
    if client.any():
        parts.append(client.tolist())
    rows: list[Any] = parts[0] if len(parts) == 1 else list(zip(*parts, strict=True))
    if not parts:
        rows, distinct = [None], {None: None}
        key_of = np.zeros(index.size, dtype=np.int64)
    else:
        distinct = dict.fromkeys(rows)
        number = {key: i for i, key in enumerate(distinct)}
        key_of = np.fromiter(map(number.__getitem__, rows), dtype=np.int64, count=len(rows))
    # Each distinct key's full values: those of its first record.
    firsts = np.zeros(len(distinct), dtype=np.int64)
    firsts[key_of[::-1]] = np.arange(key_of.size - 1, -1, -1)
    starts = (tens[firsts] * 10).tolist()
    sides_of = client[firsts].tolist()
    keys = [
        (services[i], operations[i], instances[i], versions[i], start, side)
        for i, start, side in zip(firsts.tolist(), starts, sides_of, strict=True)
    ]
    return Groups(keys, key_of, index, durations, kinds)


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
