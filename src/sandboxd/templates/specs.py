"""The built-in template definitions. A spec's hash decides whether a cached build is still valid."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

# Bump when the build procedure itself changes in a way that changes the result.
BUILDER_VERSION = 1

# Sandbox uid/gid 0..RANGE-1 are host uid/gid SHIFT..SHIFT+RANGE-1 (user namespace mapping).
UID_SHIFT = 100000
UID_RANGE = 65536


RUNTIME_ONLY = ("memory_mb", "disk_mb")


@dataclass(frozen=True)
class TemplateSpec:
    name: str
    suite: str = "bookworm"
    packages: tuple[str, ...] = ()
    # Shell commands run in a chroot of the new root filesystem after the packages are installed.
    steps: tuple[str, ...] = ()
    # Python packages installed with the host's pip into <rootfs>/opt/sandboxd/site (the template's
    # python3 is the host venv's interpreter version: checked at build time). No network in the chroot.
    pip: tuple[str, ...] = ()
    # A service started in every sandbox of this template (argv, run as `service_user`).
    service: tuple[str, ...] = ()
    service_user: str = "user"
    parent: str | None = None
    default_user: str = "user"
    default_workdir: str = "/home/user"
    description: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    # Runtime defaults: they do not change the built root filesystem, so they are not in the digest.
    memory_mb: int | None = None
    disk_mb: int | None = None  # the sandbox's own disk (runtime/quota.py); None: the server's default

    def digest(self) -> str:
        spec = {k: v for k, v in asdict(self).items() if k not in RUNTIME_ONLY}
        body = json.dumps({"spec": spec, "builder": BUILDER_VERSION, "shift": [UID_SHIFT, UID_RANGE]}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]


_USER_SETUP = (
    "useradd --create-home --uid 1000 --user-group --shell /bin/bash user",
    # sudo as on E2B: no password, and the command's environment stays visible (`sudo env`)
    "printf 'Defaults !env_reset\\nuser ALL=(ALL:ALL) NOPASSWD: ALL\\n' > /etc/sudoers.d/user "
    "&& chmod 0440 /etc/sudoers.d/user",
    "mkdir -p /code && chown user:user /code",
    # `pip install X` works as on E2B (as `user` it installs to ~/.local): no PEP 668 marker.
    "rm -f /usr/lib/python3*/EXTERNALLY-MANAGED",
    # No daemons are started in a sandbox by package scripts.
    "rm -f /usr/sbin/policy-rc.d",
    "apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin",
)

BASE = TemplateSpec(
    name="base",
    description="Debian bookworm with bash, coreutils, python3, nodejs, git, curl and build tools",
    packages=(
        "bash",
        "coreutils",
        "procps",
        "sudo",
        "passwd",
        "python3",
        "python-is-python3",  # `python`, as on E2B's base
        "python3-pip",  # `pip`, `pip3`
        "python3-venv",
        "nodejs",
        "npm",
        "git",
        "curl",
        "wget",
        "jq",
        "vim-tiny",
        "ca-certificates",
        "build-essential",
        "less",
        "nano",
        "file",
        "iproute2",
        "iputils-ping",
        "netbase",
        "locales-all",
        "tzdata",
        "unzip",
        "xz-utils",
        "zip",
    ),
    steps=_USER_SETUP,
)

SITE_DIR = "/opt/sandboxd/site"  # the template's extra Python packages (on PYTHONPATH of its service)
CODE_DIR = "/opt/sandboxd/code"  # sandboxd's in-sandbox code, copied read-only at sandbox start

CODE_INTERPRETER = replace(
    BASE,
    name="code-interpreter-v1",
    description="base + Jupyter kernels (Python with the data stack, bash, JavaScript/TypeScript via Deno, R, "
    "Java) and the code interpreter server on port 49999",
    packages=(*BASE.packages, "fonts-dejavu-core", "r-base-core", "r-cran-irkernel"),
    pip=(
        "ipykernel==7.4.0",
        "jupyter_client==8.10.0",
        "numpy",
        "pandas",
        "matplotlib",
        "plotly",
        "pillow",
        "requests",
        "scipy",
        "seaborn",
        "openpyxl",
        "sympy",
        "e2b-charts==1.0.0",
        "orjson",
        "bash_kernel==0.10.0",
        "deno==2.9.8",
        "starlette",
        "uvicorn",
        "httptools",  # uvicorn's fast HTTP parser: less per run_code
        "uvloop",  # not used by the interpreter (see its server.py), available to users' own servers
    ),
    steps=(
        *BASE.steps,
        # The JDK (for the Java kernel) in a step, where /proc is mounted: its postinst needs it, and the
        # man directory minbase leaves out (update-alternatives links the JDK's man pages there)
        "mkdir -p /usr/share/man/man1 && apt-get update -qq && "
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
        "default-jdk-headless && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin",
        f"mkdir -p {CODE_DIR}",
    ),
    service=("/usr/bin/python3", "-m", "sandboxd_interpreter.server"),
    memory_mb=1024,  # its server and three warm kernels use ~250 MiB before any user code runs
)

BUILTIN: dict[str, TemplateSpec] = {BASE.name: BASE, CODE_INTERPRETER.name: CODE_INTERPRETER}
