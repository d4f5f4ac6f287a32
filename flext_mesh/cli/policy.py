"""``flext-mesh policy``: set, show and delete a service's traffic policy; shift its split.

``policy set SERVICE FILE`` reads a YAML or JSON file into a ServicePolicy (see
:func:`policy_from_data` for what the file may say) and puts it; ``policy split
SERVICE v1=90 v2=10`` is the canary step: it changes only the split of the stored
policy, guarded by its version. Like the other nouns, each command asks RegistryService
over the channel it is given and returns the text to print; the caller
(:func:`flext_mesh.cli.main`) owns the channel and turns a failed RPC into one line on
stderr. Two things differ: a file that cannot be converted and a policy the control
plane refuses are reported with every field problem, one per line, and exit 1.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import duration_pb2, json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from flext_mesh.cli.common import (
    add_noun,
    expected_error,
    fail_with,
    positive_int,
    violations_block,
)
from flext_mesh.cli.output import (
    DOCUMENT_FORMATS,
    enum_prefix,
    format_date_time,
    message_to_dict,
    one_line,
    render_document,
    render_messages,
)
from flext_mesh.documents import (
    FileProblem,
    as_bool,
    as_duration_nanos,
    as_list,
    as_number,
    as_string,
    as_whole_number,
    closest,
    given_keys,
    join,
    kind,
    parse_documents,
    read_text,
)
from flext_mesh.durations import format_duration
from flext_mesh.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc

__all__ = [
    "add_commands",
    "delete",
    "describe_policy",
    "format_split",
    "load_policy_file",
    "parse_split",
    "policy_from_data",
    "policy_to_dict",
    "set_policy",
    "show",
    "split",
]

# Fields of ServicePolicy that the control plane sets: accepted in a file (so that the
# output of `policy show -o json` can be set again) and dropped.
_OUTPUT_ONLY = frozenset({"version", "update_time", "revision"})
_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
#: What ``policy show`` prints for a setting the policy leaves to the sidecars.
_NOT_SET = "not set"
_SPLIT_ARG = re.compile(r"(?P<version>[^=\s]+)=(?P<weight>\d+)")


def add_commands(
    nouns: argparse._SubParsersAction[Any],
    parents: Sequence[argparse.ArgumentParser],
) -> None:
    """Add the ``policy`` noun and its verbs; ``parents`` carry the connection flags."""
    verbs = add_noun(
        nouns,
        "policy",
        aliases=["policies"],
        help="set, show and delete traffic policies; shift traffic splits",
        description="Manage the per-service traffic policies of a running control plane.",
        parents=parents,
    )

    set_p = verbs.add(
        "set",
        set_policy,
        help="create or replace a service's policy from a YAML or JSON file",
        description=(
            "Create or replace a service's traffic policy from a YAML or JSON file ('-' "
            "for stdin). Keys are ServicePolicy's fields (snake_case or camelCase); "
            "durations may be '500ms', '2s', '1m' or numbers of seconds; enum values "
            "may be short and any case (least_response_time); splits may be a mapping "
            "(splits: {v1: 90, v2: 10}). A service_name in the file must be SERVICE. "
            "Prints the policy's new version; -o json prints the policy as stored."
        ),
    )
    set_p.add_argument("name", metavar="SERVICE", help="service name")
    set_p.add_argument("file", metavar="FILE", help=".yaml, .yml or .json file, or - for stdin")
    set_p.add_argument(
        "--expected-version",
        metavar="N",
        type=positive_int,
        default=0,
        help="only replace the policy if its version is still N (optimistic concurrency; "
        "default: replace whatever is stored)",
    )

    show_p = verbs.add(
        "show",
        show,
        help="a service's policy, summarised",
        description=(
            "A service's traffic policy, one setting per line; settings not set keep "
            "the sidecars' defaults. -o json prints the ServicePolicy, leaving out the "
            "fields of its settings (retry, circuit_breaker, ...) that are not set."
        ),
    )
    show_p.add_argument("name", metavar="SERVICE", help="service name")

    delete_p = verbs.add(
        "delete",
        delete,
        help="delete a service's policy (sidecars fall back to their defaults)",
        description="Delete a service's traffic policy; sidecars fall back to their defaults.",
    )
    delete_p.add_argument("name", metavar="SERVICE", help="service name")

    split_p = verbs.add(
        "split",
        split,
        help="replace only the traffic split of a service's policy",
        description=(
            "Replace only the traffic split of a service's policy (the canary step), "
            "starting from an empty policy when the service has none. The policy is "
            "written back only if nobody changed it since it was read (re-read and "
            "tried once more otherwise). Weights are whole percents summing to 100. "
            "-o json prints the policy as stored."
        ),
    )
    split_p.add_argument("name", metavar="SERVICE", help="service name")
    split_p.add_argument(
        "weights",
        metavar="VERSION=WEIGHT",
        type=_split_weight,
        nargs="*",
        help="a version and its share in percent, e.g. v1=90 v2=10",
    )
    split_p.add_argument("--clear", action="store_true", help="remove the split")
    split_p.set_defaults(usage_error=split_p.error)


# -- commands ------------------------------------------------------------------------------


def set_policy(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``policy set``: convert the file (no call when it cannot be), then PutServicePolicy."""
    try:
        policy = load_policy_file(args.file, args.name)
    except InvalidArgument as exc:
        shown = "stdin" if args.file == "-" else args.file
        fail_with(violations_block(f"{shown} is not a valid policy", exc))
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    stored = _put(stub, policy, args.expected_version, args.timeout)
    if args.output in DOCUMENT_FORMATS:
        return render_document(policy_to_dict(stored), args.output)
    return f"{stored.service_name}: policy version {stored.version}\n"


def show(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``policy show``: GetServicePolicy, summarised or as JSON."""
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    policy = stub.GetServicePolicy(
        registry_pb2.GetServicePolicyRequest(service_name=args.name), timeout=args.timeout
    ).policy
    if args.output in DOCUMENT_FORMATS:
        return render_document(policy_to_dict(policy), args.output)
    return describe_policy(policy)


def delete(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``policy delete``: DeleteServicePolicy."""
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    response = stub.DeleteServicePolicy(
        registry_pb2.DeleteServicePolicyRequest(service_name=args.name), timeout=args.timeout
    )
    if args.output in DOCUMENT_FORMATS:
        return render_messages(response, args.output)
    return f"{args.name}: policy deleted\n"


def split(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``policy split``: read the policy, replace its splits, write it back if unchanged.

    When another writer changed the policy in between (FAILED_PRECONDITION), the
    policy is read again and the split applied to that, once.
    """
    usage_error: Callable[[str], NoReturn] = args.usage_error
    if args.clear and args.weights:
        usage_error("give VERSION=WEIGHT pairs or --clear, not both")
    if not args.clear and not args.weights:
        usage_error("give VERSION=WEIGHT pairs (e.g. v1=90 v2=10) or --clear")
    try:
        weights = parse_split(args.weights)
    except ValueError as exc:
        usage_error(str(exc))
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    current = _get_or_empty(stub, args.name, args.timeout)
    if not weights and not current.splits:
        return _no_split_to_clear(current, args.output)
    try:
        stored = _put(stub, _with_split(current, weights), current.version, args.timeout)
    except grpc.RpcError as exc:
        expected_error(exc, FailedPrecondition)
        # Changed since it was read: apply the split to the policy as it is now, once.
        current = _get_or_empty(stub, args.name, args.timeout)
        if not weights and not current.splits:
            return _no_split_to_clear(current, args.output)
        stored = _put(stub, _with_split(current, weights), current.version, args.timeout)
    if args.output in DOCUMENT_FORMATS:
        return render_document(policy_to_dict(stored), args.output)
    pairs = [(s.version, s.weight) for s in stored.splits]
    shown = f"split {format_split(pairs)}" if pairs else "no split"
    return f"{stored.service_name}: policy version {stored.version}, {shown}\n"


def _get_or_empty(
    stub: registry_pb2_grpc.RegistryServiceStub, service: str, timeout: float
) -> registry_pb2.ServicePolicy:
    """The stored policy, or an empty one (version 0) when the service has none."""
    try:
        return stub.GetServicePolicy(
            registry_pb2.GetServicePolicyRequest(service_name=service), timeout=timeout
        ).policy
    except grpc.RpcError as exc:
        expected_error(exc, NotFound)
    return registry_pb2.ServicePolicy(service_name=service)


def _with_split(
    policy: registry_pb2.ServicePolicy, weights: Sequence[tuple[str, int]]
) -> registry_pb2.ServicePolicy:
    """A copy of ``policy`` with ``weights`` as its only split.

    Put with the version read as ``expected_version``: for version 0 (no policy yet)
    that asks for no check, so a policy created meanwhile would be replaced.
    """
    changed = registry_pb2.ServicePolicy()
    changed.CopyFrom(policy)
    del changed.splits[:]
    changed.splits.extend(registry_pb2.VersionSplit(version=v, weight=w) for v, w in weights)
    return changed


def _no_split_to_clear(current: registry_pb2.ServicePolicy, output: str) -> str:
    if output in DOCUMENT_FORMATS:
        return render_document(policy_to_dict(current) if current.version else None, output)
    if not current.version:
        return f"{current.service_name}: no policy, so no split to clear\n"
    return f"{current.service_name}: policy version {current.version} has no split\n"


def _put(
    stub: registry_pb2_grpc.RegistryServiceStub,
    policy: registry_pb2.ServicePolicy,
    expected_version: int,
    timeout: float,
) -> registry_pb2.ServicePolicy:
    """PutServicePolicy; a refused policy exits 1 listing every violation."""
    request = registry_pb2.PutServicePolicyRequest(policy=policy, expected_version=expected_version)
    try:
        return stub.PutServicePolicy(request, timeout=timeout).policy
    except grpc.RpcError as exc:
        error = expected_error(exc, InvalidArgument)
        fail_with(
            violations_block(
                f"the control plane refused the policy of {policy.service_name}", error
            )
        )


# -- reading a policy ----------------------------------------------------------------------


def load_policy_file(path: str, service: str) -> registry_pb2.ServicePolicy:
    """The policy of a YAML or JSON file (``-``: stdin) for ``service``.

    ``.json`` files are read as JSON, anything else as YAML (which JSON is a subset
    of). InvalidArgument when the file cannot be read or parsed, or (see
    :func:`policy_from_data`) converted.
    """
    language = "JSON" if path.lower().endswith(".json") else "YAML"
    try:
        [data] = parse_documents(read_text(sys.stdin if path == "-" else path), language)
    except FileProblem as exc:
        raise _file_error(str(exc)) from exc
    return policy_from_data(data, service)


def _file_error(description: str) -> InvalidArgument:
    return InvalidArgument.from_violations([FieldViolation("", f"the file {description}")])


def policy_from_data(data: Any, service: str) -> registry_pb2.ServicePolicy:
    """A ServicePolicy for ``service`` from the data of a policy file.

    Keys are the proto field names or their JSON (camelCase) names. Friendlier forms
    than proto JSON are accepted too: durations as ``"500ms"``, ``"2s"``, ``"1m"``,
    ``"1m30s"`` or numbers of seconds; enum values without their prefix, in any case
    (``least_response_time``); ``splits`` as a mapping ``{v1: 90, v2: 10}``; retryable
    codes in any case. A ``service_name`` must equal ``service``; ``version``,
    ``update_time`` and ``revision`` are set by the control plane and ignored.
    InvalidArgument lists every problem found, each with its field path as written
    (``retry.initial_backoff``, ``splits[1].weight``); ranges and sums are left to the
    control plane, which knows the instances.
    """
    out: list[FieldViolation] = []
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InvalidArgument.from_violations(
            [FieldViolation("", f"the file must hold a mapping of policy fields, not {kind(data)}")]
        )
    normalized = _message(data, registry_pb2.ServicePolicy.DESCRIPTOR, "", out)
    named = normalized.get("service_name", service)
    if named != service:
        given = _given_key(data, "service_name", "serviceName")
        out.append(FieldViolation(given, f"is {named!r}, but the policy is set for {service!r}"))
    normalized["service_name"] = service
    if out:
        raise InvalidArgument.from_violations(out)
    policy = registry_pb2.ServicePolicy()
    try:
        json_format.ParseDict(normalized, policy)
    except json_format.ParseError as exc:  # a case the checks above missed
        raise InvalidArgument.from_violations([FieldViolation("", one_line(str(exc)))]) from exc
    return policy


def _given_key(data: Mapping[Any, Any], *keys: str) -> str:
    return next((key for key in keys if key in data), keys[0])


def _message(
    data: Mapping[Any, Any], descriptor: Descriptor, path: str, out: list[FieldViolation]
) -> dict[str, Any]:
    """``data`` as proto JSON for ``descriptor``, keyed by proto field names."""
    top = descriptor is registry_pb2.ServicePolicy.DESCRIPTOR
    known: dict[str, str] = {}
    for field in descriptor.fields:
        known[field.name] = field.name
        known[field.json_name] = field.name
    names = [f.name for f in descriptor.fields if not (top and f.name in _OUTPUT_ONLY)]

    def unknown(key: str) -> str:
        return f"is not a field of {descriptor.name}{_hint(key, names)}"

    result: dict[str, Any] = {}
    for name, given in given_keys(data, path, known, out, unknown=unknown):
        if top and name in _OUTPUT_ONLY:
            continue
        converted = _field(descriptor.fields_by_name[name], given.value, given.path, out)
        if converted is not None:
            result[name] = converted
    return result


def _field(field: FieldDescriptor, value: Any, path: str, out: list[FieldViolation]) -> Any:
    """One field's value as proto JSON; None (and a violation) when it cannot be."""
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        if not isinstance(value, Mapping):
            out.append(FieldViolation(path, f"must be a mapping, got {kind(value)}"))
            return None
        value_field = entry.fields_by_name["value"]
        result: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                out.append(FieldViolation(path, f"has a key that is not a string: {key!r}"))
                continue
            converted = _single(value_field, item, join(path, key), out)
            if converted is not None:
                result[key] = converted
        return result
    if field.is_repeated:
        if field.message_type is registry_pb2.VersionSplit.DESCRIPTOR and isinstance(
            value, Mapping
        ):
            return _split_mapping(value, path, out)
        listed = as_list(value, path, out)
        if listed is None:
            return None
        items = [_single(field, item, f"{path}[{i}]", out) for i, item in enumerate(listed)]
        return [item for item in items if item is not None]
    return _single(field, value, path, out)


def _split_mapping(value: Mapping[Any, Any], path: str, out: list[FieldViolation]) -> list[Any]:
    """``{v1: 90, v2: 10}`` as the proto JSON of repeated VersionSplit."""
    weight_field = registry_pb2.VersionSplit.DESCRIPTOR.fields_by_name["weight"]
    result = []
    for version, weight in value.items():
        if not isinstance(version, str):
            # YAML reads 1.10 as the number 1.1: only a quoted version is exact.
            out.append(
                FieldViolation(
                    path, f"version {version!r} must be a string: quote it ('{version}': ...)"
                )
            )
            continue
        converted = _single(weight_field, weight, join(path, version), out)
        if converted is not None:
            result.append({"version": version, "weight": converted})
    return result


def _single(field: FieldDescriptor, value: Any, path: str, out: list[FieldViolation]) -> Any:
    """One (non-map, non-list) value of ``field`` as proto JSON; None when it cannot be."""
    message_type = field.message_type
    if message_type is not None:
        if message_type is duration_pb2.Duration.DESCRIPTOR:
            return _duration_json(value, path, out)
        if not isinstance(value, Mapping):
            out.append(FieldViolation(path, f"must be a mapping, got {kind(value)}"))
            return None
        return _message(value, message_type, path, out)
    if field.enum_type is not None:
        return _enum_name(field.enum_type, value, path, out)
    cpp_type = field.cpp_type
    if cpp_type == FieldDescriptor.CPPTYPE_STRING:
        text = as_string(value, path, out)
        if text is not None and field.full_name == "flext_mesh.v1.RetryPolicy.retryable_codes":
            return text.strip().upper()  # status code names, e.g. UNAVAILABLE
        return text
    if cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return as_bool(value, path, out)
    if cpp_type in _INT_RANGES:
        low, high = _INT_RANGES[cpp_type]
        return as_whole_number(value, path, out, low=low, high=high)
    if cpp_type in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        return as_number(value, path, out)
    return value  # bytes: none in ServicePolicy; ParseDict judges


def _enum_name(
    enum: EnumDescriptor, value: Any, path: str, out: list[FieldViolation]
) -> str | None:
    """``least_response_time``, ``LEAST-RESPONSE-TIME`` or the full name, as the full name."""
    prefix = enum_prefix(enum)
    if isinstance(value, int) and not isinstance(value, bool):
        found = enum.values_by_number.get(value)
        if found is not None:
            return found.name
    elif isinstance(value, str):
        name = value.strip().upper().replace("-", "_")
        for candidate in (name, prefix + name):
            if candidate in enum.values_by_name:
                return candidate
    choices = [
        v.name.removeprefix(prefix).lower()
        for v in enum.values
        if not v.name.endswith("_UNSPECIFIED")
    ]
    out.append(FieldViolation(path, f"{value!r} is not one of {', '.join(choices)}"))
    return None


def _duration_json(value: Any, path: str, out: list[FieldViolation]) -> str | None:
    """A duration as its proto-JSON string (``"0.500s"``); None with a violation."""
    nanos = as_duration_nanos(value, path, out)
    if nanos is None:
        return None
    if nanos < 0:
        out.append(FieldViolation(path, "must not be negative"))
        return None
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(nanos)
    return duration.ToJsonString()


# -- the split argument --------------------------------------------------------------------


def _split_weight(value: str) -> tuple[str, int]:
    """``v1=90`` as ``("v1", 90)`` (argparse type)."""
    match = _SPLIT_ARG.fullmatch(value.strip())
    if match is None or int(match["weight"]) > 100:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not VERSION=WEIGHT with a whole percent 0 to 100, e.g. v1=90"
        )
    return match["version"], int(match["weight"])


def parse_split(weights: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """Check a split given as (version, weight) pairs: distinct versions, summing to 100.

    An empty split (no pairs) is allowed: it means "no split". ValueError otherwise.
    """
    seen: set[str] = set()
    for version, _ in weights:
        if version in seen:
            raise ValueError(f"version {version!r} is given twice")
        seen.add(version)
    total = sum(weight for _, weight in weights)
    if weights and total != 100:
        raise ValueError(f"the weights sum to {total}, not 100: {format_split(weights)}")
    return list(weights)


# -- showing a policy ----------------------------------------------------------------------


def describe_policy(policy: registry_pb2.ServicePolicy) -> str:
    """A policy for people: one line per setting, ``not set`` for the sidecars' defaults."""
    zone = policy.zone
    if not policy.HasField("zone"):
        zone_text = _NOT_SET
    elif zone.enabled:
        zone_text = "on" + (
            f", min_healthy_percent={_number(zone.min_healthy_percent)}"
            if zone.HasField("min_healthy_percent")
            else ""
        )
    else:
        zone_text = "off"
    timeouts = " ".join(
        f"{operation}={format_duration(policy.operation_timeouts[operation].ToNanoseconds())}"
        for operation in sorted(policy.operation_timeouts)
    )
    settings = [
        ("updated", f"{format_date_time(policy.update_time)} (revision {policy.revision})"),
        ("strategy", _enum_text(registry_pb2.LoadBalancingStrategy.DESCRIPTOR, policy.strategy)),
        (
            "default timeout",
            format_duration(policy.default_timeout.ToNanoseconds())
            if policy.HasField("default_timeout")
            else _NOT_SET,
        ),
        ("operation timeouts", timeouts or _NOT_SET),
        ("retry", _settings(policy.retry if policy.HasField("retry") else None)),
        (
            "circuit breaker",
            _settings(policy.circuit_breaker if policy.HasField("circuit_breaker") else None),
        ),
        (
            "outlier detection",
            _settings(policy.outlier_detection if policy.HasField("outlier_detection") else None),
        ),
        (
            "health check",
            _settings(policy.health_check if policy.HasField("health_check") else None),
        ),
        (
            "panic threshold",
            f"{_number(policy.panic_threshold_percent)}%"
            if policy.HasField("panic_threshold_percent")
            else _NOT_SET,
        ),
        ("split", format_split((s.version, s.weight) for s in policy.splits) or _NOT_SET),
        ("zone preference", zone_text),
    ]
    width = max(len(label) for label, _ in settings) + 2
    lines = [f"{policy.service_name}: policy version {policy.version}"]
    lines.extend(f"{(label + ':').ljust(width)} {text}" for label, text in settings)
    return "\n".join(lines) + "\n"


def policy_to_dict(policy: registry_pb2.ServicePolicy) -> dict[str, Any]:
    """A policy as ``-o json`` prints it: every field of the policy itself, and within
    its settings (retry, circuit_breaker, outlier_detection, health_check, zone) only
    the fields that are set. Those settings read 0 as "the default" (a
    ``backoff_multiplier`` of 0 means 2.0), so printing the zeros would show defaults
    as if they were set to 0; ``optional`` fields set to 0 (``jitter: 0.0``) are kept."""
    document = message_to_dict(policy)
    for name, setting in (
        ("retry", policy.retry if policy.HasField("retry") else None),
        ("circuit_breaker", policy.circuit_breaker if policy.HasField("circuit_breaker") else None),
        (
            "outlier_detection",
            policy.outlier_detection if policy.HasField("outlier_detection") else None,
        ),
        ("health_check", policy.health_check if policy.HasField("health_check") else None),
        ("zone", policy.zone if policy.HasField("zone") else None),
    ):
        if setting is not None:
            document[name] = json_format.MessageToDict(setting, preserving_proto_field_name=True)
    return document


def format_split(weights: Iterable[tuple[str, int]]) -> str:
    """``v1=90 v2=10`` from (version, weight) pairs."""
    return " ".join(f"{version}={weight}" for version, weight in weights)


def _settings(message: Message | None) -> str:
    """The fields set in a sub-message, as ``key=value`` in field order; None: not set."""
    if message is None:
        return _NOT_SET
    parts = [f"{field.name}={_value_text(field, value)}" for field, value in message.ListFields()]
    return " ".join(parts) or "set, every field at its default"


def _value_text(field: FieldDescriptor, value: Any) -> str:
    if field.is_repeated:
        return ",".join(_value_text_one(field, item) for item in value)
    return _value_text_one(field, value)


def _value_text_one(field: FieldDescriptor, value: Any) -> str:
    if isinstance(value, duration_pb2.Duration):
        return format_duration(value.ToNanoseconds())
    if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        return _enum_text(field.enum_type, value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _number(value)
    return str(value)


def _enum_text(enum: EnumDescriptor | None, value: int) -> str:
    """An enum value as a policy file may write it (``least_response_time``)."""
    found = enum.values_by_number.get(value) if enum is not None else None
    if enum is None or found is None:  # a value newer than this CLI
        return str(value)
    if found.number == 0:
        return _NOT_SET
    return found.name.removeprefix(enum_prefix(enum)).lower()


def _number(value: float) -> str:
    return f"{value:g}"


# -- helpers -------------------------------------------------------------------------------


def _hint(key: str, names: Sequence[str]) -> str:
    found = closest(key, names)
    if found:
        return f" (did you mean {found!r}?)"
    return f" (known fields: {', '.join(names)})"
