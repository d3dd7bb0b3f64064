"""Request bodies of the control plane, validated with pydantic; unknown fields are accepted and ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class NewSandbox(_Body):
    template_id: str = Field(alias="templateID", min_length=1)
    timeout: int | None = Field(default=None, ge=0)
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = Field(default=None, alias="envVars")
    auto_pause: bool = Field(default=False, alias="autoPause")
    # Not in E2B's API (it reports diskSizeMB, does not take it): this server's own disk per create.
    disk_mb: int | None = Field(default=None, alias="diskSizeMB")
    secure: bool = True
    allow_internet_access: bool | None = None


class TimeoutBody(_Body):
    timeout: int = Field(ge=0)


class ConnectBody(_Body):
    timeout: int | None = Field(default=None, ge=0)
