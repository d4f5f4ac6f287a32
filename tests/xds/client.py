"""A plain grpcio client dialing ``xds:///SERVICE``: no flext code on its path.

Run as a subprocess with GRPC_XDS_BOOTSTRAP set (the xDS client reads it when the
first xDS channel is made). ``count TARGET N OP JSON``: N calls, then one JSON line of
counts by instance id (or status code name). ``watch TARGET SECONDS OP JSON``: calls
for SECONDS, one line a call: ``EPOCH_SECONDS INSTANCE_OR_CODE``.
"""

from __future__ import annotations

import collections
import json
import sys
import time

import grpc

from flext_mesh.v1 import processor_pb2, processor_pb2_grpc


def main() -> None:
    mode, target, amount, operation, payload = sys.argv[1:6]
    stub = processor_pb2_grpc.ProcessorServiceStub(grpc.insecure_channel(target))
    request = processor_pb2.InvokeRequest(operation=operation)
    request.payload.update(json.loads(payload))
    # The first call waits for the listener, routes, clusters and endpoints (its
    # outcome is the instance's business: one may fail every call).
    try:
        stub.Invoke(request, timeout=15, wait_for_ready=True)
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    print("ready", flush=True)

    def call() -> str:
        try:
            return stub.Invoke(request, timeout=2).instance_id
        except grpc.RpcError as exc:
            return exc.code().name

    if mode == "count":
        counts = collections.Counter(call() for _ in range(int(amount)))
        print(json.dumps(counts), flush=True)
        return
    end = time.monotonic() + float(amount)
    while time.monotonic() < end:
        started = time.time()
        print(f"{started:.3f} {call()}", flush=True)
        time.sleep(0.005)


if __name__ == "__main__":
    main()
