"""xDS for proxyless gRPC clients: the registry's services as Envoy resources.

:mod:`.resources` builds Listeners, RouteConfigurations, Clusters and
ClusterLoadAssignments from instances and policies (pure); :mod:`.streams` keeps what
each ADS stream subscribed to, was sent, ACKed and NACKed; :mod:`.hub` follows the
registry cache and wakes the streams a change concerns. The gRPC side is
``flext_mesh.servicers.xds``.
"""
