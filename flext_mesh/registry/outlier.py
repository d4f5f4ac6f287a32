"""Outlier detection: eject instances that keep failing, for a while that grows.

The model is Envoy's consecutive-failure detector. An instance whose last
``consecutive_failures`` calls all failed is *ejected* (left out of load balancing) for
``base_ejection_time x times_ejected``, capped by ``max_ejection_time``; a success resets
the count. Only infrastructure failures count (gRPC UNAVAILABLE, DEADLINE_EXCEEDED,
INTERNAL, RESOURCE_EXHAUSTED, UNKNOWN): the caller classifies status codes and never
reports a business rejection as a failure, so a service that correctly says "no" is
never ejected.

Two rules bound the damage an unhealthy mesh can do to itself:

- no more than ``max(1, floor(service_size x max_ejection_percent / 100))`` instances of
  a service are ejected at once, so *at least one instance is always ejectable*, even
  with ``max_ejection_percent=0`` or a single instance (a lone instance that only fails
  is better ejected; callers fail fast instead of waiting on it);
- ``times_ejected`` decays by one for every ``base_ejection_time`` spent not ejected,
  so a host that behaves again is soon back to the base ejection time.

An ejection ends when :meth:`OutlierDetector.release_due` reports it, not by itself:
until then the instance counts as ejected. Call ``release_due`` periodically, or sleep
until :meth:`OutlierDetector.next_release_at`. No I/O, no asyncio, no locks: the clock
is injected, and one owner (one event loop) calls the detector.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Ejection", "OutlierDetector", "OutlierSettings"]

_HOUR = 3600.0
_DAY = 24 * _HOUR


@dataclass(frozen=True, kw_only=True, slots=True)
class OutlierSettings:
    """When an instance is ejected and for how long; the defaults are Envoy's."""

    consecutive_failures: int = 5
    """Consecutive infrastructure failures that eject an instance (1..1000)."""
    base_ejection_time: float = 30.0
    """Seconds of the first ejection, multiplied by times_ejected after (1 s..1 h)."""
    max_ejection_time: float = 300.0
    """Longest ejection in seconds (base_ejection_time..24 h)."""
    max_ejection_percent: float = 10.0
    """Most instances of a service ejected at once, in percent (0..100; one always can)."""

    def __post_init__(self) -> None:
        if not 1 <= self.consecutive_failures <= 1000:
            raise ValueError(
                f"consecutive_failures must be 1..1000, not {self.consecutive_failures!r}"
            )
        if not 1.0 <= self.base_ejection_time <= _HOUR:
            raise ValueError(
                f"base_ejection_time must be 1..3600 seconds, not {self.base_ejection_time!r}"
            )
        if not self.base_ejection_time <= self.max_ejection_time <= _DAY:
            raise ValueError(
                "max_ejection_time must be between base_ejection_time "
                f"({self.base_ejection_time!r}) and 86400 seconds, "
                f"not {self.max_ejection_time!r}"
            )
        if not 0.0 <= self.max_ejection_percent <= 100.0:
            raise ValueError(
                f"max_ejection_percent must be 0..100, not {self.max_ejection_percent!r}"
            )

    def max_ejected(self, service_size: int) -> int:
        """How many of ``service_size`` instances may be ejected at once (at least one)."""
        return max(1, math.floor(service_size * self.max_ejection_percent / 100.0))

    def max_times_ejected(self) -> int:
        """The multiplier at which ejections reach max_ejection_time; it grows no further."""
        return math.ceil(self.max_ejection_time / self.base_ejection_time)


@dataclass(frozen=True, slots=True)
class Ejection:
    """One instance left out of load balancing until ``until`` (a time of the clock)."""

    service: str
    """The service the instance belongs to."""
    instance: str
    """The ejected instance."""
    until: float
    """When the ejection ends, in the detector's clock."""
    times_ejected: int
    """Ejections not yet forgiven, this one included (stops growing at the max time)."""
    duration: float
    """Seconds of this ejection: min(base_ejection_time x times_ejected, max_ejection_time)."""


@dataclass(slots=True)
class _Health:
    """What the detector knows of one instance that failed or was ejected."""

    consecutive: int = 0
    times_ejected: int = 0
    ejected_until: float | None = None
    # Start of the current not-ejected stretch still to be counted by the decay.
    calm_since: float = 0.0


class OutlierDetector:
    """Tracks call outcomes per instance and decides ejections and releases."""

    def __init__(
        self,
        settings: OutlierSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings if settings is not None else OutlierSettings()
        self._clock = clock
        # Only instances that failed or were ejected have an entry; a success on a
        # fully forgiven instance removes it, so memory follows the troubled hosts.
        self._health: dict[str, dict[str, _Health]] = {}
        # Invariant: exactly the entries of _health with ejected_until set.
        self._ejected: dict[str, dict[str, _Health]] = {}

    @property
    def settings(self) -> OutlierSettings:
        """The settings of services that pass none of their own."""
        return self._settings

    def record(
        self,
        service: str,
        instance: str,
        *,
        ok: bool,
        service_size: int,
        settings: OutlierSettings | None = None,
    ) -> Ejection | None:
        """Count one call outcome; the ejection it caused, if any.

        ``ok=False`` is an infrastructure failure only. ``service_size`` is the number of
        instances of the service now, ``settings`` the service's own (else the
        detector's). Outcomes reported for an ejected instance are ignored.
        """
        if service_size < 1:
            raise ValueError(f"service_size must be at least 1, not {service_size!r}")
        health = self._health.get(service, {}).get(instance)
        if health is None:
            if ok:
                return None
            health = self._health.setdefault(service, {})[instance] = _Health()
        if health.ejected_until is not None:
            return None
        policy = settings if settings is not None else self._settings
        now = self._clock()
        _decay(health, policy, now)
        if ok:
            health.consecutive = 0
            if health.times_ejected == 0:
                self._drop(service, instance)
            return None
        health.consecutive += 1
        if health.consecutive < policy.consecutive_failures:
            return None
        if self.ejected_count(service) >= policy.max_ejected(service_size):
            return None  # refused by the cap: keep counting, the next failure tries again
        health.times_ejected = min(health.times_ejected + 1, policy.max_times_ejected())
        duration = min(policy.base_ejection_time * health.times_ejected, policy.max_ejection_time)
        health.ejected_until = now + duration
        self._ejected.setdefault(service, {})[instance] = health
        return Ejection(
            service=service,
            instance=instance,
            until=health.ejected_until,
            times_ejected=health.times_ejected,
            duration=duration,
        )

    def release_due(self) -> list[tuple[str, str]]:
        """End the ejections whose time is over: their ``(service, instance)``, earliest first.

        Released instances are eligible again and start counting failures from zero.
        """
        now = self._clock()
        due: list[tuple[float, str, str]] = []
        for service, ejected in list(self._ejected.items()):
            for instance, health in list(ejected.items()):
                until = health.ejected_until
                assert until is not None
                if until <= now:
                    due.append((until, service, instance))
                    del ejected[instance]
                    health.ejected_until = None
                    health.consecutive = 0
                    health.calm_since = now
            if not ejected:
                del self._ejected[service]
        due.sort()
        return [(service, instance) for _, service, instance in due]

    def is_ejected(self, service: str, instance: str) -> bool:
        """Whether the instance is ejected (until ``release_due`` releases it)."""
        return instance in self._ejected.get(service, {})

    def ejected_until(self, service: str, instance: str) -> float | None:
        """When the instance's ejection ends (clock time), or None if it is not ejected."""
        health = self._ejected.get(service, {}).get(instance)
        return None if health is None else health.ejected_until

    def ejected_count(self, service: str) -> int:
        """How many instances of the service are ejected now."""
        return len(self._ejected.get(service, {}))

    def next_release_at(self) -> float | None:
        """The earliest end of a current ejection (clock time), or None if none is ejected."""
        return min(
            (
                health.ejected_until
                for ejected in self._ejected.values()
                for health in ejected.values()
                if health.ejected_until is not None
            ),
            default=None,
        )

    def forget(self, service: str, instance: str) -> None:
        """Drop everything known of an instance (it left the registry); no-op if unknown."""
        self._drop(service, instance)

    def forget_service(self, service: str) -> None:
        """Drop everything known of a service's instances; no-op if unknown."""
        self._health.pop(service, None)
        self._ejected.pop(service, None)

    def _drop(self, service: str, instance: str) -> None:
        for table in (self._health, self._ejected):
            instances = table.get(service)
            if instances is not None:
                instances.pop(instance, None)
                if not instances:
                    del table[service]


def _decay(health: _Health, policy: OutlierSettings, now: float) -> None:
    """Forgive one ejection per base_ejection_time spent not ejected since calm_since."""
    if health.times_ejected == 0:
        return
    steps = math.floor((now - health.calm_since) / policy.base_ejection_time)
    if steps <= 0:
        return
    if steps >= health.times_ejected:
        health.times_ejected = 0
    else:
        health.times_ejected -= steps
        health.calm_since += steps * policy.base_ejection_time
