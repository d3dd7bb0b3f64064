"""What the state keeps of a live sandbox."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SandboxRecord:
    sandbox_id: str
    template_id: str
    alias: str | None
    client_id: str
    envd_token: str
    started_at: float
    end_at: float
    state: str  # running | paused | killing (a kill began: never re-adopted after a crash)
    team: str = "default"  # the team of the API key that made it (core/teams.py): no other team's key sees it
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    cpu_count: int = 1
    memory_mb: int = 512
    disk_mb: int = 0
    auto_pause: bool = False
    auto_pause_memory: bool = True  # its auto-pause keeps its memory (False: to its files)
    idle_timeout: int = 0  # s without a request or CPU use, then paused (autoPause) or killed; 0: none
    default_user: str = "user"
    default_workdir: str = "/home/user"
    handle: dict = field(default_factory=dict)  # the runtime's SandboxHandle, as JSON
    network: dict = field(default_factory=dict)  # its network policy (network/policy.py, NetworkPolicy.to_json)
    allow_internet_access: bool = True
    traffic_token: str | None = None  # set when its ports are not public (network.allowPublicTraffic: false)
    mask_request_host: str | None = None  # the Host its services see (${PORT} replaced)
    auto_resume: bool = False  # a request to one of its ports resumes it when paused
    iam_tokens: dict = field(default_factory=dict)  # workload identity: {name: {audience, tokenType}}
    layers: list = field(default_factory=list)  # its root filesystem's layers (paths, topmost first)
    # while paused: "full" (its processes frozen, in memory) or "filesystem" (stopped, files kept)
    pause_mode: str = ""
    volume_mounts: list = field(default_factory=list)  # [{name, path, volumeID}]: mounted at create
    # written to disk by the server's shutdown (--pause-on-exit) while it ran: the next start resumes it, with
    # this many seconds to live (what it had left)
    resume_at_start: int = 0
