"""The dashboard: its page, the JSON API the page reads, and its live event streams.

Everything is served by the control plane's HTTP server (the port of ``/metrics``), on
the gRPC server's event loop: GET and HEAD, and two POST actions (cancel and retry an
execution), each allowed by the same scope as its RPC (the ``permit`` hook) and only
with a JSON body (``Content-Type: application/json``: a form on another site cannot
send one without the browser asking this server first, which it never allows).

The JSON API calls the same domain methods as the gRPC servicers, and its documents are
the gRPC responses in the proto3 JSON mapping with the proto field names (as
``flext-mesh ... -o json`` prints them): ``GET /api/v1/workflows/order`` answers what
``GetWorkflow`` answers, ``GET /api/v1/xds`` what ListXdsClients answers. Only
``/series`` (plots) and ``/services/{name}`` (a service with its instances) are
documents of their own, and so are ``/services/{name}/explain`` (Discover's
explanations), ``/status`` (what each sidecar applied, as ``flext-mesh status`` shows)
and ``/removed`` (instances removed in the last minutes, for a page opened after).
Errors are ``{"error": {"code", "status", "message", "field_violations"}}`` with the
HTTP status of the gRPC code (400, 401, 403, 404, 429, 503...); bad input is never a 500.

Live data comes as server-sent events: the registry stream is fed by the registry's
in-memory watch hub (one subscription per open page, no store reads), an execution's
stream by the orchestrator's WatchExecution. Both resume from ``Last-Event-ID``; a
stream that cannot go on sends ``stream_error`` (the error document) and closes.

Authentication is a hook: ``authorize(request)`` decides (default: everyone may read);
:func:`bearer_token` finds the token a request carries, in an ``Authorization: Bearer``
header (scripts) or the :data:`TOKEN_COOKIE` cookie that the page's token form sets
(``EventSource`` cannot send headers; a cookie, unlike a ``?token=`` query parameter,
stays out of access logs and browser history). The page's own files are public.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any, Final, TypeAlias

import grpc
from aiohttp import web
from aiohttp.typedefs import Handler
from google.protobuf import json_format
from google.protobuf.message import Message

from flext_mesh.dashboard import events
from flext_mesh.dashboard.assets import load_assets
from flext_mesh.dashboard.series import build_series, snapshot
from flext_mesh.dashboard.web import (
    API_HEADERS,
    POST,
    error_response,
    json_response,
    send_stream,
)
from flext_mesh.durations import parse_duration
from flext_mesh.errors import FieldViolation, InvalidArgument, MeshError, NotFound
from flext_mesh.metrics.service import Metrics
from flext_mesh.names import MAX_NAME, check_length, check_name, raise_if
from flext_mesh.orchestrator.engine import Orchestrator
from flext_mesh.registry.applied import STALE_AFTER, applied
from flext_mesh.registry.registry import REMOVALS_KEPT_SECONDS, Registry
from flext_mesh.v1 import metrics_pb2, orchestrator_pb2, registry_pb2
from flext_mesh.xds import status as xds_status
from flext_mesh.xds.hub import XdsHub

__all__ = [
    "ACTIONS",
    "API_PREFIX",
    "PAGE_PATH",
    "TOKEN_COOKIE",
    "Authorize",
    "Dashboard",
    "DashboardSettings",
    "Permit",
    "bearer_token",
    "http_status",
]

#: Where the page is served.
PAGE_PATH: Final = "/dashboard/"
#: Prefix of the JSON API.
API_PREFIX: Final = "/api/v1"
#: Cookie holding the bearer token of a browser (set by the page's token form).
TOKEN_COOKIE: Final = "flext_mesh_token"

#: The dashboard's actions: the name the page knows them by -> the RPC whose scope they
#: need.
ACTIONS: Final = {
    "cancel_execution": "/flext_mesh.v1.OrchestratorService/CancelExecution",
    "retry_execution": "/flext_mesh.v1.OrchestratorService/RetryExecution",
}

#: Decides whether a request may do an action: ``(request, rpc method)``, answered as
#: :data:`Authorize` is.
Permit: TypeAlias = Callable[[web.Request, str], "bool | str | Awaitable[bool | str]"]

#: Decides whether a request may read the API: ``True`` allows it; ``False`` or a
#: reason (str) refuses it (401 when the request carried no token, else 403). May be a
#: coroutine function; may raise Unauthenticated or PermissionDenied itself.
Authorize: TypeAlias = Callable[[web.Request], "bool | str | Awaitable[bool | str]"]
_Result: TypeAlias = Message | Mapping[str, Any]

#: gRPC status -> HTTP status, as Google's APIs map them over HTTP/JSON.
_HTTP_STATUS: Final = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
_SSE_HEADERS: Final = {
    **API_HEADERS,
    "Content-Type": "text/event-stream",
    "X-Accel-Buffering": "no",
}
_DEFAULT_REPORT_WINDOW = 24 * 3600.0
_MIN_WINDOW = 10.0
_MAX_PAGE = 1000


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status of a gRPC status code (500 for none known)."""
    return _HTTP_STATUS.get(code, 500)


def bearer_token(request: web.Request) -> str | None:
    """The token a request carries: ``Authorization: Bearer`` first, else the cookie."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    cookies: SimpleCookie = SimpleCookie()
    try:
        cookies.load(request.headers.get("cookie", ""))
    except CookieError:
        return None
    morsel = cookies.get(TOKEN_COOKIE)
    return morsel.value if morsel is not None and morsel.value else None


def _allow_all(request: web.Request) -> bool:
    return True


def _permit_all(request: web.Request, method: str) -> bool:
    return True


def _refused(request: web.Request, verdict: object, default: str) -> web.Response:
    """The answer to a request a hook refused: 401 when it carried no token, else 403;
    the hook's reason (a str) or ``default``."""
    reason = verdict if isinstance(verdict, str) and verdict else default
    if bearer_token(request) is None:
        return error_response(
            401,
            "UNAUTHENTICATED",
            f"a bearer token is required: {reason}",
            headers={"WWW-Authenticate": 'Bearer realm="flext-mesh"'},
        )
    return error_response(403, "PERMISSION_DENIED", reason)


@dataclass(frozen=True, kw_only=True)
class DashboardSettings:
    """How the dashboard streams."""

    #: Seconds of silence after which a stream sends a heartbeat comment.
    heartbeat_interval: float = 5.0
    #: Window of ``/series`` when none is asked, seconds.
    series_window: float = 900.0


class Dashboard:
    """The page, JSON API and event streams over a control plane's domain objects."""

    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        orchestrator: Orchestrator,
        *,
        authorize: Authorize | None = None,
        permit: Permit | None = None,
        settings: DashboardSettings | None = None,
        xds: XdsHub | None = None,
    ) -> None:
        """``authorize`` guards the API and streams, ``permit`` the actions (default:
        allow every request); ``xds``: the hub whose clients ``/xds`` lists (none
        without one)."""
        self.registry = registry
        self.xds = xds
        self.metrics = metrics
        self.orchestrator = orchestrator
        self.authorize: Authorize = authorize or _allow_all
        self.permit: Permit = permit or _permit_all
        self.settings = settings or DashboardSettings()

    def routes(self) -> dict[str, Handler]:
        """The HTTP routes: the page under ``/dashboard/`` (``/`` redirects there), the
        JSON API under ``/api/v1``."""
        api = {
            "/services": self._list_services,
            "/services/{name}": self._get_service,
            "/services/{name}/report": self._get_report,
            "/services/{name}/series": self._get_series,
            "/services/{name}/explain": self._explain,
            "/status": self._status,
            "/xds": self._xds_clients,
            "/removed": self._removed,
            "/alerts": self._list_alerts,
            "/workflows": self._list_workflows,
            "/workflows/{name}": self._get_workflow,
            "/executions": self._list_executions,
            "/executions/{execution_id}": self._get_execution,
            "/permissions": self._permissions,
        }
        actions = {
            "/executions/{execution_id}/cancel": ("cancel_execution", self._cancel_execution),
            "/executions/{execution_id}/retry": ("retry_execution", self._retry_execution),
        }
        streams = {
            "/events/registry": self._registry_events,
            "/events/executions/{execution_id}": self._execution_events,
        }
        routes: dict[str, Handler] = {"/": _to_page, **load_assets(PAGE_PATH)}
        routes.update({API_PREFIX + path: self._json(h) for path, h in api.items()})
        routes.update({API_PREFIX + path: self._guarded(h) for path, h in streams.items()})
        routes.update(
            {
                POST + API_PREFIX + path: self._action(ACTIONS[name], handler)
                for path, (name, handler) in actions.items()
            }
        )
        return routes

    # -- plumbing ----------------------------------------------------------------------

    async def _refusal(self, request: web.Request) -> web.Response | None:
        """None when ``authorize`` lets the request through, else the error response."""
        try:
            verdict = self.authorize(request)
            if inspect.isawaitable(verdict):
                verdict = await verdict
        except MeshError as exc:
            return _error_response(exc)
        if verdict is True:
            return None
        return _refused(request, verdict, "not allowed to read")

    def _json(self, handler: Callable[[web.Request], Awaitable[_Result]]) -> Handler:
        """A JSON route: authorize, call, encode in a worker thread, map MeshErrors."""

        async def serve(request: web.Request) -> web.StreamResponse:
            refused = await self._refusal(request)
            if refused is not None:
                return refused
            try:
                result = await handler(request)
            except MeshError as exc:
                return _error_response(exc)
            body = await asyncio.to_thread(_encode, result)
            return web.Response(
                body=body, headers={**API_HEADERS, "Content-Type": "application/json"}
            )

        return serve

    async def _may(self, request: web.Request, method: str) -> bool | str:
        """Whether ``permit`` lets the request call ``method`` (True, or why not)."""
        verdict = self.permit(request, method)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return verdict

    def _action(
        self, method: str, handler: Callable[[web.Request, dict[str, Any]], Awaitable[_Result]]
    ) -> Handler:
        """A POST route: a JSON object body, the scope of ``method``, then the handler."""

        async def serve(request: web.Request) -> web.StreamResponse:
            if request.content_type != "application/json":
                why = "send the body as JSON (Content-Type: application/json)"
                return error_response(415, "INVALID_ARGUMENT", why)
            try:
                verdict = await self._may(request, method)
            except MeshError as exc:
                return _error_response(exc)
            if verdict is not True:
                return _refused(request, verdict, "not allowed")
            try:
                body = json.loads(await request.read() or b"{}")
            except ValueError:
                return error_response(400, "INVALID_ARGUMENT", "the body is not JSON")
            if not isinstance(body, dict):
                return error_response(400, "INVALID_ARGUMENT", "the body must be a JSON object")
            try:
                result = await handler(request, body)
            except MeshError as exc:
                return _error_response(exc)
            encoded = await asyncio.to_thread(_encode, result)
            return web.Response(
                body=encoded, headers={**API_HEADERS, "Content-Type": "application/json"}
            )

        return serve

    def _guarded(self, handler: Handler) -> Handler:
        """A stream route: authorize, then let the handler answer (MeshErrors mapped)."""

        async def serve(request: web.Request) -> web.StreamResponse:
            refused = await self._refusal(request)
            if refused is not None:
                return refused
            try:
                return await handler(request)
            except MeshError as exc:
                return _error_response(exc)

        return serve

    # -- services ----------------------------------------------------------------------

    async def _list_services(self, request: web.Request) -> _Result:
        """ListServices: summaries sorted by name, paged."""
        return self.registry.list_services(
            _int(request, "page_size", maximum=_MAX_PAGE),
            request.query.get("page_token", ""),
            request.query.get("type", ""),
        )

    async def _get_service(self, request: web.Request) -> _Result:
        """A service's instances (all of them, healthy or not) and its policy."""
        name = request.match_info["name"]
        raise_if(check_name("name", name))
        # The registry's watch snapshot: every instance, whatever a policy's split says.
        stream = self.registry.watch([name], 0)
        try:
            first = registry_pb2.WatchResponse.FromString(await anext(stream))
        finally:
            await events.aclose(stream)
        found = first.snapshot
        if not found.instances and not found.policies:
            raise NotFound(f"service {name!r} has no registered instance")
        return {
            "service_name": name,
            "revision": str(first.revision),
            "instances": list(found.instances),
            "policy": found.policies[0] if found.policies else None,
        }

    async def _explain(self, request: web.Request) -> _Result:
        """Why each instance weighs what it does (``flext-mesh services explain``):
        Discover's explanations, with the answer a default Discover gives."""
        name = request.match_info["name"]
        raise_if(check_name("name", name))
        discovered = await self.registry.discover(registry_pb2.DiscoverRequest(service_name=name))
        explanations = self.registry.explain(name, (i.instance_id for i in discovered.instances()))
        if not explanations:
            raise NotFound(f"service {name!r} has no registered instance")
        return {"service_name": name, "explanations": explanations}

    async def _status(self, request: web.Request) -> _Result:
        """What each instance's sidecar applied of the registry (``flext-mesh
        status``): the registry's revision, and per instance its applied revision, how
        far behind, since when and its state."""
        revision = self.registry.cache.revision
        now = time.time()
        rows = []
        for service, instances in sorted(self.registry.cache.services.items()):
            for instance_id, instance in sorted(instances.items()):
                where = applied(instance, revision, now)
                rows.append(
                    {
                        "service_name": service,
                        "instance_id": instance_id,
                        "applied_revision": str(where.revision),
                        "behind": where.behind,
                        "since_seconds": round(where.since, 3),
                        "state": where.state,
                    }
                )
        return {"revision": str(revision), "stale_after_seconds": STALE_AFTER, "instances": rows}

    async def _xds_clients(self, request: web.Request) -> _Result:
        """ListXdsClients: the xDS clients of this replica and where each stands
        (``flext-mesh xds status``), paged."""
        hub = self.xds
        return xds_status.list_clients(
            hub.clients() if hub is not None else [],
            hub.revision if hub is not None else self.registry.cache.revision,
            _int(request, "page_size", maximum=_MAX_PAGE),
            request.query.get("page_token", ""),
            time.time(),
        )

    async def _removed(self, request: web.Request) -> _Result:
        """Instances removed in the last ``kept_seconds`` and not registered again:
        as they last were, why and when."""
        return {
            "kept_seconds": REMOVALS_KEPT_SECONDS,
            "removed": [
                {
                    "instance": removal.instance,
                    "removal_reason": registry_pb2.RemovalReason.Name(removal.reason),
                    "removed_time": _rfc3339(removal.time),
                }
                for removal in self.registry.recently_removed()
            ],
        }

    # -- metrics -----------------------------------------------------------------------

    def _window(self, request: web.Request, default: float) -> float:
        """The ``window`` parameter in seconds (``90s``, ``15m``, ``1h``, or seconds)."""
        text = request.query.get("window", "")
        if not text:
            return default
        nanos = parse_duration(text, bare_seconds=True)
        if nanos is None or nanos <= 0:
            raise InvalidArgument.from_violations(
                [FieldViolation("window", f"{text!r} is not a duration such as 90s, 15m or 1h")]
            )
        return nanos / 1e9

    async def _get_report(self, request: web.Request) -> _Result:
        """GetServiceReport over ``window`` (default 24 h, at most the retention)."""
        retention = self.metrics.aggregator.settings.retention
        name, operation = request.match_info["name"], request.query.get("operation", "")
        raise_if(
            check_length("name", name, MAX_NAME) + check_length("operation", operation, MAX_NAME)
        )
        report = await self.metrics.service_report(
            name,
            self._window(request, min(_DEFAULT_REPORT_WINDOW, retention)),
            operation=operation,
            by_version=_bool(request, "by_version"),
            by_instance=_bool(request, "by_instance"),
        )
        return metrics_pb2.GetServiceReportResponse(report=report)

    async def _get_series(self, request: web.Request) -> _Result:
        """Per-bucket latency quantiles and error rates over ``window`` (default 15 min)."""
        name = request.match_info["name"]
        operation = request.query.get("operation", "")
        window = self._window(request, self.settings.series_window)
        retention = self.metrics.aggregator.settings.retention
        # As the report's: metrics names (a workflow's is ``workflow/NAME``), not
        # registry names.
        violations = check_length("name", name, MAX_NAME) + check_length(
            "operation", operation, MAX_NAME
        )
        if not _MIN_WINDOW <= window <= retention:
            violations.append(
                FieldViolation(
                    "window",
                    f"must be between 10s and the retention ({retention:g}s), got {window:g}s",
                )
            )
        raise_if(violations)
        buckets = snapshot(self.metrics.aggregator, name, window)
        if operation:
            buckets = [
                (start, width, {k: v for k, v in series.items() if k.operation == operation})
                for start, width, series in buckets
            ]
        buckets = [item for item in buckets if item[2]]
        if not buckets:
            what = f"operation {operation!r} of service" if operation else "service"
            raise NotFound(f"{what} {name!r} has no call recorded in the last {window:g}s")
        series = await asyncio.to_thread(build_series, buckets, operation=operation)
        return {
            "service_name": name,
            "window": f"{window:g}s",
            "generate_time": _now_rfc3339(),
            "time": [start for start, _, _ in buckets],
            "width": [width for _, width, _ in buckets],
            "operations": series,
        }

    async def _list_alerts(self, request: web.Request) -> _Result:
        """ListAlerts: active alerts, most severe first."""
        return self.metrics.list_alerts(
            request.query.get("service", ""),
            _enum(request, "min_severity", metrics_pb2.AlertSeverity, "ALERT_SEVERITY_"),
            _int(request, "page_size", maximum=_MAX_PAGE),
            request.query.get("page_token", ""),
        )

    # -- workflows and executions --------------------------------------------------------

    async def _list_workflows(self, request: web.Request) -> _Result:
        """ListWorkflows: definitions by name, paged."""
        workflows, token = await self.orchestrator.list_workflows(
            _int(request, "page_size", maximum=_MAX_PAGE), request.query.get("page_token", "")
        )
        return orchestrator_pb2.ListWorkflowsResponse(workflows=workflows, next_page_token=token)

    async def _get_workflow(self, request: web.Request) -> _Result:
        """GetWorkflow: the latest version, or ``version``."""
        workflow = await self.orchestrator.get_workflow(
            request.match_info["name"], _int(request, "version")
        )
        return orchestrator_pb2.GetWorkflowResponse(workflow=workflow)

    async def _list_executions(self, request: web.Request) -> _Result:
        """ListExecutions: newest first, by ``workflow`` and ``state``, paged."""
        executions, token = await self.orchestrator.list_executions(
            request.query.get("workflow", ""),
            _enum(request, "state", orchestrator_pb2.ExecutionState, "EXECUTION_STATE_"),
            _int(request, "page_size", maximum=_MAX_PAGE),
            request.query.get("page_token", ""),
        )
        return orchestrator_pb2.ListExecutionsResponse(executions=executions, next_page_token=token)

    async def _get_execution(self, request: web.Request) -> _Result:
        """GetExecution, with its event history when ``include_events=true``."""
        execution, history = await self.orchestrator.get_execution(
            request.match_info["execution_id"], include_events=_bool(request, "include_events")
        )
        return orchestrator_pb2.GetExecutionResponse(execution=execution, events=history)

    async def _permissions(self, request: web.Request) -> _Result:
        """Which actions this request's token may do (the page shows only those)."""
        allowed = {}
        for name, method in ACTIONS.items():
            try:
                allowed[name] = await self._may(request, method) is True
            except MeshError:
                allowed[name] = False
        return {"actions": allowed}

    async def _cancel_execution(self, request: web.Request, body: dict[str, Any]) -> _Result:
        """CancelExecution: ``{"reason": "..."}`` (optional)."""
        reason = body.get("reason", "")
        if not isinstance(reason, str):
            raise InvalidArgument.from_violations([FieldViolation("reason", "must be a string")])
        execution = await self.orchestrator.cancel_execution(
            request.match_info["execution_id"], reason
        )
        return orchestrator_pb2.CancelExecutionResponse(execution=execution)

    async def _retry_execution(self, request: web.Request, body: dict[str, Any]) -> _Result:
        """RetryExecution: the new execution (``{}`` as the body)."""
        execution = await self.orchestrator.retry_execution(request.match_info["execution_id"])
        return orchestrator_pb2.RetryExecutionResponse(execution=execution)

    # -- streams -----------------------------------------------------------------------

    async def _registry_events(self, request: web.Request) -> web.StreamResponse:
        """Registry changes as SSE: ``snapshot`` first (or the history since
        ``Last-Event-ID``), then ``change`` batches and ``progress``; ids are revisions."""
        services = [s for s in request.query.get("services", "").split(",") if s]
        from_revision = _resume_point(request, "from_revision")
        raise_if(v for i, name in enumerate(services) for v in check_name(f"services[{i}]", name))

        async def body() -> AsyncGenerator[bytes, None]:
            yield f"retry: {events.RETRY_MS}\n\n".encode()
            source = self.registry.watch(services, from_revision)
            interval = self.settings.heartbeat_interval
            try:
                async with contextlib.aclosing(events.with_heartbeats(source, interval)) as feed:
                    async for payload in feed:
                        if payload is None:
                            yield events.comment("keep-alive")
                        else:
                            yield await asyncio.to_thread(_registry_message, payload)
            except MeshError as exc:
                yield events.event("stream_error", _error_document(exc))

        return await send_stream(request, body(), headers=_SSE_HEADERS)

    async def _execution_events(self, request: web.Request) -> web.StreamResponse:
        """An execution's events as SSE (``event``, ids are event indexes), then ``end``
        with the execution as it ended; the stream closes after ``end``."""
        execution_id = request.match_info["execution_id"]
        after_index = _resume_point(request, "after_index")
        await self.orchestrator.get_execution(execution_id)  # 404 before streaming

        async def body() -> AsyncGenerator[bytes, None]:
            yield f"retry: {events.RETRY_MS}\n\n".encode()
            source = self.orchestrator.watch_execution(execution_id, after_index)
            interval = self.settings.heartbeat_interval
            try:
                async with contextlib.aclosing(events.with_heartbeats(source, interval)) as feed:
                    async for message in feed:
                        if message is None:
                            yield events.comment("keep-alive")
                            continue
                        document = await asyncio.to_thread(_to_dict, message)
                        if message.HasField("event"):
                            yield events.event(
                                "event", document["event"], event_id=message.event.index
                            )
                        if message.HasField("execution"):
                            yield events.event("end", document["execution"])
                            return
            except MeshError as exc:
                yield events.event("stream_error", _error_document(exc))

        return await send_stream(request, body(), headers=_SSE_HEADERS)


# -- helpers ---------------------------------------------------------------------------


async def _to_page(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": PAGE_PATH})


def _to_dict(message: Message) -> dict[str, Any]:
    """A message in the proto3 JSON mapping with proto field names, zero values included
    (the same as ``flext-mesh ... -o json``)."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Message):
        return _to_dict(value)
    if isinstance(value, Mapping):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def _encode(result: _Result) -> bytes:
    """The JSON body of a result (runs in a worker thread: big lists cost milliseconds)."""
    document = _jsonable(result)
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def _registry_message(payload: bytes) -> bytes:
    """One serialized WatchResponse as an SSE message."""
    response = registry_pb2.WatchResponse.FromString(payload)
    if response.HasField("snapshot"):
        name = "snapshot"
    elif response.events:
        name = "change"
    else:
        name = "progress"
    return events.event(name, _to_dict(response), event_id=response.revision)


def _error_document(exc: MeshError) -> dict[str, Any]:
    error: dict[str, Any] = {
        "code": http_status(exc.code),
        "status": exc.code.name,
        "message": exc.message,
    }
    if isinstance(exc, InvalidArgument) and exc.violations:
        error["field_violations"] = [
            {"field": v.field, "description": v.description} for v in exc.violations
        ]
    return {"error": error}


def _error_response(exc: MeshError) -> web.Response:
    status = http_status(exc.code)
    headers: dict[str, str] = {}
    retry_after = getattr(exc, "retry_after", None)
    if status in (429, 503) and retry_after:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="flext-mesh"'
    return json_response(_error_document(exc), status=status, headers=headers)


def _int(request: web.Request, name: str, *, maximum: int | None = None) -> int:
    """A non-negative integer query parameter (0 when absent)."""
    text = request.query.get(name, "")
    if not text:
        return 0
    if not text.isascii() or not text.isdigit():
        raise InvalidArgument.from_violations(
            [FieldViolation(name, f"{text!r} is not a non-negative integer")]
        )
    value = int(text)
    if maximum is not None and value > maximum:
        raise InvalidArgument.from_violations(
            [FieldViolation(name, f"{value} is over the maximum {maximum}")]
        )
    return value


def _bool(request: web.Request, name: str) -> bool:
    """A boolean query parameter: true/1/yes or false/0/no (false when absent)."""
    text = request.query.get(name, "").lower()
    if text in ("", "false", "0", "no"):
        return False
    if text in ("true", "1", "yes"):
        return True
    raise InvalidArgument.from_violations([FieldViolation(name, f"{text!r} is not true or false")])


def _enum(request: web.Request, name: str, enum: Any, prefix: str) -> int:
    """An enum query parameter by name, with or without its prefix, any case
    (``running``, ``EXECUTION_STATE_RUNNING``); 0 when absent."""
    text = request.query.get(name, "").strip().upper()
    if not text:
        return 0
    full = text if text.startswith(prefix) else prefix + text
    values: Mapping[str, int] = {
        value.name: value.number for value in enum.DESCRIPTOR.values if value.number
    }
    if full not in values:
        known = ", ".join(key.removeprefix(prefix).lower() for key in values)
        raise InvalidArgument.from_violations(
            [FieldViolation(name, f"{text.lower()!r} is not one of {known}")]
        )
    return values[full]


def _resume_point(request: web.Request, name: str) -> int:
    """Where a stream resumes: the browser's ``Last-Event-ID``, else the query parameter."""
    last = request.headers.get("last-event-id", "").strip()
    if last:
        if not last.isascii() or not last.isdigit():
            raise InvalidArgument.from_violations(
                [FieldViolation("Last-Event-ID", f"{last!r} is not an id this stream sent")]
            )
        return int(last)
    return _int(request, name)


def _now_rfc3339() -> str:
    return _rfc3339(time.time())


def _rfc3339(epoch: float) -> str:
    stamp = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
