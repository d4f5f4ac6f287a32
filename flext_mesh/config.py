"""Configuration of the control plane, from flags and ``FLEXT_MESH_*`` variables.

Precedence: a command-line flag, then the environment variable, then the default
documented on each field. Every address, interval and limit lives here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from flext_mesh.addresses import DEFAULT_LISTEN, parse_host_port
from flext_mesh.logs import LogFormat

__all__ = ["ServerConfig"]


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class ServerConfig(BaseSettings):
    """Settings of ``flext-mesh serve``; each also read from ``FLEXT_MESH_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="FLEXT_MESH_", frozen=True, extra="forbid")

    listen: str = Field(
        DEFAULT_LISTEN, description="gRPC listen address HOST:PORT; port 0 picks a free port."
    )
    http_listen: str = Field(
        "127.0.0.1:9464", description="HTTP listen address for /metrics (HOST:PORT)."
    )
    store: str = Field(
        "sqlite:///var/flext-mesh.db",
        description=(
            "State store URL: sqlite:///relative/path.db, sqlite:////absolute/path.db, "
            "or etcd://host:port[,host:port]."
        ),
    )
    log_level: LogLevel = Field("INFO", description="Lowest level of log lines printed.")
    log_format: LogFormat = Field(
        "text", description="text (one line per event) or json (one object per line)."
    )
    grace_period: float = Field(
        10.0, ge=0.0, le=600.0, description="Seconds in-flight RPCs get to finish on SIGTERM."
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024,
        ge=64 * 1024,
        le=64 * 1024 * 1024,
        description="Largest gRPC message accepted or sent, in bytes.",
    )

    default_ttl: float = Field(
        10.0, ge=1.0, le=3600.0, description="Lease TTL when Register sets none, seconds."
    )
    health_check_interval: float = Field(
        5.0, ge=0.1, le=300.0, description="Seconds between active checks of one instance."
    )
    health_check_timeout: float = Field(
        1.0, gt=0.0, le=60.0, description="Deadline of one active health check, seconds."
    )
    health_unhealthy_threshold: int = Field(
        3, ge=1, le=100, description="Consecutive failed checks before NOT_SERVING."
    )
    health_healthy_threshold: int = Field(
        2, ge=1, le=100, description="Consecutive passed checks before SERVING again."
    )
    panic_threshold_percent: float = Field(
        50.0,
        ge=0.0,
        le=100.0,
        description="Below this share of healthy instances Discover returns all (0: never).",
    )
    outlier_consecutive_failures: int = Field(
        5, ge=1, le=1000, description="Consecutive infrastructure failures that eject."
    )
    outlier_base_ejection_time: float = Field(
        30.0, ge=1.0, le=3600.0, description="Ejection time per time ejected, seconds."
    )
    outlier_max_ejection_time: float = Field(
        300.0, ge=1.0, le=86400.0, description="Cap of the ejection time, seconds."
    )
    outlier_max_ejection_percent: float = Field(
        10.0, ge=0.0, le=100.0, description="Most of a service ejected at once (>= 1 instance)."
    )

    metrics_retention: float = Field(
        86_400.0, ge=60.0, le=30 * 86_400.0, description="How long call metrics are kept, seconds."
    )
    metrics_max_series_per_service: int = Field(
        1_000,
        ge=1,
        le=1_000_000,
        description="Series (operation x instance x version) a service may have at most.",
    )
    business_error_alert_rate: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Share of a service's calls (0 to 1) that may end in business rejections "
            "(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...) before they lower its "
            "health score and raise the business_error_rate alert; 1 never. Infrastructure "
            "faults always count."
        ),
    )

    switch_interval_ms: float = Field(
        0.25,
        ge=0.05,
        le=100.0,
        description=(
            "Python's thread switch interval (sys.setswitchinterval), ms: how long a busy "
            "event loop may keep the store and gRPC threads waiting for the GIL."
        ),
    )
    execution_retention: float = Field(
        7 * 86_400.0,
        ge=60.0,
        le=365 * 86_400.0,
        description="How long ended workflow executions and their events are kept, seconds.",
    )
    step_resolve_timeout: float = Field(
        30.0,
        ge=1.0,
        le=3600.0,
        description=(
            "How long, seconds, a workflow waits for the instance that got a step attempt "
            "whose answer was lost (cancelled, timed out) to say what became of it before "
            "compensating; past it, a step with a compensation is compensated anyway."
        ),
    )
    node_name: str = Field(
        "",
        max_length=128,
        description="This replica's name, recorded as the owner of executions (default: host:pid).",
    )

    # Transport security (see SECURITY.md). The same names mean the same thing in the
    # control plane, the sidecar and the CLI: this process's certificate, the CA it
    # trusts, and the token it sends.
    tls_cert: str = Field(
        "", description="PEM certificate (chain) served, and shown to peers called with mTLS."
    )
    tls_key: str = Field("", description="PEM private key of --tls-cert.")
    tls_ca: str = Field(
        "",
        description=(
            "PEM CA bundle trusted: verifies client certificates (with --tls-client-auth) "
            "and the sidecars this process calls (TLS to them when set)."
        ),
    )
    tls_client_auth: Literal["none", "optional", "require"] = Field(
        "none",
        description="Client certificates: none or require (mTLS; needs --tls-ca).",
    )
    insecure: bool = Field(
        False,
        description=(
            "Allow plaintext or unauthenticated gRPC on a non-loopback address "
            "(refused without it)."
        ),
    )
    auth_tokens_file: str = Field(
        "",
        description=(
            "Tokens file (hashes and scopes, see `flext-mesh tokens`); turns on bearer-token "
            "authentication."
        ),
    )
    auth_open_services: Annotated[tuple[str, ...], NoDecode] = Field(
        (
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ),
        description="gRPC services answered without a token (comma separated).",
    )
    token: str = Field("", description="Bearer token sent on calls this process makes to sidecars.")

    # Limits per client (a client is its token's name, its certificate identity, or its
    # address without auth). 0 turns a rate limit off.
    rate_limit_writes: float = Field(
        1_000.0, ge=0.0, le=1e6, description="Registry and orchestrator writes per second."
    )
    rate_limit_writes_burst: int = Field(
        2_000, ge=1, le=10_000_000, description="Writes allowed at once above the rate."
    )
    rate_limit_reports: float = Field(
        100_000.0, ge=0.0, le=1e8, description="Call records reported per second."
    )
    rate_limit_reports_burst: int = Field(
        200_000, ge=1, le=100_000_000, description="Call records allowed at once above the rate."
    )
    max_instances_per_service: int = Field(
        1_000, ge=1, le=1_000_000, description="Instances one service may have registered."
    )
    # Without authentication every process on one host is one client (its address):
    # each sidecar holds a Watch, so the default leaves room for a busy host.
    max_watchers_per_client: int = Field(
        1_024, ge=1, le=100_000, description="Open Watch streams one client may hold."
    )

    @field_validator("listen", "http_listen")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @field_validator("auth_open_services", mode="before")
    @classmethod
    def _split_services(cls, value: object) -> object:
        if isinstance(value, str):  # from FLEXT_MESH_AUTH_OPEN_SERVICES or the flag
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        if not value.startswith(("sqlite:///", "etcd://")):
            raise ValueError(
                f"{value!r} is not a store URL: use sqlite:///path.db or etcd://host:port"
            )
        if value.startswith("sqlite:///") and len(value) == len("sqlite:///"):
            raise ValueError("sqlite:/// needs a file path, e.g. sqlite:///var/flext-mesh.db")
        return value
