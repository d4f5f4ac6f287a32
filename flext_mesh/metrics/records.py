"""One batch of call records, read column-wise: the rules a record must pass, and its
records grouped by series.

Ingest reads each field of a batch's records into one list (a column), then checks
and groups whole columns: a rule costs a set lookup per distinct name or one numpy
comparison per batch, not Python work per record. The rules live here and only here
(:func:`refusals`); a record that breaks several is refused for the first of them,
in this order:

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
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from flext_mesh import errors
from flext_mesh.v1 import metrics_pb2

__all__ = [
    "INFRASTRUCTURE_CODES",
    "MAX_CORRELATION_ID",
    "MAX_DURATION_MS",
    "MAX_NAME",
    "Columns",
    "Groups",
    "group_records",
    "outcome_runs",
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

    @classmethod
    def read(cls, records: Sequence[metrics_pb2.CallRecord], now_ns: int) -> Columns:
        """Read every field a rule or a report needs, one field at a time."""
        rows = list(records)
        stamps = np.array([r.time_unix_nano for r in rows], dtype=np.int64)
        if not stamps.all():
            stamps[stamps == 0] = now_ns
        return cls(
            services=[r.service_name for r in rows],
            operations=[r.operation for r in rows],
            instances=[r.instance_id for r in rows],
            versions=[r.version for r in rows],
            callers=[r.caller_service for r in rows],
            correlations=[r.correlation_id for r in rows],
            durations=np.array([r.duration_ms for r in rows], dtype=np.float64),
            codes=np.array([r.status_code for r in rows], dtype=np.int64),
            sides=np.array([r.side for r in rows], dtype=np.int64),
            successes=np.array([r.success for r in rows], dtype=bool),
            stamps=stamps,
        )

    def __len__(self) -> int:
        return len(self.services)


def refusals(
    columns: Columns, *, known: set[str], now_ns: int, cutoff_ns: int
) -> dict[int, tuple[str, str]]:
    """The records that break a rule: index -> (field, reason), the first rule each
    breaks (see the module docstring). ``cutoff_ns``: the oldest start kept."""
    refused: dict[int, tuple[str, str]] = {}

    def refuse(field: str, indexes: Iterator[int] | _Ints, reason: Callable[[int], str]) -> None:
        for index in map(int, indexes):
            if index not in refused:
                refused[index] = (field, reason(index))

    for field, names in (("service_name", columns.services), ("operation", columns.operations)):
        bad = {name for name in set(names) if name not in known and not valid_name(name, known)}
        if bad:
            refuse(
                field,
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
    for field, values, limit in (
        ("instance_id", columns.instances, MAX_NAME),
        ("version", columns.versions, MAX_NAME),
        ("caller_service", columns.callers, MAX_NAME),
        ("correlation_id", columns.correlations, MAX_CORRELATION_ID),
    ):
        if max(map(len, values)) > limit:
            refuse(
                field,
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
    """The records of ``columns`` not in ``refused``, grouped (see :class:`Groups`)."""
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
    kinds = np.where(successes, 0, _FAILURE_KIND[np.clip(codes, 0, _MAX_STATUS_CODE)]).astype(
        np.int8
    )
    if not index.size:
        return Groups([], np.zeros(0, np.int64), index, durations, kinds)
    client = sides == _CLIENT
    same_time = bool(tens.min() == tens.max())
    same_side = not client.any()
    # The usual batch: one 10 s bucket, server side only; key on the names alone.
    names: Iterator[tuple[Any, ...]]
    if same_time and same_side:
        names = zip(services, operations, instances, versions, strict=True)
    elif same_side:
        names = zip(services, operations, instances, versions, tens.tolist(), strict=True)
    else:
        names = zip(
            services, operations, instances, versions, tens.tolist(), client.tolist(), strict=True
        )
    rows = list(names)
    distinct = dict.fromkeys(rows)
    number = {key: i for i, key in enumerate(distinct)}
    key_of = np.fromiter(map(number.__getitem__, rows), dtype=np.int64, count=len(rows))
    first_ten = int(tens[0])
    keys = [
        (
            key[0],
            key[1],
            key[2],
            key[3],
            (int(key[4]) if len(key) > 4 else first_ten) * 10,
            bool(key[5]) if len(key) > 5 else False,
        )
        for key in distinct
    ]
    return Groups(keys, key_of, index, durations, kinds)


def outcome_runs(infrastructure: npt.NDArray[np.bool_]) -> list[bool]:
    """The outcomes of one instance, in order (True: not an infrastructure fault), with
    each run of successes told once: outlier ejection counts consecutive faults, and a
    success only resets that count."""
    if not infrastructure.any():
        return [True]
    ok = ~infrastructure
    keep = np.ones(ok.size, dtype=bool)
    keep[1:] = ~(ok[1:] & ok[:-1])
    flags: list[bool] = ok[keep].tolist()
    return flags
