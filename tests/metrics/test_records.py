"""Batches read column-wise: every rule refuses exactly the records it did one record at
a time, with the same field and reason, and what is kept is counted as before."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from flext_mesh.metrics.aggregator import INFRASTRUCTURE_CODES, Aggregator, AggregatorSettings
from flext_mesh.metrics.records import Columns, group_records, outcome_runs, refusals
from flext_mesh.metrics.sketch import LatencySketch, grouped
from flext_mesh.store.sqlite import SqliteStore
from flext_mesh.v1 import metrics_pb2

NOW_NS = int(time.time() * 1e9)
RETENTION_NS = 86_400 * 10**9
T = TypeVar("T")


def one_by_one(record: metrics_pb2.CallRecord, now_ns: int = NOW_NS) -> tuple[str, str] | None:
    """The rules as they read one record at a time (the reference)."""

    def good(name: str) -> bool:
        return 0 < len(name) <= 63 and name.isprintable() and not name.isspace()

    stamp = record.time_unix_nano or now_ns
    if not good(record.service_name):
        return ("service_name", "must be 1-63 printable characters")
    if not good(record.operation):
        return ("operation", "must be 1-63 printable characters")
    if not (0.0 <= record.duration_ms <= 86_400_000.0):
        return (
            "duration_ms",
            f"must be finite, at least 0 and at most 1 day, got {record.duration_ms}",
        )
    if not 0 <= record.status_code <= 16:
        return ("status_code", f"{record.status_code} is not a gRPC status code")
    if record.side not in metrics_pb2.CallSide.values():
        return ("side", f"{record.side} is not a CallSide")
    for name, limit in (
        ("instance_id", 63),
        ("version", 63),
        ("caller_service", 63),
        ("correlation_id", 128),
    ):
        value: str = getattr(record, name)
        if len(value) > limit:
            return (name, f"is {len(value)} characters long; at most {limit}")
    if stamp > now_ns + 300 * 10**9:
        return ("time_unix_nano", "is more than 5 minutes in the future")
    if stamp < now_ns - RETENTION_NS:
        return ("time_unix_nano", "is older than the retention")
    return None


def random_record(rng: random.Random, bad: float, now_ns: int = NOW_NS) -> metrics_pb2.CallRecord:
    """A record; with probability ``bad`` per field, that field is out of bounds."""

    def pick(good: T, wrong: list[T]) -> T:
        return rng.choice(wrong) if rng.random() < bad else good

    failed = rng.random() < 0.2
    return metrics_pb2.CallRecord(
        service_name=pick(rng.choice(["pay", "ship"]), ["", " ", "x" * 64, "a\nb"]),
        operation=pick(rng.choice(["charge", "refund", "é"]), ["", "\t", "o" * 70]),
        instance_id=pick(rng.choice(["", "i1", "i2"]), ["i" * 64]),
        version=pick(rng.choice(["", "v1"]), ["v" * 64]),
        caller_service=pick("", ["c" * 64]),
        correlation_id=pick(rng.choice(["", "abc"]), ["r" * 129]),
        duration_ms=pick(
            rng.lognormvariate(math.log(20), 1.0) if rng.random() > 0.05 else 0.0,
            [-1.0, math.nan, math.inf, 86_400_001.0],
        ),
        success=not failed,
        status_code=pick(rng.choice([14, 3, 13, 2]) if failed else 0, [-1, 17, 99]),
        side=pick(rng.choice([0, 1, 1, 2]), [3, 7]),  # type: ignore[arg-type]
        time_unix_nano=pick(
            rng.choice([0, 0, now_ns - 10**9 * rng.randrange(60, 3600)]),
            [now_ns + 400 * 10**9, now_ns - RETENTION_NS - 60 * 10**9],
        ),
    )


@pytest.mark.parametrize("seed", range(20))
def test_refusals_match_the_rules_read_one_record_at_a_time(seed: int) -> None:
    rng = random.Random(seed)
    bad = rng.choice([0.0, 0.01, 0.1, 0.5])
    records = [random_record(rng, bad) for _ in range(rng.choice([1, 7, 500]))]
    expected = {i: p for i, r in enumerate(records) if (p := one_by_one(r)) is not None}
    columns = Columns.read(records, NOW_NS)
    cutoff_ns = NOW_NS - RETENTION_NS
    assert refusals(columns, known=set(), now_ns=NOW_NS, cutoff_ns=cutoff_ns) == expected


def test_a_name_once_known_good_stays_good_and_bad_names_are_not_remembered() -> None:
    known: set[str] = set()
    records = [
        metrics_pb2.CallRecord(service_name="pay", operation="op", duration_ms=1),
        metrics_pb2.CallRecord(service_name="", operation="op", duration_ms=1),
    ]
    refused = refusals(Columns.read(records, NOW_NS), known=known, now_ns=NOW_NS, cutoff_ns=0)
    assert refused == {0 + 1: ("service_name", "must be 1-63 printable characters")}
    assert known == {"pay", "op"}


@pytest.mark.parametrize("one_bucket", [False, True])
@pytest.mark.parametrize("seed", range(10))
def test_groups_hold_each_good_record_once_under_its_series_bucket_and_side(
    seed: int, one_bucket: bool
) -> None:
    """Over many 10 s buckets (many possible keys), and within one (few)."""
    rng = random.Random(seed)
    records = [random_record(rng, 0.05) for _ in range(300)]
    if one_bucket:
        for record in records:
            record.ClearField("time_unix_nano")
    columns = Columns.read(records, NOW_NS)
    refused = refusals(columns, known=set(), now_ns=NOW_NS, cutoff_ns=NOW_NS - RETENTION_NS)
    found = group_records(columns, refused)
    assert found.index.tolist() == [i for i in range(len(records)) if i not in refused]
    assert len(set(found.keys)) == len(found.keys)
    for position, index in enumerate(found.index.tolist()):
        record = records[index]
        stamp = record.time_unix_nano or NOW_NS
        assert found.keys[found.key_of[position]] == (
            record.service_name,
            record.operation,
            record.instance_id,
            record.version,
            stamp // 10**10 * 10,
            record.side == metrics_pb2.CALL_SIDE_CLIENT,
        )
        assert found.durations[position] == record.duration_ms
        kind = 0 if record.success else 2 if record.status_code in INFRASTRUCTURE_CODES else 1
        assert found.kinds[position] == kind


def test_outcome_runs_keep_every_fault_and_one_success_per_run() -> None:
    def runs(ok: list[bool]) -> list[bool]:
        return outcome_runs(~np.array(ok, dtype=bool))

    assert runs([True] * 5) == [True]
    assert runs([True, True, False, True, True, False, False, True]) == [
        True,
        False,
        True,
        False,
        False,
        True,
    ]
    assert runs([False, False]) == [False, False]


@pytest.mark.parametrize(("groups", "spread"), [(20, 0.7), (6_000, 4.0)])
def test_grouped_sketches_are_those_of_add_many_per_group(groups: int, spread: float) -> None:
    """The dense path (few groups) and the sparse one (many groups over a wide range)."""
    rng = np.random.default_rng(groups)
    values = rng.lognormal(math.log(20), spread, 50_000)
    values[::97] = 0.0
    numbers = rng.integers(0, groups, values.size)
    sketches = grouped(values, numbers, groups + 1)  # the last group stays empty
    assert sketches[-1].count == 0
    for number, sketch in enumerate(sketches[:-1]):
        alone = LatencySketch()
        alone.add_many(values[numbers == number])
        assert sketch.buckets()[0] == alone.buckets()[0]
        assert sketch.buckets()[1].tolist() == alone.buckets()[1].tolist()
        assert (sketch.count, sketch.zero_count) == (alone.count, alone.zero_count)
        assert (sketch.min, sketch.max) == (alone.min, alone.max) or alone.count == 0
        assert sketch.total == pytest.approx(alone.total, rel=1e-12)
        assert LatencySketch.from_bytes(sketch.to_bytes()).count == sketch.count


def test_grouped_refuses_bad_values_and_group_numbers() -> None:
    with pytest.raises(ValueError, match="finite"):
        grouped([1.0, math.nan], [0, 0], 1)
    with pytest.raises(ValueError, match="group numbers"):
        grouped([1.0], [1], 1)
    with pytest.raises(ValueError, match="values but"):
        grouped([1.0], [0, 0], 1)
    assert [s.count for s in grouped([], [], 2)] == [0, 0]


async def test_a_mixed_batch_is_counted_as_one_record_at_a_time_would(tmp_path: Path) -> None:
    """Series, buckets, failures, the Prometheus histograms, the instance windows and
    the outcomes handed to outlier ejection, for a batch of good and bad records on
    both sides, over several 10 s buckets."""
    now_ns = time.time_ns()
    rng = random.Random(7)
    records = [random_record(rng, 0.02, now_ns) for _ in range(2_000)]
    fed: list[list[tuple[str, str, list[bool]]]] = []

    async def feed(outcomes: list[tuple[str, str, list[bool]]]) -> None:
        fed.append(outcomes)

    store = SqliteStore(tmp_path / "m.db")
    await store.open()
    aggregator = Aggregator(store, AggregatorSettings(checkpoint_interval=3600), on_outcomes=feed)
    await aggregator.start()
    try:
        future = aggregator.submit(records)
        await aggregator.checkpoint()
        result = await future
    finally:
        await aggregator.stop()
        await store.close()

    problems = {i: p for i, r in enumerate(records) if (p := one_by_one(r, now_ns)) is not None}
    assert [(r.index, r.field, r.reason) for r in result.rejected] == [
        (i, f, why) for i, (f, why) in sorted(problems.items())
    ]
    assert result.accepted == len(records) - len(problems)

    expected: dict[tuple[str, int, tuple[str, str, str]], list[metrics_pb2.CallRecord]] = {}
    outcomes: dict[tuple[str, str], list[bool]] = {}
    for i, r in enumerate(records):
        if i in problems:
            continue
        infra = not r.success and r.status_code in INFRASTRUCTURE_CODES
        if r.instance_id:
            outcomes.setdefault((r.service_name, r.instance_id), []).append(not infra)
        if r.side == metrics_pb2.CALL_SIDE_CLIENT:
            continue
        start = (r.time_unix_nano or now_ns) // 10**10 * 10
        key = (r.service_name, start, (r.operation, r.instance_id, r.version))
        expected.setdefault(key, []).append(r)
    seen = 0
    for service in ("pay", "ship"):
        for start, width, series in aggregator.window(service, 7200):
            assert width == 10
            for series_key, stats in series.items():
                mine = expected[
                    (
                        service,
                        start,
                        (series_key.operation, series_key.instance_id, series_key.version),
                    )
                ]
                alone = LatencySketch()
                alone.add_many([r.duration_ms for r in mine])
                assert stats.sketch.buckets()[1].tolist() == alone.buckets()[1].tolist()
                assert stats.count == len(mine)
                assert stats.failures == sum(not r.success for r in mine)
                assert stats.infrastructure_failures == sum(
                    not r.success and r.status_code in INFRASTRUCTURE_CODES for r in mine
                )
                seen += 1
    assert seen == len(expected)
    prometheus_total = sum(int(np.sum(state[0])) for state in aggregator.prometheus.values())
    assert prometheus_total == sum(len(v) for v in expected.values())
    assert len(fed) == 1
    for service, instance, flags in fed[0]:
        full = outcomes[(service, instance)]
        assert flags.count(False) == full.count(False)
        assert flags == _runs(full)
        window = aggregator.instance_window[(service, instance)]
        assert (window[0], window[1]) == (len(full), full.count(False))
    assert {(s, i) for s, i, _ in fed[0]} == set(outcomes)


def _runs(ok: list[bool]) -> list[bool]:
    if all(ok):
        return [True]
    return [flag for i, flag in enumerate(ok) if not flag or i == 0 or not ok[i - 1]]


@pytest.mark.parametrize("seed", range(12))
def test_a_request_read_from_its_encoding_gives_the_columns_read_record_by_record(
    seed: int,
) -> None:
    """Whole columns (every record sets the field), empty ones (none does) and mixed
    ones, unknown enum values, non-ASCII names and metadata the reader skips."""
    rng = random.Random(seed)
    request = metrics_pb2.StreamCallsRequest(reporter_id="r", batch_sequence=3)
    for _ in range(rng.choice([1, 2, 50, 500])):
        record = random_record(rng, rng.choice([0.0, 0.05]))
        if rng.random() < 0.1:
            record.metadata.update({"cache_hit": False})
        request.records.append(record)
    if seed % 3 == 0:  # every record sets every field
        for record in request.records:
            record.version = record.version or "v2"
            record.instance_id = record.instance_id or "i9"
            record.side = record.side or metrics_pb2.CALL_SIDE_SERVER
    from_encoding = Columns.read(request, NOW_NS)
    one_by_one_read = Columns.read(list(request.records), NOW_NS)
    for name in Columns.__slots__:
        mine, theirs = getattr(from_encoding, name), getattr(one_by_one_read, name)
        if isinstance(mine, np.ndarray):
            assert mine.dtype == theirs.dtype, name
            np.testing.assert_array_equal(mine, theirs, err_msg=name)
        else:
            assert mine == theirs, name


def _same_columns(one: Columns, other: Columns) -> None:
    for name in ("services", "operations", "instances", "versions", "callers", "correlations"):
        assert getattr(one, name) == getattr(other, name), name
    for name in ("durations", "codes", "sides", "successes", "stamps"):
        np.testing.assert_array_equal(getattr(one, name), getattr(other, name), err_msg=name)


@pytest.mark.parametrize("seed", range(10))
def test_a_request_is_read_as_its_records_are_one_at_a_time(seed: int) -> None:
    """Read from its encoding, with columns that only some records set (failures with
    their codes, client sides, start times), a batch has the values of its records."""
    rng = random.Random(seed)
    records = [random_record(rng, rng.choice([0.0, 0.05])) for _ in range(rng.choice([1, 9, 500]))]
    request = metrics_pb2.StreamCallsRequest(records=records, reporter_id="r", batch_sequence=3)
    _same_columns(Columns.read(request, NOW_NS), Columns.read(records, NOW_NS))


@pytest.mark.parametrize(
    "extra",
    [
        b"\x30\x0e",  # status_code 14 again: the last one counts
        b"\x30\x00",  # status_code 0 written out: no code
        b"\x28\x00",  # success false written out
        b"\x28\x01\x28\x00",  # success twice, false last
        b"\x30\x80\x80\x80\x80\x10",  # a varint beyond int32: its low 32 bits (0)
        b"\x30\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # status_code -1
        b"\x50\x02\x50\x00",  # side twice
        b"\x40\x01",  # time_unix_nano 1 (refused later, read all the same)
    ],
)
def test_a_request_whose_records_repeat_or_spell_out_fields_is_read_as_they_are(
    extra: bytes,
) -> None:
    """Encodings no protobuf library writes, but any may read: a field given twice in a
    record (the last counts), a default written out."""
    records = [
        metrics_pb2.CallRecord(
            service_name="pay",
            operation="op",
            duration_ms=1.0 + i,
            success=i % 3 != 0,
            status_code=0 if i % 3 else 14,
            side=metrics_pb2.CALL_SIDE_CLIENT if i % 4 == 0 else metrics_pb2.CALL_SIDE_SERVER,
        )
        for i in range(12)
    ]
    encoded = []
    for i, record in enumerate(records):
        body = record.SerializeToString() + (extra if i % 5 == 1 else b"")
        encoded.append(b"\x0a" + bytes([len(body)]) + body)
    request = metrics_pb2.StreamCallsRequest.FromString(b"".join(encoded))
    _same_columns(Columns.read(request, NOW_NS), Columns.read(list(request.records), NOW_NS))
