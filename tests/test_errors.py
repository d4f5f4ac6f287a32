"""The error tree travels as gRPC statuses with details and comes back as the same errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from flext_mesh import errors
from flext_mesh.errors import (
    FieldViolation,
    InfrastructureError,
    InvalidArgument,
    MeshError,
    NotFound,
    ResourceExhausted,
    from_result,
)
from flext_mesh.result import FlextResult
from flext_mesh.rpc.status import from_rpc_error, rpc_errors

RAISES: dict[str, MeshError | Exception] = {
    "invalid": InvalidArgument.from_violations(
        [
            FieldViolation("instance.endpoint", "must be HOST:PORT"),
            FieldViolation("ttl", "must be between 1s and 1h"),
        ]
    ),
    "missing": NotFound("service 'payment' has no instance"),
    "limited": ResourceExhausted("too many reports", retry_after=1.5),
    "bug": ZeroDivisionError("boom"),
    "conflict": errors.StatusError("version conflict", grpc.StatusCode.ABORTED),
}


class _Servicer:
    """A servicer whose method raises what the request names."""

    @rpc_errors
    async def Call(self, request: bytes, context: Any) -> bytes:
        raise RAISES[request.decode()]

    @rpc_errors
    async def Stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        raise RAISES[request.decode()]


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    servicer = _Servicer()
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "test.Errors",
        {
            "Call": grpc.unary_unary_rpc_method_handler(servicer.Call),
            "Stream": grpc.unary_stream_rpc_method_handler(servicer.Stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan
    await server.stop(0)


async def _call(channel: grpc.aio.Channel, what: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await channel.unary_unary("/test.Errors/Call")(what.encode())
    return info.value


async def test_validation_error_carries_field_violations_both_ways(
    channel: grpc.aio.Channel,
) -> None:
    exc = await _call(channel, "invalid")
    assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT
    err = from_rpc_error(exc)
    assert isinstance(err, InvalidArgument)
    assert err.violations == (
        FieldViolation("instance.endpoint", "must be HOST:PORT"),
        FieldViolation("ttl", "must be between 1s and 1h"),
    )
    assert "instance.endpoint" in err.message


async def test_not_found_and_resource_exhausted_round_trip(channel: grpc.aio.Channel) -> None:
    missing = from_rpc_error(await _call(channel, "missing"))
    assert isinstance(missing, NotFound)
    assert missing.message == "service 'payment' has no instance"
    limited = from_rpc_error(await _call(channel, "limited"))
    assert isinstance(limited, ResourceExhausted)
    assert limited.retry_after == pytest.approx(1.5)


async def test_unexpected_exception_is_internal_without_leaking_internals(
    channel: grpc.aio.Channel,
) -> None:
    exc = await _call(channel, "bug")
    assert exc.code() is grpc.StatusCode.INTERNAL
    assert "boom" not in (exc.details() or "")
    assert isinstance(from_rpc_error(exc), InfrastructureError)


async def test_streams_abort_with_the_status_after_their_messages(
    channel: grpc.aio.Channel,
) -> None:
    call = channel.unary_stream("/test.Errors/Stream")(b"missing")
    received: list[bytes] = []

    async def drain() -> None:
        async for item in call:
            received.append(item)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await drain()
    assert received == [b"first"]
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_a_code_without_its_own_class_keeps_its_code(channel: grpc.aio.Channel) -> None:
    call = channel.unary_unary("/test.Errors/Call")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"conflict")
    assert info.value.code() is grpc.StatusCode.ABORTED
    error = from_rpc_error(info.value)
    assert isinstance(error, errors.StatusError)
    assert (error.code, error.message) == (grpc.StatusCode.ABORTED, "version conflict")
    assert not isinstance(error, errors.InfrastructureError)


def test_every_status_family_maps_to_one_class_and_back() -> None:
    for code in grpc.StatusCode:
        cls = errors.error_for_code(code)
        if cls is not MeshError:
            assert cls.grpc_status_code is code
    assert errors.is_infrastructure(grpc.StatusCode.UNAVAILABLE)
    assert not errors.is_infrastructure(grpc.StatusCode.FAILED_PRECONDITION)


def test_a_failed_result_becomes_the_error_of_its_code() -> None:
    err = from_result(FlextResult[int].fail("no such order", code="NOT_FOUND"))
    assert isinstance(err, NotFound)
    assert err.message == "no such order"
    default = from_result(FlextResult[int].fail("amount must be positive"))
    assert default.code is grpc.StatusCode.FAILED_PRECONDITION
    invalid = from_result(
        FlextResult[int].fail(
            "bad", code="INVALID_ARGUMENT", field_violations=[("email", "missing @")]
        )
    )
    assert isinstance(invalid, InvalidArgument)
    assert invalid.violations == (FieldViolation("email", "missing @"),)


def test_a_message_of_many_violations_names_the_first_and_counts_the_rest() -> None:
    violations = [FieldViolation(f"records[{i}].service_name", "is required") for i in range(5000)]
    error = InvalidArgument.from_violations(violations)
    assert error.message.startswith("invalid request: records[0].service_name: is required; ")
    assert error.message.endswith("records[19].service_name: is required; and 4980 more")
    assert len(error.violations) == 5000  # the status keeps them (cut to fit when sent)
