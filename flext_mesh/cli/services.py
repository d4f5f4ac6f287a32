"""``flext-mesh services``: list services, show a service's instances, try discovery,
drain an instance for maintenance and undrain it.

Each command asks RegistryService over the channel it is given and returns the text to
print; the caller (:func:`flext_mesh.cli.main`) owns the channel and turns a failed
RPC into one line on stderr.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from flext_mesh.cli.common import add_noun, every_page, fail, non_negative_int
from flext_mesh.cli.output import (
    DOCUMENT_FORMATS,
    EMPTY,
    enum_text,
    format_date_time,
    format_labels,
    format_number,
    format_time,
    one_line,
    render_messages,
    render_table,
)
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc

__all__ = [
    "EXPLAIN_HEADERS",
    "EXPLAIN_WIDE_HEADERS",
    "INSTANCE_HEADERS",
    "INSTANCE_WIDE_HEADERS",
    "SERVICE_HEADERS",
    "SERVICE_WIDE_HEADERS",
    "STRATEGIES",
    "add_commands",
    "discover",
    "drain",
    "health_text",
    "instance_row",
    "instance_wide_row",
    "list_services",
    "show",
    "undrain",
]

#: ``--strategy`` values: the LoadBalancingStrategy names, lower case, without prefix.
STRATEGIES: dict[str, registry_pb2.LoadBalancingStrategy.ValueType] = {
    name.removeprefix("LOAD_BALANCING_STRATEGY_").lower(): value
    for name, value in registry_pb2.LoadBalancingStrategy.items()
    if value != registry_pb2.LOAD_BALANCING_STRATEGY_UNSPECIFIED
}
#: Columns of ``services list``.
SERVICE_HEADERS = (
    "NAME",
    "INSTANCES",
    "HEALTHY",
    "UNHEALTHY",
    "EJECTED",
    "DRAINED",
    "VERSIONS",
    "TYPES",
)
#: Columns ``services list -o wide`` adds: the policy's version, the instances' zones and
#: the registry revision of the service's last instance change.
SERVICE_WIDE_HEADERS = (*SERVICE_HEADERS, "POLICY", "ZONES", "REVISION")
#: Columns of ``services show`` and ``services discover``.
INSTANCE_HEADERS = (
    "INSTANCE",
    "ENDPOINT",
    "VERSION",
    "ZONE",
    "HEALTH",
    "WEIGHT",
    "EFFECTIVE",
    "RT(ms)",
    "UPTIME(%)",
    "LABELS",
)
#: Columns ``-o wide`` adds to the instance tables: what the instance registered besides
#: (type, capabilities, health-check mode), its lease's times, and the revisions.
INSTANCE_WIDE_HEADERS = (
    *INSTANCE_HEADERS,
    "TYPE",
    "CAPABILITIES",
    "CHECK",
    "REGISTERED",
    "RENEWED",
    "REVISION",
    "APPLIED",
)


def add_commands(
    nouns: argparse._SubParsersAction[Any],
    parents: Sequence[argparse.ArgumentParser],
) -> None:
    """Add the ``services`` noun and its verbs; ``parents`` carry the connection flags."""
    verbs = add_noun(
        nouns,
        "services",
        aliases=["service"],
        help="list services, show their instances, try discovery, drain instances",
        description=(
            "Inspect the service registry of a running control plane; drain an instance "
            "for maintenance and undrain it."
        ),
        parents=parents,
    )

    list_p = verbs.add(
        "list",
        list_services,
        help="one row per service with instance counts and health",
        description="One row per service: instance counts, health, versions and types.",
    )
    list_p.add_argument("--type", metavar="T", help="only services with instances of type T")

    show_p = verbs.add(
        "show",
        show,
        help="every instance of a service, sorted by instance id",
        description="Every instance of a service, healthy or not, sorted by instance id.",
    )
    show_p.add_argument("name", metavar="NAME", help="service name")

    discover_p = verbs.add(
        "discover",
        discover,
        help="the instances a client would get, in pick order",
        description=(
            "Ask Discover as a client would: the instances in the order returned, the "
            "first one being the pick."
        ),
    )
    discover_p.add_argument("name", metavar="NAME", help="service name")
    discover_p.add_argument(
        "--strategy",
        choices=list(STRATEGIES),
        help="ordering strategy (default: the service policy's, else weighted_round_robin)",
    )
    discover_p.add_argument(
        "--label",
        metavar="KEY=VALUE",
        type=_label,
        action="append",
        default=[],
        help="only instances with this label (repeatable; all must match)",
    )
    discover_p.add_argument("--type", metavar="T", help="only instances of type T")
    discover_p.add_argument(
        "--all",
        action="store_true",
        help="include unhealthy and ejected instances (healthy_only=false)",
    )
    discover_p.add_argument(
        "--limit",
        metavar="N",
        type=non_negative_int,
        default=0,
        help="at most N instances (default: all)",
    )

    explain_p = verbs.add(
        "explain",
        explain,
        help="why each instance weighs what it does, and whether a client gets it",
        description=(
            "Every instance of a service with the factors of its effective weight: "
            "base x health x latency x errors, outlier ejection and until when, the "
            "traffic split's weight of its version, and whether Discover's answer "
            "holds it now. With INSTANCE, that one instance, one factor per line."
        ),
    )
    explain_p.add_argument("name", metavar="SERVICE", help="service name")
    explain_p.add_argument("instance", metavar="INSTANCE", nargs="?", help="one instance id")

    drain_p = verbs.add(
        "drain",
        drain,
        help="put an instance in maintenance: no new calls, calls in flight finish",
        description=(
            "Put one instance in maintenance (SetInstanceMaintenance): clients stop "
            "picking it within one registry Watch round trip and Discover leaves it out, "
            "calls already running on it finish. It stays registered (its sidecar keeps "
            "its lease) and stays drained across control-plane restarts and "
            "re-registrations until 'services undrain'. Draining a drained instance "
            "again only replaces its reason. Needs scope admin or service:SERVICE."
        ),
    )
    drain_p.add_argument("name", metavar="SERVICE", help="service name")
    drain_p.add_argument("instance", metavar="INSTANCE", help="instance id")
    drain_p.add_argument(
        "--reason", metavar="TEXT", default="", help="why, shown with the instance (<= 256 chars)"
    )

    undrain_p = verbs.add(
        "undrain",
        undrain,
        help="take an instance out of maintenance: it gets calls again",
        description=(
            "Take one instance out of maintenance (SetInstanceMaintenance with "
            "maintenance=false): clients pick it again as its health and weight allow. "
            "Undraining an instance that is not drained changes nothing."
        ),
    )
    undrain_p.add_argument("name", metavar="SERVICE", help="service name")
    undrain_p.add_argument("instance", metavar="INSTANCE", help="instance id")


def list_services(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``services list``: every page of ListServices, as a table or a JSON array."""
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    summaries: list[registry_pb2.ServiceSummary] = every_page(
        lambda token, size: stub.ListServices(
            registry_pb2.ListServicesRequest(
                page_size=size, page_token=token, type=args.type or ""
            ),
            timeout=args.timeout,
        ),
        lambda page: page.services,
    )
    if args.output in DOCUMENT_FORMATS:
        return render_messages(summaries, args.output)
    rows = [
        [
            s.service_name,
            s.instance_count,
            s.healthy_count,
            s.unhealthy_count,
            s.ejected_count,
            s.maintenance_count,
            ",".join(s.versions),
            ",".join(s.types),
        ]
        for s in summaries
    ]
    if args.output != "wide":
        return render_table(SERVICE_HEADERS, rows)
    for row, summary in zip(rows, summaries, strict=True):
        # The zones and revisions are the instances': one Discover per service, only here.
        instances = stub.Discover(
            registry_pb2.DiscoverRequest(service_name=summary.service_name, healthy_only=False),
            timeout=args.timeout,
        ).instances
        row += [
            summary.policy_version or EMPTY,
            ",".join(sorted({i.zone for i in instances if i.zone})),
            max((i.revision for i in instances), default=EMPTY),
        ]
    return render_table(SERVICE_WIDE_HEADERS, rows)


def show(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``services show``: all instances of one service (healthy or not) by instance id."""
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    response = stub.Discover(
        registry_pb2.DiscoverRequest(service_name=args.name, healthy_only=False),
        timeout=args.timeout,
    )
    instances = sorted(response.instances, key=lambda i: i.instance_id)
    if args.output in DOCUMENT_FORMATS:
        return render_messages(instances, args.output)
    return _instance_table(instances, wide=args.output == "wide")


def discover(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``services discover``: Discover's answer in its order, notes (panic mode) first."""
    request = registry_pb2.DiscoverRequest(
        service_name=args.name,
        type=args.type or "",
        label_selector=dict(args.label),
        limit=args.limit,
    )
    if args.strategy:
        request.strategy = STRATEGIES[args.strategy]
    if args.all:
        request.healthy_only = False
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    response = stub.Discover(request, timeout=args.timeout)
    if args.output in DOCUMENT_FORMATS:
        return render_messages(response, args.output)
    notes = list(response.notes)
    if response.panic_mode and not any("panic" in note for note in notes):
        notes.insert(0, "panic mode: too few healthy instances, so all of them are returned")
    header = discover_summary(response) + "".join(f"note: {note}\n" for note in notes)
    return header + _instance_table(response.instances, wide=args.output == "wide")


def discover_summary(response: registry_pb2.DiscoverResponse) -> str:
    """One line of how the answer was made: strategy, revision, the version a split
    chose (and whether it fell back), zone spill-over and panic mode."""
    parts = [
        f"strategy: {enum_text(registry_pb2.LoadBalancingStrategy.DESCRIPTOR, response.strategy)}",
        f"revision: {response.revision}",
    ]
    if response.selected_version:
        fallback = " (no healthy instance of it: fell back)" if response.split_fallback else ""
        parts.append(f"selected version: {response.selected_version}{fallback}")
    if response.zone_spillover:
        parts.append("zone spill-over: yes")
    if response.panic_mode:
        parts.append("panic mode: yes")
    return "   ".join(parts) + "\n"


#: Columns of ``services explain``.
EXPLAIN_HEADERS = (
    "INSTANCE",
    "VERSION",
    "ZONE",
    "BASE",
    "HEALTH",
    "LATENCY",
    "ERRORS",
    "EFFECTIVE",
    "SPLIT",
    "IN_ANSWER",
)
#: Columns ``services explain -o wide`` adds: what the latency and error factors come
#: from, and when an ejection ends.
EXPLAIN_WIDE_HEADERS = (
    *EXPLAIN_HEADERS,
    "RT(ms)",
    "MEDIAN(ms)",
    "INFRA_ERRORS(%)",
    "EJECTED_UNTIL",
)


def explain(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``services explain``: Discover with ``explain``, as a table or one instance's
    factors line by line."""
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    response = stub.Discover(
        registry_pb2.DiscoverRequest(service_name=args.name, explain=True),
        timeout=args.timeout,
    )
    explanations = list(response.explanations)
    if args.instance:
        explanations = [e for e in explanations if e.instance_id == args.instance]
        if not explanations:
            fail(f"service {args.name!r} has no instance {args.instance!r}")
    if args.output in DOCUMENT_FORMATS:
        return render_messages(explanations, args.output)
    header = discover_summary(response)
    if args.instance:
        return header + _factors(explanations[0])
    wide = args.output == "wide"
    rows = []
    for e in explanations:
        row = [
            e.instance_id,
            e.version or EMPTY,
            e.zone or EMPTY,
            str(e.base_weight),
            _health_factor_text(e),
            f"x{e.latency_factor:.2f}",
            f"x{e.error_factor:.2f}",
            format_number(e.effective_weight),
            f"{e.split_weight}%" if e.split_weight else EMPTY,
            "yes" if e.in_answer else "no",
        ]
        if wide:
            row += [
                format_number(e.response_time_ms, zero=EMPTY),
                format_number(e.service_median_ms, zero=EMPTY),
                format_number(e.infrastructure_error_rate * 100),
                format_time(e.ejected_until) if e.HasField("ejected_until") else EMPTY,
            ]
        rows.append(row)
    return header + render_table(EXPLAIN_WIDE_HEADERS if wide else EXPLAIN_HEADERS, rows)


def _health_factor_text(e: registry_pb2.WeightExplanation) -> str:
    health = enum_text(registry_pb2.HealthStatus.DESCRIPTOR, e.health)
    if e.maintenance:
        return "DRAINED x0"
    if e.ejected:
        return "EJECTED x0"
    return f"{health} x{e.health_factor:g}"


def _factors(e: registry_pb2.WeightExplanation) -> str:
    """One instance's factors, one per line, in the order they multiply."""
    health = enum_text(registry_pb2.HealthStatus.DESCRIPTOR, e.health)
    lines = [
        f"instance:       {e.instance_id} (version {e.version or EMPTY}, zone {e.zone or EMPTY})",
        f"base weight:    {e.base_weight}",
        f"health:         x{e.health_factor:g} ({health})",
    ]
    if e.ejected:
        until = f" until {format_time(e.ejected_until)}" if e.HasField("ejected_until") else ""
        lines.append(f"ejected:        x0 (outlier detection{until})")
    if e.response_time_ms and e.service_median_ms:
        latency = (
            f"x{e.latency_factor:.2f} ({e.response_time_ms:.1f} ms vs the service's median "
            f"{e.service_median_ms:.1f} ms)"
        )
    else:
        latency = f"x{e.latency_factor:.2f} (no response time measured yet)"
    lines += [
        f"latency:        {latency}",
        f"errors:         x{e.error_factor:.2f} ({e.infrastructure_error_rate:.1%} of recent "
        "calls failed on infrastructure)",
        "maintenance:    " + _maintenance_factor_text(e),
        f"effective:      {format_number(e.effective_weight)}",
        "traffic split:  "
        + (f"{e.split_weight}% to version {e.version}" if e.split_weight else "none"),
        "in the answer:  "
        + ("yes" if e.in_answer else "no (filtered by health, maintenance, split or zone)"),
    ]
    return "\n".join(lines) + "\n"


def _maintenance_factor_text(e: registry_pb2.WeightExplanation) -> str:
    if not e.maintenance:
        return f"x{e.maintenance_factor:g} (not drained)"
    if e.maintenance_reason:
        return f"x0 (drained: {one_line(e.maintenance_reason)})"
    return "x0 (drained)"


def instance_row(instance: registry_pb2.ServiceInstance) -> tuple[str, ...]:
    """The table cells of one instance, in the order of :data:`INSTANCE_HEADERS`."""
    return (
        instance.instance_id,
        instance.endpoint,
        instance.version,
        instance.zone,
        health_text(instance),
        str(instance.weight),
        format_number(instance.effective_weight),
        format_number(instance.response_time_ms, zero="-"),
        format_number(instance.uptime_percentage),
        format_labels(instance.labels),
    )


def instance_wide_row(instance: registry_pb2.ServiceInstance) -> tuple[str, ...]:
    """The cells of one instance in the order of :data:`INSTANCE_WIDE_HEADERS`."""
    return (
        *instance_row(instance),
        instance.type,
        ",".join(instance.capabilities),
        enum_text(registry_pb2.HealthCheckMode.DESCRIPTOR, instance.health_check_mode),
        format_date_time(instance.register_time),
        format_date_time(instance.last_renew_time),
        str(instance.revision),
        str(instance.applied_revision or EMPTY),
    )


def _instance_table(instances: Iterable[registry_pb2.ServiceInstance], *, wide: bool) -> str:
    if wide:
        return render_table(INSTANCE_WIDE_HEADERS, (instance_wide_row(i) for i in instances))
    return render_table(INSTANCE_HEADERS, (instance_row(i) for i in instances))


def health_text(instance: registry_pb2.ServiceInstance) -> str:
    """``SERVING``, ``NOT_SERVING``, ...; with ``, EJECTED until HH:MM:SS`` when ejected
    and ``, DRAINED`` while in maintenance."""
    text = enum_text(registry_pb2.HealthStatus.DESCRIPTOR, instance.health)
    if instance.ejected:
        text += ", EJECTED"
        if instance.HasField("ejected_until"):
            text += f" until {format_time(instance.ejected_until)}"
    if instance.maintenance:
        text += ", DRAINED"
    return text


def drain(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``services drain``: put one instance in maintenance."""
    return _set_maintenance(channel, args, maintenance=True, reason=args.reason)


def undrain(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``services undrain``: take one instance out of maintenance."""
    return _set_maintenance(channel, args, maintenance=False, reason="")


def _set_maintenance(
    channel: grpc.Channel, args: argparse.Namespace, *, maintenance: bool, reason: str
) -> str:
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    response = stub.SetInstanceMaintenance(
        registry_pb2.SetInstanceMaintenanceRequest(
            service_name=args.name,
            instance_id=args.instance,
            maintenance=maintenance,
            reason=reason,
        ),
        timeout=args.timeout,
    )
    if args.output in DOCUMENT_FORMATS:
        return render_messages(response, args.output)
    instance = response.instance
    name = f"{instance.service_name}/{instance.instance_id}"
    if maintenance:
        why = f" ({one_line(instance.maintenance_reason)})" if instance.maintenance_reason else ""
        head = f"{name} drained{why}: no new calls; calls in flight finish"
    else:
        head = f"{name} undrained: it gets calls again"
    return f"{head} (revision {response.revision})\n" + render_table(
        INSTANCE_HEADERS, [instance_row(instance)]
    )


def _label(value: str) -> tuple[str, str]:
    key, sep, label_value = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{value!r} is not KEY=VALUE")
    return key, label_value
