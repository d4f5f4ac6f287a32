"""What a sidecar has applied of the registry, and whether it keeps up: one rule for
``flext-mesh status`` and the dashboard.

Each sidecar says, on its KeepAlive stream, the registry revision its mesh client has
applied (instances and traffic policies arrive on one Watch stream, so one revision
covers both); the control plane keeps it on the instance (``applied_revision``,
``applied_time``). A sidecar behind the registry whose applied revision has not moved
for ``stale_after`` seconds is STALE: its client stopped following the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from flext_mesh.v1 import registry_pb2

__all__ = ["STALE_AFTER", "Applied", "applied"]

#: Seconds a sidecar may go without applying a newer revision before it is STALE.
STALE_AFTER = 30.0


@dataclass(frozen=True, slots=True)
class Applied:
    """One instance's sidecar against the registry."""

    #: The registry revision its mesh client applied (0: it never said).
    revision: int
    #: Revisions the registry is ahead of it.
    behind: int
    #: Seconds since it last said what it applied.
    since: float
    #: OK (up to date), BEHIND, STALE, or "-" (never said: a plain registration).
    state: Literal["OK", "BEHIND", "STALE", "-"]


def applied(
    instance: registry_pb2.ServiceInstance,
    revision: int,
    now: float,
    stale_after: float = STALE_AFTER,
) -> Applied:
    """Where ``instance``'s sidecar stands against registry ``revision`` at ``now``."""
    done = instance.applied_revision
    if not done:
        return Applied(0, 0, 0.0, "-")
    behind = max(0, revision - done)
    since = max(0.0, now - instance.applied_time.ToNanoseconds() / 1e9)
    if not behind:
        return Applied(done, 0, since, "OK")
    return Applied(done, behind, since, "STALE" if since > stale_after else "BEHIND")
