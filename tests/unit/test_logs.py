"""Log lines: floods of one cause held back, grpc's servicer reports rewritten, JSON."""

from __future__ import annotations

import json
import logging
import time

import pytest

from flext_mesh import logs
from flext_mesh.logs import setup_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line]


def test_repeats_of_one_cause_are_counted_not_written(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    setup_logging("INFO")
    log = logging.getLogger("flext_mesh.test")
    for _ in range(500):
        log.warning("store full: %s", "SQLITE_FULL", extra={"cause": "store full"})
    log.warning("another cause", extra={"cause": "other"})
    log.warning("no cause: always written")
    log.warning("no cause: always written")
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 4, lines
    assert "store full: SQLITE_FULL" in lines[0]

    # After the window, the next one is written with how many were held back.
    real = time.monotonic
    monkeypatch.setattr(logs.time, "monotonic", lambda: real() + logs.REPEAT_WINDOW + 1)
    log.warning("store full: %s", "SQLITE_FULL", extra={"cause": "store full"})
    (line,) = _lines(capsys.readouterr().err)
    assert line.endswith("repeated=499")


def test_an_unimplemented_method_is_one_warning_without_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("INFO")
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    for _ in range(50):
        try:
            raise NotImplementedError("Method not implemented!")
        except NotImplementedError:
            grpc_log.exception(
                "Unexpected [%s] raised by servicer method [%s]",
                "NotImplementedError",
                "/grpc.health.v1.Health/List",
            )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = _lines(err)
    assert " WARNING grpc._cython.cygrpc " in line
    assert "does not implement method=/grpc.health.v1.Health/List" in line


def test_a_servicer_bug_keeps_its_traceback_once_per_window(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("INFO")
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    for _ in range(20):
        try:
            raise KeyError("missing")
        except KeyError:
            grpc_log.exception(
                "Unexpected [%s] raised by servicer method [%s]", "KeyError", "/x.Y/Z"
            )
    err = capsys.readouterr().err
    assert err.count("Traceback") == 1
    assert "ERROR grpc._cython.cygrpc Unexpected [KeyError]" in err


def test_json_lines_carry_the_fields_a_shipper_needs(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "json")
    log = logging.getLogger("flext_mesh.test")
    log.info("instance registered id=%s", "a-1", extra={"cid": "c-9", "service": "payment"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("bug")
    first, second = (json.loads(line) for line in _lines(capsys.readouterr().err))
    assert first["level"] == "INFO"
    assert first["logger"] == "flext_mesh.test"
    assert first["message"] == "instance registered id=a-1"
    assert (first["cid"], first["service"]) == ("c-9", "payment")
    assert first["time"].endswith("Z")
    assert second["exc"].startswith("Traceback")
    assert "ValueError: boom" in second["exc"]


def test_log_failure_tells_an_expected_fault_from_a_bug(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("INFO")
    log = logging.getLogger("flext_mesh.test")
    for error in (StoreFull("disk full"), ZeroDivisionError("bug")) * 30:
        try:
            raise error
        except Exception as caught:
            logs.log_failure(log, "checkpoint failed; retrying", caught, expected=(StoreFull,))
    err = capsys.readouterr().err
    warning, error, *trace = _lines(err)
    assert warning.split()[1:4] == ["WARNING", "flext_mesh.test", "checkpoint"]
    assert "checkpoint failed; retrying: disk full" in warning
    assert " ERROR " in error
    assert err.count("Traceback") == 1
    assert trace[-1] == "ZeroDivisionError: bug"


class StoreFull(Exception):
    """A fault this test expects."""


def test_lines_carry_the_trace_id_while_tracing_is_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup_logging("INFO")
    log = logging.getLogger("flext_mesh.test")
    logs.set_trace_id_source(lambda: "4bf92f3577b34da6a3ce929d0e0e4736")
    try:
        log.info("inside a span")
    finally:
        logs.set_trace_id_source(None)
    log.info("tracing off")
    inside, outside = _lines(capsys.readouterr().err)
    assert inside.endswith("cid=- trace_id=4bf92f3577b34da6a3ce929d0e0e4736")
    assert outside.endswith("cid=-")
