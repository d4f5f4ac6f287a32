"""``flext-mesh status``: what each sidecar has applied of the registry, and how late
(the rule: :mod:`flext_mesh.registry.applied`)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import grpc

from flext_mesh.cli.common import every_page
from flext_mesh.cli.output import EMPTY, render_messages, render_table
from flext_mesh.registry.applied import STALE_AFTER, applied
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc

__all__ = ["STALE_AFTER", "STATUS_HEADERS", "add_command", "status"]

STATUS_HEADERS = ("SERVICE", "INSTANCE", "APPLIED", "BEHIND", "SINCE", "STATE")


def add_command(
    nouns: argparse._SubParsersAction[Any], parents: list[argparse.ArgumentParser]
) -> None:
    """Add ``flext-mesh status``."""
    status_p = nouns.add_parser(
        "status",
        parents=parents,
        help="what each sidecar has applied of the registry, and how far behind it is",
        description=(
            "One row per registered instance: the registry revision its sidecar's mesh "
            "client has applied, how many revisions it is behind the registry, since when, "
            "and OK, BEHIND, STALE (behind and not moving for 30 s) or - (never said: a "
            "plain registration)."
        ),
    )
    status_p.add_argument(
        "--stale-after",
        metavar="SECONDS",
        type=float,
        default=STALE_AFTER,
        help=f"behind and not moving for this long is STALE (default {STALE_AFTER:g})",
    )
    status_p.set_defaults(run=status)


def status(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """Every instance of every service, with what its sidecar applied."""
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    summaries: list[registry_pb2.ServiceSummary] = every_page(
        lambda token, size: stub.ListServices(
            registry_pb2.ListServicesRequest(page_size=size, page_token=token),
            timeout=args.timeout,
        ),
        lambda page: page.services,
    )
    instances: list[registry_pb2.ServiceInstance] = []
    revision = 0
    for summary in summaries:
        answer = stub.Discover(
            registry_pb2.DiscoverRequest(service_name=summary.service_name, healthy_only=False),
            timeout=args.timeout,
        )
        revision = max(revision, answer.revision)
        instances.extend(sorted(answer.instances, key=lambda i: i.instance_id))
    if args.output == "json":
        return render_messages(instances)
    now = time.time()
    rows = [_row(instance, revision, now, args.stale_after) for instance in instances]
    return f"registry revision: {revision}\n" + render_table(STATUS_HEADERS, rows)


def _row(
    instance: registry_pb2.ServiceInstance, revision: int, now: float, stale_after: float
) -> tuple[str, ...]:
    where = applied(instance, revision, now, stale_after)
    if where.state == "-":
        return (instance.service_name, instance.instance_id, EMPTY, EMPTY, EMPTY, EMPTY)
    return (
        instance.service_name,
        instance.instance_id,
        str(where.revision),
        str(where.behind),
        f"{where.since:.0f}s ago",
        where.state,
    )
