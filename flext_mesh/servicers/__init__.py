"""gRPC servicers of the control plane: protobuf in, domain calls, protobuf out.

Status codes and protobuf live here and in :mod:`flext_mesh.rpc`; the domains below
(registry, metrics, orchestrator) raise :class:`flext_mesh.errors.MeshError` children.
"""
