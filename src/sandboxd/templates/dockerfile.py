"""A Dockerfile as a template build: the instructions E2B's converter takes (FROM, RUN, COPY/ADD, ENV, ARG,
WORKDIR, USER; CMD/ENTRYPOINT become the start command) turned into E2B's build steps, with the same
prologue (USER root, WORKDIR /) and epilogue (USER user, WORKDIR /home/user when the file set none).
EXPOSE, VOLUME, LABEL, MAINTAINER, SHELL, HEALTHCHECK, STOPSIGNAL and ONBUILD have no meaning for a
sandbox and are skipped; multi-stage builds (`COPY --from`, a second FROM) are refused."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

IGNORED = {"EXPOSE", "VOLUME", "LABEL", "MAINTAINER", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}
DEFAULT_READY = "sleep 20"  # what E2B's converter gives a CMD: a wait, not a check


class DockerfileError(ValueError):
    pass


@dataclass
class Converted:
    from_image: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    start_cmd: str = ""
    ready_cmd: str = ""
    copies: list[tuple[str, str]] = field(default_factory=list)  # (src, dest) of each COPY step, in order


def _lines(text: str) -> list[tuple[int, str]]:
    """Logical lines (continuations joined, comments and blanks dropped) with their first line number."""
    out: list[tuple[int, str]] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        out.append((start, buf.strip()))
        buf = ""
    if buf:
        out.append((start, buf.strip()))
    return out


def _subst(text: str, args: dict[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return args.get(name, m.group(0))

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", repl, text)


def _exec_form(rest: str) -> list[str] | None:
    if rest.startswith("["):
        try:
            value = json.loads(rest)
        except ValueError:
            return None
        if isinstance(value, list) and all(isinstance(x, str) for x in value):
            return value
    return None


def _flags(rest: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(rest)
    flags: dict[str, str] = {}
    while words and words[0].startswith("--"):
        k, _, v = words.pop(0)[2:].partition("=")
        flags[k] = v
    return flags, words


def convert(text: str) -> Converted:
    args: dict[str, str] = {}
    conv: Converted | None = None
    set_user = set_workdir = False
    entrypoint: list[str] = []
    cmd: list[str] = []
    for n, line in _lines(text):
        word, _, rest = line.partition(" ")
        op, rest = word.upper(), rest.strip()
        where = f"line {n} ({op})"
        if op == "ARG" and conv is None:  # before FROM: only for FROM
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip().strip('"')
            continue
        if op == "FROM":
            if conv is not None:
                raise DockerfileError(f"{where}: multi-stage builds are not supported (one FROM)")
            image = _subst(rest.split()[0] if rest else "", args)
            if not image:
                raise DockerfileError(f"{where}: FROM needs an image")
            conv = Converted(from_image=image)
            conv.steps += [{"type": "USER", "args": ["root"]}, {"type": "WORKDIR", "args": ["/"]}]
            continue
        if conv is None:
            raise DockerfileError(f"{where}: the first instruction must be FROM")
        steps = conv.steps
        if op == "RUN":
            form = _exec_form(rest)
            command = shlex.join(form) if form is not None else rest
            if not command:
                raise DockerfileError(f"{where}: RUN needs a command")
            steps.append({"type": "RUN", "args": [_subst(command, args)]})
        elif op in ("COPY", "ADD"):
            flags, words = _flags(rest)
            if "from" in flags:
                raise DockerfileError(f"{where}: COPY --from (multi-stage) is not supported")
            if len(words) < 2:
                raise DockerfileError(f"{where}: {op} needs a source and a destination")
            *sources, dest = [_subst(w, args) for w in words]
            if any(s.startswith(("http://", "https://")) for s in sources):
                raise DockerfileError(f"{where}: ADD from a URL is not supported: download it in a RUN step")
            if not dest.startswith("/"):
                dest = "/" + dest if dest != "." else "/"
            user = flags.get("chown", "").split(":")[0]
            mode = flags.get("chmod", "")
            for src in sources:
                steps.append({"type": "COPY", "args": [src, dest, user, mode]})
                conv.copies.append((src, dest))
        elif op in ("ENV", "ARG"):
            pairs: list[str] = []
            if op == "ENV" and "=" not in rest.split(" ", 1)[0]:
                k, _, v = rest.partition(" ")  # legacy form: ENV KEY value with spaces
                pairs += [k, v.strip()]
            else:
                for item in shlex.split(rest):
                    k, sep, v = item.partition("=")
                    if op == "ARG" and not sep:
                        v = args.get(k, "")
                    pairs += [k, _subst(v, args)]
                    if op == "ARG":
                        args[k] = v
            for k, v in zip(pairs[::2], pairs[1::2], strict=False):
                if op == "ENV":
                    args[k] = v
            steps.append({"type": "ENV", "args": pairs})
        elif op == "WORKDIR":
            path = _subst(rest, args)
            steps.append({"type": "WORKDIR", "args": [path if path.startswith("/") else "/" + path]})
            set_workdir = True
        elif op == "USER":
            steps.append({"type": "USER", "args": [_subst(rest, args).split(":")[0]]})
            set_user = True
        elif op == "CMD":
            form = _exec_form(rest)
            cmd = form if form is not None else ["/bin/sh", "-c", rest]
        elif op == "ENTRYPOINT":
            form = _exec_form(rest)
            entrypoint = form if form is not None else ["/bin/sh", "-c", rest]
        elif op in IGNORED:
            continue
        else:
            raise DockerfileError(f"{where}: unknown instruction {op}")
    if conv is None:
        raise DockerfileError("the Dockerfile has no FROM")
    if not set_user:
        conv.steps.append({"type": "USER", "args": ["user"]})
    if not set_workdir:
        conv.steps.append({"type": "WORKDIR", "args": ["/home/user"]})
    start = [*entrypoint, *cmd]
    if start:
        conv.start_cmd = shlex.join(start)
        conv.ready_cmd = DEFAULT_READY
    for step in conv.steps:
        step.setdefault("force", False)
    return conv
