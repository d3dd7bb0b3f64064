"""Request bodies of the control plane, validated with pydantic; unknown fields are accepted and ignored."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class NewSandbox(_Body):
    template_id: str = Field(alias="templateID", min_length=1)
    timeout: int | None = Field(default=None, ge=0)
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = Field(default=None, alias="envVars")
    auto_pause: bool = Field(default=False, alias="autoPause")
    auto_pause_memory: bool = Field(default=True, alias="autoPauseMemory")  # False: pause to its files
    # Not in E2B's API (it reports diskSizeMB, does not take it): this server's own disk per create.
    disk_mb: int | None = Field(default=None, alias="diskSizeMB")
    secure: bool = True
    allow_internet_access: bool | None = None
    network: dict[str, Any] | None = None  # checked by network/policy.py
    auto_resume: dict[str, Any] | None = Field(default=None, alias="autoResume")  # {"enabled": bool}
    iam: dict[str, Any] | None = None  # {"tokens": {name: {audience, tokenType}}} (core/workload_identity.py)
    volume_mounts: list[Any] | None = Field(default=None, alias="volumeMounts")  # checked by core/volume_mounts.py


class NetworkUpdate(_Body):
    """PUT /sandboxes/{id}/network: replaces the whole egress configuration."""

    allow_out: list[str] | None = Field(default=None, alias="allowOut")
    deny_out: list[str] | None = Field(default=None, alias="denyOut")
    dns_servers: list[str] | None = Field(default=None, alias="dnsServers")
    egress_proxy: dict[str, Any] | None = Field(default=None, alias="egressProxy")
    rules: dict[str, Any] | None = None
    allow_internet_access: bool | None = None

    def as_network(self) -> dict[str, Any]:
        """The update as create's `network` object (E2B's field names)."""
        return self.model_dump(by_alias=True, exclude_none=True, exclude={"allow_internet_access"})


class TimeoutBody(_Body):
    timeout: int = Field(ge=0)


class ConnectBody(_Body):
    timeout: int | None = Field(default=None, ge=0)
    memory: bool = True  # False (the SDK's on_resume="reboot"): boot again from its files


class SnapshotRequest(_Body):
    name: str | None = Field(default=None, min_length=1, max_length=256)
    memory: bool = True  # E2B's default: memory and files (core/snapshots.py)


class ForkRequest(_Body):
    timeout: int = Field(default=15, ge=1)  # E2B's defaults
    count: int = Field(default=1, ge=1, le=20)


class PoolLimitsBody(_Body):
    """PUT /pools/{template} (sandboxd's extension): the idle sandboxes its pool keeps, min to max."""

    min: int = Field(ge=0, le=1024, strict=True)
    max: int = Field(ge=0, le=1024, strict=True)


class PauseBody(_Body):
    memory: bool = True  # False (the SDK's mode="filesystem"): its processes end, its files stay
    # sandboxd's extension: written to disk (CRIU) before the answer, not after --checkpoint-after
    to_disk: bool = Field(default=False, alias="toDisk")
    require_healthy_guest: bool = Field(default=False, alias="requireHealthyGuest")


class NewSecret(_Body):
    name: str
    value: str
    metadata: dict[str, str] | None = None


class SecretUpdate(_Body):
    value: str
    metadata: dict[str, str] | None = None


class TemplateRequest(_Body):
    """POST /v3/templates: a new build of a template named `name` (`name:tag` tags it too)."""

    name: str | None = Field(default=None, min_length=1, max_length=256)
    alias: str | None = Field(default=None, min_length=1, max_length=256)
    tags: list[str] = Field(default_factory=list, max_length=64)
    cpu_count: int | None = Field(default=None, alias="cpuCount")
    memory_mb: int | None = Field(default=None, alias="memoryMB")


class BuildStart(_Body):
    """POST /v2/templates/{id}/builds/{buildID}: kept whole, checked by templates/recipe.py."""

    model_config = ConfigDict(extra="allow")


class TagAssign(_Body):
    target: str = Field(min_length=1, max_length=256)
    tags: list[str] = Field(min_length=1, max_length=64)


class TagRemove(_Body):
    name: str = Field(min_length=1, max_length=256)
    tags: list[str] = Field(min_length=1, max_length=64)
