"""The built-in templates: `base`, `code-interpreter-v1` and `httpbin`. All are made with the template
builder, exactly as users' templates are: `sandboxd template build NAME` sends each one's build request
(E2B's JSON, as the SDKs send it) to a server of its own that it starts for the build, with networking
(apt fetches Debian's packages inside the build's sandboxes). Python packages are installed on the host
with pip (`pip install --target`, cached) and copied in: a sandbox may not trust the host's package
index (a mirror with a CA of its own), and the host's pip is there anyway.

`base` and `code-interpreter-v1` keep their names as template IDs (E2B's SDKs and older sandboxd
installs know them by those); a client of the API cannot rebuild, retag or delete a built-in template.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

SITE_DIR = "/opt/sandboxd/site"  # the code interpreter's Python packages (on PYTHONPATH of its service)
CODE_DIR = "/opt/sandboxd/code"  # sandboxd's in-sandbox code, mounted read-only at sandbox start

# Bump when how built-in templates are made changes in a way their recipes do not show (the builder's
# commands, how the host's pip fills the packages' directory).
RECIPE_VERSION = 2

APT_CLEAN = "apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin"


def apt_install(*packages: str) -> str:
    return (
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
        "-o Dpkg::Use-Pty=0 " + " ".join(packages) + " && " + APT_CLEAN  # no progress meters in the build's log
    )


def python_is(version: str) -> str:
    """A command that fails, saying why, unless the template's python3 is `version` (packages installed with
    the host's pip are built for the host's Python)."""
    return (
        f'test "$(python3 -c \'import sys; print(*sys.version_info[:2], sep=".")\')" = {version} || '
        f"{{ echo \"the template's python3 is not {version}, the Python of the host's pip that installs its "
        "packages: run `sandboxd template build` with the Python of the template's Debian release "
        '(scripts/setup.sh uses /usr/bin/python3)"; exit 1; }'
    )


BASE_PACKAGES = (
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
)

USER_SETUP = " && ".join(
    (
        # sudo as on E2B: no password, and the command's environment stays visible (`sudo env`)
        "printf 'Defaults !env_reset\\nuser ALL=(ALL:ALL) NOPASSWD: ALL\\n' > /etc/sudoers.d/user",
        "chmod 0440 /etc/sudoers.d/user",
        "mkdir -p /code && chown user:user /code",
        # `pip install X` works as on E2B (as `user` it installs to ~/.local): no PEP 668 marker
        "rm -f /usr/lib/python3*/EXTERNALLY-MANAGED",
        "rm -f /usr/sbin/policy-rc.d",
    )
)

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"

RECIPES: dict[str, dict[str, Any]] = {
    "base": {
        "description": "Debian bookworm with bash, coreutils, python3, nodejs, git, curl and build tools",
        "from_image": "debian:bookworm",
        "run": [apt_install(*BASE_PACKAGES) + " && " + USER_SETUP],
    },
    "code-interpreter-v1": {
        "description": "base + Jupyter kernels (Python with the data stack, bash, JavaScript/TypeScript via "
        "Deno, R, Java) and the code interpreter server on port 49999",
        "from_template": "base",
        # the JDK's postinst links its man pages into a directory a minimal Debian leaves out
        "run": [
            python_is(PY)
            + f" && mkdir -p /usr/share/man/man1 {CODE_DIR} && "
            + apt_install("fonts-dejavu-core", "r-base-core", "r-cran-irkernel", "default-jdk-headless")
        ],
        "pip": [
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
        ],
        "pip_target": SITE_DIR,
        "service": ["/usr/bin/python3", "-m", "sandboxd_interpreter.server"],
        "memory_mb": 1024,  # its server and three warm kernels use ~250 MiB before any user code runs
    },
    # An HTTP echo service (PyPI's httpbin, under gunicorn) on port 80, started by its start command.
    "httpbin": {
        "description": "PyPI's httpbin under gunicorn on port 80",
        "from_template": "base",
        "run": [python_is(PY)],
        "pip": ["httpbin==0.10.4", "gunicorn==27.0.1"],
        "pip_target": f"/usr/local/lib/python{PY}/dist-packages",
        "start_cmd": "python3 -m gunicorn --bind 0.0.0.0:80 --workers 2 --access-logfile - httpbin:app",
        "ready_cmd": '[ -n "$(ss -Htln sport = :80)" ]',
        "cpu_count": 1,
        "memory_mb": 512,
    },
}

FIXED_IDS = ("base", "code-interpreter-v1")  # template ID = name


def recipe_digest(recipe: dict[str, Any], parent: str = "") -> str:
    """What a built-in template's build depends on: its recipe, the build of the template it is built on,
    and how recipes are made."""
    body = json.dumps({"recipe": recipe, "parent": parent, "version": RECIPE_VERSION}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def names() -> list[str]:
    return list(RECIPES)
