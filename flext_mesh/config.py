"""Configuration of the control plane, from flags and ``FLEXT_MESH_*`` variables.

Precedence: a command-line flag, then the environment variable, then the default
documented on each field. Every address, interval and limit lives here.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_LISTEN", "ServerConfig", "parse_host_port"]

DEFAULT_LISTEN = "127.0.0.1:50051"
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})$")

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def parse_host_port(value: str, *, allow_zero: bool = True) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 in brackets); ValueError naming the problem otherwise."""
    match = _HOST_PORT.match(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:50051 or [::1]:50051)")
    port = int(match["port"])
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} in {value!r} is outside {low}..65535")
    return match["host"], port


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
    node_name: str = Field(
        "",
        max_length=128,
        description="This replica's name, recorded as the owner of executions (default host:pid).",
    )

    @field_validator("listen", "http_listen")
    @classmethod
    def _check_address(cls, value: str) -> str:
        parse_host_port(value)
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
