"""``flext-mesh metrics``: a service's performance report and the active alerts."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from flext_mesh.cli.common import add_noun, every_page
from flext_mesh.cli.output import (
    DOCUMENT_FORMATS,
    enum_label,
    format_date_time,
    format_number,
    format_time,
    render_messages,
    render_table,
)
from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc

__all__ = [
    "ALERT_HEADERS",
    "ALERT_WIDE_HEADERS",
    "REPORT_HEADERS",
    "REPORT_WIDE_HEADERS",
    "add_commands",
    "alerts",
    "human_span",
    "parse_window",
    "report",
]

#: Columns of ``metrics report``.
REPORT_HEADERS = (
    "OPERATION",
    "CALLS",
    "ERROR%",
    "P50(ms)",
    "P95(ms)",
    "P99(ms)",
    "AVG(ms)",
    "MAX(ms)",
    "RATE(/s)",
    "TREND",
    "SCORE",
    "GRADE",
)
#: Columns ``metrics report -o wide`` adds: the calls that failed (on infrastructure:
#: the ones outlier detection counts), the fastest call, and how much the trend moved.
REPORT_WIDE_HEADERS = (*REPORT_HEADERS, "FAILED", "INFRA", "MIN(ms)", "TREND(%)")
#: Columns of ``metrics alerts``.
ALERT_HEADERS = (
    "SEVERITY",
    "SERVICE",
    "OPERATION",
    "RULE",
    "OBSERVED",
    "THRESHOLD",
    "SINCE",
    "MESSAGE",
)
#: Columns ``metrics alerts -o wide`` adds: the alert's id and the date it fired.
ALERT_WIDE_HEADERS = (*ALERT_HEADERS, "ID", "FIRED")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_WINDOW = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_window(value: str) -> float:
    """``90s``, ``15m``, ``6h`` or ``1d`` in seconds (argparse type)."""
    match = _WINDOW.match(value.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not a window like 90s, 15m, 6h or 1d")
    return float(match[1]) * _UNITS[match[2]]


def add_commands(
    nouns: argparse._SubParsersAction[Any],
    parents: Sequence[argparse.ArgumentParser],
) -> None:
    """Add the ``metrics`` noun and its verbs; ``parents`` carry the connection flags."""
    verbs = add_noun(
        nouns,
        "metrics",
        help="performance reports and alerts",
        description="Call metrics gathered by the control plane.",
        parents=parents,
    )
    report_p = verbs.add(
        "report",
        report,
        help="per-operation latency percentiles, error rate, trend, score and grade",
        description="A service's performance over a window ending now.",
    )
    report_p.add_argument("name", metavar="SERVICE", help="service name")
    report_p.add_argument(
        "--window",
        type=parse_window,
        default="24h",  # a string default goes through type=
        help="how far back from now, e.g. 15m, 6h or 1d",
    )
    report_p.add_argument("--operation", default="", help="only this operation (default: all)")
    report_p.add_argument(
        "--by-version", action="store_true", help="also break operations down by version"
    )
    alerts_p = verbs.add(
        "alerts",
        alerts,
        help="alerts firing now (last 5 minutes), most severe first",
        description="Alerts firing now across services, most severe first.",
    )
    alerts_p.add_argument("--service", default="", help="only this service's (default: all)")


def _row(stats: metrics_pb2.CallStats, label: str, *, wide: bool) -> list[object]:
    row: list[object] = [
        label,
        stats.total_calls,
        format_number(stats.error_rate * 100),
        format_number(stats.p50_ms),
        format_number(stats.p95_ms),
        format_number(stats.p99_ms),
        format_number(stats.avg_ms),
        format_number(stats.max_ms),
        format_number(stats.throughput_per_second),
        enum_label(metrics_pb2.Trend.Name(stats.trend), "TREND_"),
        format_number(stats.health_score),
        stats.grade,
    ]
    if wide:
        row += [
            stats.failed_calls,
            stats.infrastructure_failures,
            format_number(stats.min_ms),
            f"{stats.trend_change_percent:+.1f}",
        ]
    return row


def report(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``metrics report``: the summary and one row per operation, then alerts and advice."""
    request = metrics_pb2.GetServiceReportRequest(
        service_name=args.name, operation=args.operation, by_version=args.by_version
    )
    request.window.FromNanoseconds(int(args.window * 1e9))
    result = metrics_pb2_grpc.MetricsServiceStub(channel).GetServiceReport(
        request, timeout=args.timeout
    )
    rep = result.report
    if args.output in DOCUMENT_FORMATS:
        return render_messages(rep, args.output)
    wide = args.output == "wide"
    rows = [_row(op, op.operation, wide=wide) for op in rep.operations]
    rows += [_row(v, f"{v.operation}@{v.version or '-'}", wide=wide) for v in rep.versions]
    rows.append(_row(rep.summary, "(all)", wide=wide))
    summary = rep.summary
    lines = [
        f"{rep.service_name}: health {format_number(summary.health_score)} "
        f"grade {summary.grade}, {_calls(summary.total_calls)} {_span_text(rep)}",
        render_table(REPORT_WIDE_HEADERS if wide else REPORT_HEADERS, rows).rstrip("\n"),
    ]
    lines += _failure_lines(rep)
    for anomaly in [a for op in rep.operations for a in op.anomalies]:
        lines.append(f"anomaly: {anomaly.operation}: {anomaly.description}")
    for alert in rep.alerts:
        severity = enum_label(metrics_pb2.AlertSeverity.Name(alert.severity), "ALERT_SEVERITY_")
        lines.append(f"alert {severity}: {alert.message}")
    for advice in rep.recommendations:
        lines.append(f"advice: {advice}")
    return "\n".join(lines) + "\n"


def _calls(count: int) -> str:
    return f"{count} call" if count == 1 else f"{count} calls"


def _span_text(rep: metrics_pb2.ServiceReport) -> str:
    """``since 10:04:00`` for the whole window, ``in the last 7 min (since 10:04:00)``
    when the service's first call came later (throughput is over that span)."""
    observed = rep.summary.observed.ToNanoseconds() / 1e9
    window = rep.window.ToNanoseconds() / 1e9
    if not rep.summary.HasField("observed") or observed >= window:
        return f"since {format_time(rep.window_start)}"
    since = Timestamp()
    since.FromNanoseconds(rep.generate_time.ToNanoseconds() - rep.summary.observed.ToNanoseconds())
    return f"in the last {human_span(observed)} (since {format_time(since)})"


def human_span(seconds: float) -> str:
    """``45 s``, ``7 min``, ``2.5 h``: a span of time rounded for a sentence."""
    if seconds < 120:
        return f"{round(seconds)} s"
    if seconds < 2 * 3600:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f}".removesuffix(".0") + " h"


def _failure_lines(rep: metrics_pb2.ServiceReport) -> list[str]:
    """One line on the infrastructure faults and one on the business rejections (each
    when there are any), with their most frequent status codes."""
    summary = rep.summary
    out = []
    for infrastructure, label, count, rate, what, after in (
        (
            True,
            "faults",
            summary.infrastructure_failures,
            summary.infrastructure_error_rate,
            "infrastructure faults",
            "they lower the health score",
        ),
        (
            False,
            "refused",
            summary.business_failures,
            summary.business_error_rate,
            "business rejections (the callers' input)",
            "they lower the health score only above the"
            f" {format_number(rep.business_error_alert_rate * 100)}% alert rate",
        ),
    ):
        if not count:
            continue
        codes = ", ".join(
            f"{c.code_name or 'no code'} {_calls(c.calls)}"
            for c in summary.failure_codes
            if c.infrastructure == infrastructure
        )
        out.append(
            f"{label}: {format_number(rate * 100)}% of calls ({count} of"
            f" {_calls(summary.total_calls)}) were {what}{': ' + codes if codes else ''};"
            f" {after}"
        )
    return out


def alerts(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``metrics alerts``: every page of ListAlerts."""
    stub = metrics_pb2_grpc.MetricsServiceStub(channel)
    found: list[metrics_pb2.Alert] = every_page(
        lambda token, size: stub.ListAlerts(
            metrics_pb2.ListAlertsRequest(
                service_name=args.service, page_size=size, page_token=token
            ),
            timeout=args.timeout,
        ),
        lambda page: page.alerts,
    )
    if args.output in DOCUMENT_FORMATS:
        return render_messages(found, args.output)
    if not found:
        return "no alert is firing\n"
    wide = args.output == "wide"
    rows = [
        [
            enum_label(metrics_pb2.AlertSeverity.Name(a.severity), "ALERT_SEVERITY_"),
            a.service_name,
            a.operation or "*",
            a.rule,
            format_number(a.observed),
            format_number(a.threshold),
            format_time(a.fire_time),
            a.message,
            *((a.alert_id, format_date_time(a.fire_time)) if wide else ()),
        ]
        for a in found
    ]
    return render_table(ALERT_WIDE_HEADERS if wide else ALERT_HEADERS, rows)
