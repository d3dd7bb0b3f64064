"""What a template build does: E2B's build request (a base, ordered steps, start and ready commands),
checked, and the state that steps change as a build goes (environment, user, working directory).

The official SDKs send five step types; every builder method (`apt_install`, `pip_install`,
`git_clone`, `make_dir`, ...) arrives as a RUN with its command, and the user as an optional
second argument:

    {"type": "RUN",     "args": [command, user?],          "force": bool}
    {"type": "COPY",    "args": [src, dest, user, mode],   "force": bool, "filesHash": sha256}
    {"type": "ENV",     "args": [k1, v1, k2, v2, ...]}
    {"type": "WORKDIR", "args": [path]}
    {"type": "USER",    "args": [name]}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

MAX_STEPS = 500
MAX_ARG = 256 * 1024
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$|^[0-9]{1,10}$")
DEFAULT_IMAGE = "e2bdev/base"


class RecipeError(ValueError):
    """The build request is not one sandboxd can build (says which step and why)."""


@dataclass(frozen=True)
class Step:
    type: str
    args: tuple[str, ...]
    force: bool = False
    files_hash: str | None = None

    def describe(self) -> str:
        if self.type == "RUN":
            return f"RUN {self.args[0]}" + (f"  (as {self.args[1]})" if len(self.args) > 1 and self.args[1] else "")
        if self.type == "COPY":
            return f"COPY {self.args[0]} {self.args[1]}"
        if self.type == "ENV":
            return "ENV " + " ".join(f"{k}={v}" for k, v in zip(self.args[::2], self.args[1::2], strict=False))
        return f"{self.type} {' '.join(self.args)}"


@dataclass(frozen=True)
class Recipe:
    from_image: str | None
    from_template: str | None
    force: bool
    steps: tuple[Step, ...]
    start_cmd: str = ""
    ready_cmd: str = ""
    # sandboxd's own (`probeCmd`, `probeTimeout`): run in each sandbox of the template now and then, its health
    # (core/health.py); "" inherits the base template's
    probe_cmd: str = ""
    probe_timeout: float = 0.0
    label: str = ""  # sandboxd's own: the digest of a built-in recipe (templates/builtin.py), kept with the build
    # sandboxd's own, for built-in templates only: a service every sandbox of the template runs (argv)
    service: tuple[str, ...] = ()

    @property
    def base(self) -> str:
        return f"template {self.from_template}" if self.from_template else f"image {self.from_image or DEFAULT_IMAGE}"


def _check_user(user: str, where: str) -> str:
    if user and not USER_RE.match(user):
        raise RecipeError(f"{where}: '{user[:64]}' is not a user name")
    return user


def parse_step(i: int, raw: Any) -> Step:
    where = f"step {i}"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: must be an object")
    kind = raw.get("type")
    args = raw.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args) or len(args) > 10_000:
        raise RecipeError(f"{where}: args must be a list of strings")
    if sum(len(a) for a in args) > MAX_ARG:
        raise RecipeError(f"{where}: args are over {MAX_ARG} bytes")
    if any("\0" in a for a in args):
        raise RecipeError(f"{where}: args may not hold NUL characters")
    force = bool(raw.get("force", False))
    files_hash = raw.get("filesHash")
    if kind == "RUN":
        if not 1 <= len(args) <= 2 or not args[0].strip():
            raise RecipeError(f"{where}: RUN takes a command and an optional user")
        _check_user(args[1] if len(args) > 1 else "", where)
    elif kind == "COPY":
        if not 2 <= len(args) <= 4:
            raise RecipeError(f"{where}: COPY takes src, dest, user and mode")
        args = [*args, "", ""][:4]
        if not isinstance(files_hash, str) or not HASH_RE.match(files_hash):
            raise RecipeError(f"{where}: COPY needs filesHash (the sha256 the SDK computed)")
        if not args[1].startswith("/"):
            raise RecipeError(f"{where}: COPY destination '{args[1][:200]}' must be an absolute path")
        _check_user(args[2], where)
        if args[3] and not re.match(r"^0?[0-7]{3,4}$", args[3]):
            raise RecipeError(f"{where}: COPY mode '{args[3][:20]}' is not an octal mode")
    elif kind == "ENV":
        if len(args) % 2 or not args:
            raise RecipeError(f"{where}: ENV takes name/value pairs")
        for name in args[::2]:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise RecipeError(f"{where}: '{name[:64]}' is not an environment variable name")
    elif kind == "WORKDIR":
        if len(args) != 1 or not args[0].startswith("/"):
            raise RecipeError(f"{where}: WORKDIR takes one absolute path")
    elif kind == "USER":
        if len(args) != 1 or not args[0]:
            raise RecipeError(f"{where}: USER takes one user name")
        _check_user(args[0], where)
    else:
        raise RecipeError(f"{where}: unknown step type {str(kind)[:32]!r} (RUN, COPY, ENV, WORKDIR or USER)")
    return Step(type=kind, args=tuple(args), force=force, files_hash=files_hash if kind == "COPY" else None)


def parse_recipe(body: dict[str, Any]) -> Recipe:
    steps = body.get("steps") or []
    if not isinstance(steps, list):
        raise RecipeError("steps must be a list")
    if len(steps) > MAX_STEPS:
        raise RecipeError(f"a template has at most {MAX_STEPS} steps ({len(steps)} given)")
    from_image, from_template = body.get("fromImage"), body.get("fromTemplate")
    for name, value in (("fromImage", from_image), ("fromTemplate", from_template)):
        if value is not None and (not isinstance(value, str) or not value or len(value) > 512):
            raise RecipeError(f"{name} must be a non-empty string")
    if from_image and from_template:
        raise RecipeError("give fromImage or fromTemplate, not both")
    start, ready = body.get("startCmd") or "", body.get("readyCmd") or ""
    probe, probe_timeout = body.get("probeCmd") or "", body.get("probeTimeout", 0)
    for name, value in (("startCmd", start), ("readyCmd", ready), ("probeCmd", probe)):
        if not isinstance(value, str) or len(value) > MAX_ARG or "\0" in value:
            raise RecipeError(f"{name} must be a string")
    if not isinstance(probe_timeout, int | float) or isinstance(probe_timeout, bool) or not 0 <= probe_timeout <= 60:
        raise RecipeError("probeTimeout must be a number of seconds from 0 (the default, 5) to 60")
    service = body.get("service") or []
    if not isinstance(service, list) or not all(isinstance(a, str) and a for a in service) or len(service) > 64:
        raise RecipeError("service must be a list of strings (a command line)")
    if sum(len(a) for a in service) > MAX_ARG or any("\0" in a for a in service):
        raise RecipeError("service is too long or holds NUL characters")
    return Recipe(
        from_image=from_image,
        from_template=from_template,
        force=bool(body.get("force", False)),
        steps=tuple(parse_step(i, raw) for i, raw in enumerate(steps, 1)),
        start_cmd=start,
        ready_cmd=ready,
        probe_cmd=probe,
        probe_timeout=float(probe_timeout),
        label=str(body.get("recipe") or "")[:64],
        service=tuple(service),
    )


@dataclass
class BuildState:
    """What the steps so far have set: it shapes the next step and is the template's config at the end."""

    user: str = "user"
    workdir: str = "/home/user"
    env: dict[str, str] = field(default_factory=dict)
    # what a template built on another keeps of it unless the build says otherwise: its service (the code
    # interpreter's), start and ready commands, memory and CPUs. Not part of any step's result.
    inherited: dict[str, Any] = field(default_factory=dict)

    def key(self) -> dict[str, Any]:
        return {"user": self.user, "workdir": self.workdir, "env": dict(sorted(self.env.items()))}
