"""Railway-oriented results: `FlextResult[T]` is either a success holding a value or a
failure holding an error message, a gRPC status code name and optional field violations.

A failure is a *business* outcome (a rejected request), not an infrastructure fault; the
code says how a server should report it (`INVALID_ARGUMENT`, `FAILED_PRECONDITION`, ...).
This module knows the gRPC code *names* only and imports nothing outside the standard
library, so it can be used on its own; ``import flext_mesh`` itself also loads grpc
(the error tree knows its status codes) and pydantic (``ServiceProcessor`` validates
with it), but no control-plane module.

Truthiness is deliberately refused: `bool(result)` raises `TypeError`, because `if result:`
reading as "if it succeeded" is exactly the bug this type exists to prevent. Test
`result.success` / `result.is_failure` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, NoReturn, Protocol, TypeVar, cast

__all__ = [
    "DEFAULT_FAILURE_CODE",
    "STATUS_CODE_NAMES",
    "STATUS_CODE_NAMES_BY_NUMBER",
    "VALIDATION_FAILURE_CODE",
    "FieldViolationPair",
    "FlextResult",
    "UnwrapError",
]

T_co = TypeVar("T_co", covariant=True)
U = TypeVar("U")

FieldViolationPair = tuple[str, str]
"""A `(field, description)` pair; `field` is a dotted path such as `items.0.qty`."""

#: The gRPC status code names by number (0 ``OK`` to 16 ``UNAUTHENTICATED``).
STATUS_CODE_NAMES_BY_NUMBER: tuple[str, ...] = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)

STATUS_CODE_NAMES: frozenset[str] = frozenset(STATUS_CODE_NAMES_BY_NUMBER)
"""Names of the gRPC status codes (`grpc.StatusCode` member names), kept here so this
module does not import grpc."""

DEFAULT_FAILURE_CODE = "FAILED_PRECONDITION"
"""Code of a failure created without `code` and without field violations."""

VALIDATION_FAILURE_CODE = "INVALID_ARGUMENT"
"""Code of a failure created without `code` but with field violations."""

_UNKNOWN_ERROR = "unknown error"
_INFINITY = float("inf")


class _NamedCode(Protocol):
    """Anything with a `name`, e.g. a `grpc.StatusCode` member."""

    @property
    def name(self) -> str: ...


class _ViolationLike(Protocol):
    """A field violation object, e.g. `flext_mesh.errors.FieldViolation`."""

    @property
    def field(self) -> str: ...

    @property
    def description(self) -> str: ...


_FieldViolationsArg = Mapping[str, str] | Iterable[tuple[str, str] | _ViolationLike] | None


class UnwrapError(ValueError):
    """Raised when the value of a failed `FlextResult` is requested."""

    def __init__(self, error: str, code: str) -> None:
        super().__init__(f"called value/unwrap() on a failed FlextResult [{code}]: {error}")
        self.error = error
        """The failure's error message."""
        self.code = code
        """The failure's gRPC status code name."""


def _normalize_code(code: str | _NamedCode) -> str:
    name = code if isinstance(code, str) else getattr(code, "name", None)
    if not isinstance(name, str) or name not in STATUS_CODE_NAMES:
        raise ValueError(
            f"unknown gRPC status code name {code!r}; expected one of "
            f"{', '.join(sorted(STATUS_CODE_NAMES - {'OK'}))}"
        )
    if name == "OK":
        raise ValueError("a failure cannot have status code OK")
    return name


def _normalize_violations(violations: _FieldViolationsArg) -> tuple[FieldViolationPair, ...]:
    if violations is None:
        return ()
    if isinstance(violations, Mapping):
        return tuple((str(f), str(d)) for f, d in violations.items())
    normalized: list[FieldViolationPair] = []
    for item in violations:
        if isinstance(item, tuple):
            field, description = item
        else:
            field, description = item.field, item.description
        normalized.append((str(field), str(description)))
    return tuple(normalized)


class FlextResult(Generic[T_co]):
    """The outcome of an operation: `ok(value)` or `fail(error, code=..., ...)`.

    Immutable and covariant: a `FlextResult[Dog]` is a `FlextResult[Animal]`.
    """

    __slots__ = ("_code", "_error", "_field_violations", "_retry_after", "_success", "_value")

    _success: bool
    _value: T_co | None
    _error: str | None
    _code: str | None
    _field_violations: tuple[FieldViolationPair, ...]
    _retry_after: float | None

    def __init__(
        self,
        *,
        _success: bool,
        _value: T_co | None,
        _error: str | None,
        _code: str | None,
        _field_violations: tuple[FieldViolationPair, ...],
        _retry_after: float | None = None,
    ) -> None:
        """Internal: use `FlextResult.ok(...)` or `FlextResult.fail(...)`."""
        object.__setattr__(self, "_success", _success)
        object.__setattr__(self, "_value", _value)
        object.__setattr__(self, "_error", _error)
        object.__setattr__(self, "_code", _code)
        object.__setattr__(self, "_field_violations", _field_violations)
        object.__setattr__(self, "_retry_after", _retry_after)

    # -- constructors --------------------------------------------------------------

    @classmethod
    def ok(cls, value: T_co) -> FlextResult[T_co]:  # type: ignore[misc]  # a constructor
        """A success holding `value` (which may be None)."""
        return _make(cls, True, value, None, None, (), None)

    @classmethod
    def fail(
        cls,
        error: str | None,
        *,
        code: str | _NamedCode | None = None,
        field_violations: _FieldViolationsArg = None,
        retry_after: float | None = None,
    ) -> FlextResult[T_co]:
        """A failure with message `error` and a gRPC status code name.

        `field_violations`: `(field, description)` pairs, a mapping, or objects with
        `.field` and `.description`. Without `code`: `INVALID_ARGUMENT` when there are
        field violations, otherwise `FAILED_PRECONDITION`. An empty or None `error`
        becomes "unknown error". A `code` that is not a gRPC status code name (or is
        "OK") raises ValueError; `grpc.StatusCode` members are accepted by name.
        `retry_after`: seconds the caller should wait before trying again (sent as
        `google.rpc.RetryInfo` with RESOURCE_EXHAUSTED); ValueError unless finite and
        at least 0.
        """
        if retry_after is not None and not (0.0 <= retry_after < _INFINITY):  # NaN too
            raise ValueError(f"retry_after must be a finite number >= 0, got {retry_after!r}")
        violations = _normalize_violations(field_violations)
        if code is not None:
            name = _normalize_code(code)
        elif violations:
            name = VALIDATION_FAILURE_CODE
        else:
            name = DEFAULT_FAILURE_CODE
        return _make(
            cls,
            False,
            None,
            str(error) if error else _UNKNOWN_ERROR,
            name,
            violations,
            None if retry_after is None else float(retry_after),
        )

    # -- state ---------------------------------------------------------------------

    @property
    def success(self) -> bool:
        """True for a success."""
        return self._success

    @property
    def is_success(self) -> bool:
        """True for a success (alias of `success`)."""
        return self._success

    @property
    def is_failure(self) -> bool:
        """True for a failure."""
        return not self._success

    @property
    def value(self) -> T_co:
        """The success value; raises `UnwrapError` (a ValueError) on a failure."""
        if not self._success:
            self._raise_unwrap()
        return cast("T_co", self._value)

    @property
    def error(self) -> str | None:
        """The failure message, or None for a success."""
        return self._error

    @property
    def code(self) -> str | None:
        """The gRPC status code name of a failure (e.g. "NOT_FOUND"), None for a success."""
        return self._code

    @property
    def field_violations(self) -> tuple[FieldViolationPair, ...]:
        """`(field, description)` pairs of a validation failure; empty otherwise."""
        return self._field_violations

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait before trying again, when the failure says (else None)."""
        return self._retry_after

    # -- combinators ---------------------------------------------------------------

    def unwrap(self) -> T_co:
        """The success value; raises `UnwrapError` (a ValueError) on a failure."""
        return self.value

    def unwrap_or(self, default: U) -> T_co | U:
        """The success value, or `default` on a failure."""
        if self._success:
            return cast("T_co", self._value)
        return default

    def map(self, fn: Callable[[T_co], U]) -> FlextResult[U]:
        """Apply `fn` to a success value; a failure passes through and `fn` is not called.

        Exceptions raised by `fn` propagate.
        """
        if not self._success:
            return cast("FlextResult[U]", self)
        return FlextResult.ok(fn(cast("T_co", self._value)))

    def flat_map(self, fn: Callable[[T_co], FlextResult[U]]) -> FlextResult[U]:
        """Chain a step that itself returns a FlextResult; a failure short-circuits."""
        if not self._success:
            return cast("FlextResult[U]", self)
        return fn(cast("T_co", self._value))

    # -- dunders -------------------------------------------------------------------

    def _raise_unwrap(self) -> NoReturn:
        raise UnwrapError(self._error or _UNKNOWN_ERROR, self._code or DEFAULT_FAILURE_CODE)

    def __bool__(self) -> NoReturn:
        raise TypeError("FlextResult has no truth value; test result.success or result.is_failure")

    if not TYPE_CHECKING:  # hidden from type checkers so `result.typo = 1` stays an error

        def __setattr__(self, name: str, value: object) -> NoReturn:
            raise AttributeError(f"FlextResult is immutable (cannot set {name!r})")

        def __delattr__(self, name: str) -> NoReturn:
            raise AttributeError(f"FlextResult is immutable (cannot delete {name!r})")

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, self._key())

    def _key(self) -> tuple[object, ...]:
        return (
            self._success,
            self._value,
            self._error,
            self._code,
            self._field_violations,
            self._retry_after,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FlextResult):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        if self._success:
            return f"FlextResult.ok({self._value!r})"
        extra = f", field_violations={self._field_violations!r}" if self._field_violations else ""
        if self._retry_after is not None:
            extra += f", retry_after={self._retry_after!r}"
        return f"FlextResult.fail({self._error!r}, code={self._code!r}{extra})"


# The slots' own setters: a result is built on every processor run (several times per
# served call), and going through the immutable __setattr__ by name costs three times as
# much.
_SETTERS = tuple(
    cast("Any", FlextResult.__dict__[name]).__set__
    for name in ("_success", "_value", "_error", "_code", "_field_violations", "_retry_after")
)
_NEW = object.__new__


_R = TypeVar("_R", bound="FlextResult[Any]")


def _make(  # noqa: PLR0917 - the six slots, positionally, on a hot path
    cls: type[_R],
    success: bool,
    value: object,
    error: str | None,
    code: str | None,
    field_violations: tuple[FieldViolationPair, ...],
    retry_after: float | None,
) -> _R:
    """A FlextResult (or subclass) instance with its slots set, without `__init__`."""
    set_success, set_value, set_error, set_code, set_violations, set_retry = _SETTERS
    result = _NEW(cls)
    set_success(result, success)
    set_value(result, value)
    set_error(result, error)
    set_code(result, code)
    set_violations(result, field_violations)
    set_retry(result, retry_after)
    return result


def _rebuild(  # noqa: PLR0917 - pickle hands the state over positionally
    success: bool,
    value: object,
    error: str | None,
    code: str | None,
    field_violations: tuple[FieldViolationPair, ...],
    retry_after: float | None = None,
) -> FlextResult[object]:
    """Unpickle a FlextResult (pickling cannot go through the immutable __setattr__)."""
    return FlextResult(
        _success=success,
        _value=value,
        _error=error,
        _code=code,
        _field_violations=field_violations,
        _retry_after=retry_after,
    )
