"""Settings of ``flext-sidecar``, from flags and ``FLEXT_SIDECAR_*`` variables.

Each setting is a flag and a ``FLEXT_SIDECAR_<NAME>`` variable; a flag beats its
variable, which beats the default. The settings every process of the mesh shares
(:data:`SHARED`: where the control plane is, the zone, and the TLS files and token
this process uses as a client) are also read from ``FLEXT_MESH_<NAME>``, the
variables of ``flext-mesh``, its clients and ``MeshClient``, when their
``FLEXT_SIDECAR_<NAME>`` is not set. The sidecar's own settings are not: a
``FLEXT_MESH_LISTEN`` exported for ``flext-mesh serve`` must not move the sidecar onto
the control plane's port. :func:`ignored_variables` names those the sidecar used to
read, so that it can say they are ignored now.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from flext_mesh.addresses import DEFAULT_LISTEN, parse_host_port, split_addresses
from flext_mesh.logs import LogFormat
from flext_mesh.names import MAX_WEIGHT

__all__ = ["ENV_PREFIX", "SHARED", "SHARED_ENV_PREFIX", "SidecarConfig", "ignored_variables"]

#: Prefix of the sidecar's variables: ``FLEXT_SIDECAR_LISTEN`` for ``--listen``.
ENV_PREFIX = "FLEXT_SIDECAR_"
#: Prefix of the variables the whole mesh shares: ``FLEXT_MESH_CONTROL_PLANE``.
SHARED_ENV_PREFIX = "FLEXT_MESH_"
#: Settings also read from ``FLEXT_MESH_<NAME>`` (after ``FLEXT_SIDECAR_<NAME>``): the
#: same for every process of the mesh on a machine, as the CLI and ``MeshClient`` read them.
SHARED = frozenset(
    {"control_plane", "zone", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "token"}
)


class _SharedVariables(EnvSettingsSource):
    """``FLEXT_MESH_<NAME>`` for the :data:`SHARED` settings, and nothing else."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls, env_prefix=SHARED_ENV_PREFIX)

    def __call__(self) -> dict[str, Any]:
        return {name: value for name, value in super().__call__().items() if name in SHARED}


class SidecarConfig(BaseSettings):
    """Settings of one sidecar; each also read from ``FLEXT_SIDECAR_<NAME>``, the
    :data:`SHARED` ones then from ``FLEXT_MESH_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="ignore", populate_by_name=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (init), then FLEXT_SIDECAR_*, then FLEXT_MESH_* for the shared settings."""
        return (
            init_settings,
            env_settings,
            _SharedVariables(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )

    service: str = Field(description="Service name the processors are registered under.")
    app: str = Field(
        description="MODULE:ATTR naming a mapping of operation to ServiceProcessor, or a "
        "callable returning one."
    )
    app_dir: str = Field(
        ".",
        description="Directory --app is imported from, put first on the import path (as "
        "uvicorn's --app-dir) (default: the current directory).",
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
    # NoDecode: FLEXT_SIDECAR_LABEL is "k=v,k2=v2", not JSON.
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
            "HOST:PORT serving the sidecar's own Prometheus /metrics (plaintext HTTP) "
            "(default: none, no /metrics)."
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
        if isinstance(value, str):  # from FLEXT_SIDECAR_LABEL: comma separated
            value = tuple(item for item in value.split(",") if item)
        for item in value or ():  # type: ignore[attr-defined]
            if "=" not in item or not item.split("=", 1)[0]:
                raise ValueError(f"{item!r} is not KEY=VALUE")
        return value

    def labels(self) -> dict[str, str]:
        """The labels as a mapping."""
        return dict(item.split("=", 1) for item in self.label)


def ignored_variables(
    given: Collection[str] = (), environ: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """``(FLEXT_MESH_X, FLEXT_SIDECAR_X)`` for each of the sidecar's own settings set
    by the old, shared name only: earlier sidecars read it, this one ignores it.

    ``given`` are the settings given as flags, which beat either variable anyway.
    """
    env = os.environ if environ is None else environ
    ignored = []
    for name in SidecarConfig.model_fields:
        old, new = f"{SHARED_ENV_PREFIX}{name.upper()}", f"{ENV_PREFIX}{name.upper()}"
        if name not in SHARED and name not in given and old in env and new not in env:
            ignored.append((old, new))
    return ignored
