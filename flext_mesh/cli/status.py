"""``flext-mesh status``: what each sidecar has applied of the registry, and how late
(the rule: :mod:`flext_mesh.registry.applied`)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import grpc

from flext_mesh.cli.common import every_page
from flext_mesh.cli.output import (
    DOCUMENT_FORMATS,
    EMPTY,
    format_date_time,
    render_messages,
    render_table,
)
from flext_mesh.registry.applied import STALE_AFTER, applied
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc

__all__ = ["STALE_AFTER", "STATUS_HEADERS", "STATUS_WIDE_HEADERS", "add_command", "status"]

#: Columns of ``status``.
STATUS_HEADERS = ("SERVICE", "INSTANCE", "APPLIED", "BEHIND", "SINCE", "STATE")
#: Columns ``status -o wide`` adds: where the instance is, and when its applied revision
#: last moved and its lease was last renewed, as times of day.
STATUS_WIDE_HEADERS = (*STATUS_HEADERS, "VERSION", "ENDPOINT", "APPLIED_AT", "RENEWED")


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
        help=f"behind and not moving for this long is STALE (default: {STALE_AFTER:g})",
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
    if args.output in DOCUMENT_FORMATS:
        return render_messages(instances, args.output)
    now = time.time()
    rows: list[tuple[str, ...]] = [
        _row(instance, revision, now, args.stale_after) for instance in instances
    ]
    headers: tuple[str, ...] = STATUS_HEADERS
    if args.output == "wide":
        headers = STATUS_WIDE_HEADERS
        rows = [
            (
                *row,
                instance.version,
                instance.endpoint,
                format_date_time(instance.applied_time) if instance.applied_revision else EMPTY,
                format_date_time(instance.last_renew_time),
            )
            for row, instance in zip(rows, instances, strict=True)
        ]
    return f"registry revision: {revision}\n" + render_table(headers, rows)


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
