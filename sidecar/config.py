"""Settings of ``flext-sidecar``, from flags and ``FLEXT_MESH_*`` variables."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from flext_mesh.addresses import DEFAULT_LISTEN, parse_host_port, split_addresses
from flext_mesh.logs import LogFormat
from flext_mesh.names import MAX_WEIGHT

__all__ = ["SidecarConfig"]


class SidecarConfig(BaseSettings):
    """Settings of one sidecar; each also read from ``FLEXT_MESH_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="FLEXT_MESH_", frozen=True, extra="ignore", populate_by_name=True
    )

    service: str = Field(description="Service name the processors are registered under.")
    app: str = Field(
        description="MODULE:ATTR naming a mapping of operation to ServiceProcessor, or a "
        "callable returning one."
    )
    app_dir: str = Field(
        ".",
        description="Directory --app is imported from, put first on the import path (as "
        "uvicorn's --app-dir); default: the current directory.",
    )
    listen: str = Field("127.0.0.1:0", description="Where ProcessorService is served.")
    advertise: str = Field(
        "", description="Endpoint registered for callers (default: the bound listen address)."
    )
    control_plane: str = Field(
        DEFAULT_LISTEN,
        description="Control plane gRPC address, or several replicas' as HOST:PORT,HOST:PORT.",
    )
    instance_id: str = Field("", description="Instance id (default: SERVICE-HOST-PORT).")
    version: str = Field("", description="Version registered (for traffic splits).")
    weight: int = Field(100, ge=1, le=MAX_WEIGHT, description="Base weight for balancing.")
    zone: str = Field(
        "",
        description="Zone registered, and the caller zone of outbound calls (for zone preference).",
    )
    type: str = Field("", description="Service type registered.")
    # NoDecode: FLEXT_MESH_LABEL is "k=v,k2=v2", not JSON.
    label: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Labels as KEY=VALUE, repeatable."
    )
    ttl: float = Field(10.0, ge=1.0, le=3600.0, description="Lease TTL, seconds.")
    grace_period: float = Field(
        10.0, ge=0.0, le=600.0, description="Seconds in-flight calls get to finish on SIGTERM."
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_format: LogFormat = Field(
        "text", description="text (one line per event) or json (one object per line)."
    )
    metrics_listen: str = Field(
        "",
        description=(
            "HOST:PORT serving the sidecar's own Prometheus /metrics (plaintext HTTP); unset: none."
        ),
    )
    switch_interval_ms: float = Field(
        0.25,
        ge=0.05,
        le=100.0,
        description=(
            "Python's thread switch interval (sys.setswitchinterval), ms: how long the loop "
            "or a sync processor may keep gRPC's poller thread waiting for the GIL."
        ),
    )

    # Transport security: the same names and meaning as the control plane's (see
    # flext_mesh.rpc.channels). The certificate is served to callers and shown to
    # the control plane and to other sidecars when they ask (mTLS).
    tls_cert: str = Field(
        "", description="PEM certificate (chain) served, and shown to peers called with mTLS."
    )
    tls_key: str = Field("", description="PEM private key of --tls-cert.")
    tls_ca: str = Field(
        "",
        description=(
            "PEM CA bundle trusted: TLS to the control plane and other sidecars when set, "
            "and verifies client certificates with --tls-client-auth require."
        ),
    )
    tls_client_auth: Literal["none", "optional", "require"] = Field(
        "none", description="Client certificates: none or require (mTLS; needs --tls-ca)."
    )
    tls_server_name: str = Field(
        "",
        description="Name the control plane's certificate must carry, instead of its host.",
    )
    token: str = Field(
        "", description="Bearer token sent on every call to the control plane and sidecars."
    )
    insecure: bool = Field(
        False, description="Allow serving plaintext on a non-loopback --listen address."
    )
    quick_sync_on_loop: bool = Field(
        False,
        description=(
            "Run a sync processor on the event loop once its runs are measured quick (32 "
            "in a row under 0.25 ms of CPU, none waiting), sparing two thread hand-overs "
            "per call; back to the thread pool after a run there that takes over 0.5 ms "
            "of CPU or stalls, which holds the loop meanwhile. Off: every sync processor "
            "runs in the pool. A processor's run_on_loop attribute overrides both."
        ),
    )
    shared_idempotency: bool = Field(
        False,
        description=(
            "Send the result of a workflow step whose caller went away to the control "
            "plane, so a resend after this instance is gone is settled from it instead of "
            "running again elsewhere."
        ),
    )

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_host_port(value)
        return value

    @field_validator("control_plane")
    @classmethod
    def _addresses(cls, value: str) -> str:
        split_addresses(value)
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_address(cls, value: str) -> str:
        if value:  # checked before anything starts: a typo is one line, not a traceback
            parse_host_port(value)
        return value

    @field_validator("advertise")
    @classmethod
    def _advertise(cls, value: str) -> str:
        if value:
            parse_host_port(value, allow_zero=False)
        return value

    @field_validator("label", mode="before")
    @classmethod
    def _labels(cls, value: object) -> object:
        if isinstance(value, str):  # from FLEXT_MESH_LABEL: comma separated
            value = tuple(item for item in value.split(",") if item)
        for item in value or ():  # type: ignore[attr-defined]
            if "=" not in item or not item.split("=", 1)[0]:
                raise ValueError(f"{item!r} is not KEY=VALUE")
        return value

    def labels(self) -> dict[str, str]:
        """The labels as a mapping."""
        return dict(item.split("=", 1) for item in self.label)
