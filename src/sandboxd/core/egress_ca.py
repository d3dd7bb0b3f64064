"""The sandbox's side of the egress proxy's TLS interception (network/intercept.py): a sandbox with
`network.rules` trusts its own CA, whose key stays on the host.

The CA certificate goes to `/usr/local/share/ca-certificates/sandboxd-egress.crt` and is appended to
the system bundle (`/etc/ssl/certs/ca-certificates.crt`), which OpenSSL, curl, git and Python's `ssl`
read; the environment variables that other stacks honour point at them (Node's NODE_EXTRA_CA_CERTS,
requests' REQUESTS_CA_BUNDLE, ...) unless the sandbox's own envVars set them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

from sandboxd.core.users import DEFAULT_PATH
from sandboxd.network.intercept import SandboxCA
from sandboxd.runtime.base import ExecSpec, Runtime, SandboxHandle

CA_FILE = "/usr/local/share/ca-certificates/sandboxd-egress.crt"
BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
SCRIPT = f"""umask 022
mkdir -p /usr/local/share/ca-certificates
cat > {CA_FILE}.tmp && mv -f {CA_FILE}.tmp {CA_FILE}
if [ -f {BUNDLE} ] && [ ! -L {BUNDLE} ]; then cat {CA_FILE} >> {BUNDLE}; echo bundle; fi
"""
INSTALL_TIMEOUT = 15.0


class CaInstallError(Exception):
    pass


def ca_env(with_bundle: bool) -> dict[str, str]:
    trust = BUNDLE if with_bundle else CA_FILE
    return {
        "SSL_CERT_FILE": trust,
        "REQUESTS_CA_BUNDLE": trust,
        "CURL_CA_BUNDLE": trust,
        "GIT_SSL_CAINFO": trust,
        "NODE_EXTRA_CA_CERTS": CA_FILE,
    }


async def install(runtime: Runtime, handle: SandboxHandle) -> tuple[SandboxCA, dict[str, str]]:
    """Make (or load) the sandbox's CA and add it to the sandbox's trust store, as the sandbox's root.
    Returns the CA and the environment variables that point programs at it."""
    ca = await asyncio.to_thread(SandboxCA, handle.state_dir)
    spec = ExecSpec(argv=["/bin/sh", "-c", SCRIPT], env={"PATH": DEFAULT_PATH}, cwd="/", uid=0, gid=0)
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        proc = runtime.spawn_exec(handle, spec, (stdin_r, out_w, out_w))
    finally:
        os.close(stdin_r)
        os.close(out_w)
    try:
        os.write(stdin_w, ca.pem.encode())
        os.close(stdin_w)
        stdin_w = -1
        code = await asyncio.to_thread(proc.wait, INSTALL_TIMEOUT)
        output = os.read(out_r, 65536).decode(errors="replace")
    except subprocess.TimeoutExpired:
        proc.kill()
        raise CaInstallError("installing the egress CA in the sandbox timed out") from None
    finally:
        if stdin_w >= 0:
            os.close(stdin_w)
        os.close(out_r)
    if code != 0:
        raise CaInstallError(f"installing the egress CA in the sandbox failed: {output.strip()}")
    return ca, ca_env("bundle" in output)
