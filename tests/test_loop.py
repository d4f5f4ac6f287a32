"""LoopLagMonitor on a real event loop: a blocking call shows as lag, lost time and one
stall, at once for whatever runs first after it; stalls are logged, rate limited."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest

from flext_mesh.loop import LAG_BUCKETS_SECONDS, LoopLagMonitor


def _block(seconds: float) -> None:
    """Hold the event loop, as a blocking call in a handler would."""
    time.sleep(seconds)


async def test_a_blocked_loop_shows_as_lag_lost_time_and_one_stall() -> None:
    monitor = LoopLagMonitor(interval=0.05)
    monitor.start()
    try:
        await asyncio.sleep(0.2)
        calm = monitor.snapshot()
        assert calm.count >= 2
        stalls_before, lost_before = monitor.stalls, monitor.lost_seconds

        _block(0.3)
        # Nothing has run since: the overdue wake-up already counts.
        assert monitor.lost_seconds - lost_before >= 0.25
        assert monitor.stalls == stalls_before + 1
        assert monitor.stalled_seconds >= 0.25
        assert monitor.max_lag >= 0.25
        seen_right_after = monitor.lost_seconds

        await asyncio.sleep(0.12)  # the monitor's own wake-up records it
        after = monitor.snapshot()
        assert after.count > calm.count
        assert after.max_seconds >= 0.25
        assert after.recent_max_seconds >= 0.25
        assert after.sum_seconds >= 0.25
        assert monitor.lost_seconds >= seen_right_after, "lost time only grows"
        assert monitor.stalls == stalls_before + 1, "counted once, not again when recorded"
        late = after.count - after.cumulative_counts[LAG_BUCKETS_SECONDS.index(0.25)]
        late_before = calm.count - calm.cumulative_counts[LAG_BUCKETS_SECONDS.index(0.25)]
        assert late == late_before + 1, "one more wake-up later than 0.25 s"
        assert after.cumulative_counts[-1] == after.count
    finally:
        await monitor.aclose()


async def test_late_wake_ups_in_a_row_are_one_stall_and_short_lags_none() -> None:
    monitor = LoopLagMonitor(interval=0.1)
    monitor.start()
    try:
        await asyncio.sleep(0.05)
        _block(0.15)  # late, but under the 0.25 s threshold
        await asyncio.sleep(0.05)
        assert monitor.stalls == 0
        assert monitor.stalled_seconds == 0
        assert 0 < monitor.lost_seconds < 0.25

        _block(0.45)
        await asyncio.sleep(0.005)  # the monitor records it and is due again in 0.1 s
        _block(0.45)
        assert monitor.stalls == 1, "no on-time wake-up between: one stall"
        await asyncio.sleep(0.25)  # on-time wake-ups end it
        _block(0.35)
        assert monitor.stalls == 2
        assert monitor.stalled_seconds >= 0.9
    finally:
        await monitor.aclose()


async def test_stalls_are_warned_about_once_per_period_naming_how_long(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="flext_mesh.loop")
    monitor = LoopLagMonitor(interval=0.02, warn_every=10.0)
    silent = LoopLagMonitor(interval=0.02, log_stalls=False)
    monitor.start()
    silent.start()
    try:
        await asyncio.sleep(0.05)
        for _ in range(2):
            _block(0.3)
            await asyncio.sleep(0.1)
    finally:
        await monitor.aclose()
        await silent.aclose()
    warnings = [r.getMessage() for r in caplog.records if r.name == "flext_mesh.loop"]
    assert len(warnings) == 1, warnings
    assert re.match(r"event loop stalled for 0\.[23]\d s", warnings[0]), warnings[0]
    assert silent.stalls == monitor.stalls >= 2


async def test_aclose_stops_its_task_and_keeps_the_totals_for_a_restart() -> None:
    monitor = LoopLagMonitor(interval=0.02)
    monitor.start()
    with pytest.raises(RuntimeError):
        monitor.start()
    await asyncio.sleep(0.05)
    _block(0.3)
    await monitor.aclose()  # counts the overdue wake-up first
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "loop-lag-monitor"]
    lost, count = monitor.lost_seconds, monitor.snapshot().count
    assert lost >= 0.25
    assert monitor.stalls == 1
    await asyncio.sleep(0.05)
    assert (monitor.lost_seconds, monitor.snapshot().count) == (lost, count)
    await monitor.aclose()  # twice is harmless
    monitor.start()  # and it can go on counting
    await asyncio.sleep(0.1)
    await monitor.aclose()
    assert monitor.snapshot().count > count


def test_settings_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        LoopLagMonitor(interval=0)
