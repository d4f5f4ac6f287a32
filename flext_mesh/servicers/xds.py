"""AggregatedDiscoveryService (ADS, state of the world): the xDS hub over gRPC.

Proxyless gRPC clients (``xds:///SERVICE``) open one stream and ask for Listeners,
RouteConfigurations, Clusters and ClusterLoadAssignments on it; the protocol lives in
``flext_mesh.xds.streams``, the resources in ``flext_mesh.xds.resources``. This module
only reads requests, writes responses and turns refusals into status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2

from flext_mesh.errors import FieldViolation, InvalidArgument, Unimplemented
from flext_mesh.rpc.handlers import LongStreams, add_servicer, checked
from flext_mesh.rpc.status import rpc_errors
from flext_mesh.xds.hub import Subscriber, XdsHub

__all__ = ["ADS_SERVICE", "AdsServicer", "add_ads_servicer"]

_log = logging.getLogger("flext_mesh.xds")
_Context = grpc.aio.ServicerContext[Any, Any]
#: Full name of the ADS service.
ADS_SERVICE: str = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].full_name


class AdsServicer:
    """Serves ADS streams from an :class:`XdsHub`."""

    def __init__(self, hub: XdsHub, streams: LongStreams | None = None) -> None:
        """``streams``: long streams cancelled first on shutdown."""
        self.hub = hub
        self.streams = streams if streams is not None else LongStreams()

    @rpc_errors
    async def StreamAggregatedResources(self, request_iterator: Any, context: _Context) -> None:
        """State-of-the-world xDS: answer each request, push what changes."""
        hub = self.hub
        subscriber = hub.open(context.peer())
        reader = asyncio.create_task(self._read(subscriber, context))
        try:
            with self.streams.track():
                while True:
                    await subscriber.wake.wait()
                    subscriber.wake.clear()
                    if reader.done():
                        reader.result()  # a refusal: ends the stream with its status
                        return
                    if subscriber.closed:
                        return
                    marked = subscriber.take_marked()
                    responses = subscriber.stream.responses(hub.names)
                    for response in responses:
                        await context.write(response)
                    hub.pushed(marked, len(responses))
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            hub.close(subscriber)

    async def _read(self, subscriber: Subscriber, context: _Context) -> None:
        """Apply each request to the stream's state, then wake the writer."""
        try:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    return
                request = checked(request)
                try:
                    changed = subscriber.stream.handle(request)
                except ValueError as exc:
                    raise InvalidArgument.from_violations(
                        [FieldViolation("resource_names", str(exc))]
                    ) from None
                if changed:
                    self.hub.reindex(subscriber)
                subscriber.wake.set()
                if request.HasField("error_detail"):
                    state = subscriber.stream.state
                    _log.warning(
                        "xds NACK node=%s type=%s version=%s error=%s",
                        state.node_id,
                        request.type_url.rsplit(".", 1)[-1],
                        request.version_info,
                        request.error_detail.message[:500],
                    )
        finally:
            subscriber.wake.set()

    @rpc_errors
    async def DeltaAggregatedResources(self, request_iterator: Any, context: _Context) -> None:
        """Incremental xDS is not served: clients fall back to state of the world."""
        raise Unimplemented("incremental xDS is not served; use StreamAggregatedResources")


def add_ads_servicer(servicer: AdsServicer, server: grpc.aio.Server) -> None:
    """Serve ADS on ``server``."""
    add_servicer(
        server, servicer, ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"]
    )
