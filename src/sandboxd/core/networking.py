"""The sandboxes' networking as the manager keeps it: which live sandbox has which address, its policy
(network/policy.py) applied through the runtime, the trust in its egress CA, and what the egress proxy
fills into rules' headers (secrets, workload identity tokens). The resolver and the egress proxy ask
here, by the address a packet came from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from sandboxd.core import egress_ca, workload_identity
from sandboxd.core.errors import BadRequest
from sandboxd.core.secrets import PLACEHOLDER as SECRET_PLACEHOLDER
from sandboxd.core.secrets import Secrets
from sandboxd.core.teams import DEFAULT_TEAM
from sandboxd.network.intercept import SandboxCA
from sandboxd.network.policy import NetworkPolicy, PolicyError
from sandboxd.runtime.base import Runtime, RuntimeError_, SandboxHandle
from sandboxd.state.sql import State

if TYPE_CHECKING:
    from sandboxd.core.manager import Sandbox


def parse_policy(
    network: dict[str, Any] | None,
    allow_internet_access: bool | None,
    tokens: set[str] | None = None,
    team: str = DEFAULT_TEAM,
) -> NetworkPolicy:
    """E2B's network fields checked (400 with the reason); `tokens`: the sandbox's iam token names; `team`: its
    team's (the server's secrets are the operator's: a team's sandbox may not name them in its rules)."""
    network = network or {}
    if not isinstance(network, dict):
        raise BadRequest("network must be an object")
    if team != DEFAULT_TEAM and SECRET_PLACEHOLDER.search(json.dumps(network.get("rules"))):
        raise BadRequest(
            "network.rules: ${e2b.secrets.*} names the server's secrets, which only the operator's sandboxes use: "
            "put the value in the rule itself, or ask the operator"
        )
    try:
        return NetworkPolicy.from_api(network, allow_internet_access, tokens or set())
    except PolicyError as e:
        raise BadRequest(str(e)) from None


def parse_ingress(network: dict[str, Any] | None) -> tuple[bool, str | None]:
    """(are its ports public, the Host its services see) from `network.allowPublicTraffic` and
    `network.maskRequestHost`."""
    network = network or {}
    public = network.get("allowPublicTraffic", True)
    if not isinstance(public, bool):
        raise BadRequest("network.allowPublicTraffic must be true or false")
    mask = network.get("maskRequestHost")
    if mask is not None:
        if not isinstance(mask, str) or not mask or len(mask) > 253 or any(c in mask for c in " \r\n\t/"):
            raise BadRequest("network.maskRequestHost must be a host name (up to 253 characters; ${PORT} allowed)")
    return public, mask


class SandboxNetworks:
    def __init__(self, runtime: Runtime, db: State) -> None:
        self.runtime = runtime
        self.secrets = Secrets(db)  # ${e2b.secrets.NAME} in rules
        self.identity: workload_identity.Issuer | None = None  # mints ${e2b.identity.tokens.NAME}
        self._by_address: dict[str, Sandbox] = {}
        self._builders: dict[str, NetworkPolicy] = {}  # template builds' sandboxes (core/builds.py)
        # called with a sandbox's address when its policy changed or it ended (the egress proxy re-checks)
        self.on_policy_change: list[Callable[[str], None]] = []

    # -- the sandboxes ------------------------------------------------------------------------------
    def add(self, sandbox: Sandbox) -> None:
        if sandbox.handle.address:
            self._by_address[sandbox.handle.address] = sandbox

    def remove(self, sandbox: Sandbox) -> None:
        if self._by_address.get(sandbox.handle.address) is sandbox:
            del self._by_address[sandbox.handle.address]
            self._changed(sandbox.handle.address)  # its proxied connections end

    def _changed(self, address: str) -> None:
        for changed in self.on_policy_change:
            changed(address)

    async def apply_new(self, handle: SandboxHandle, policy: NetworkPolicy) -> tuple[SandboxCA | None, dict[str, str]]:
        """A new (or pooled, now handed-out) sandbox gets its policy: (its egress CA, the env vars that
        point programs at it) when it has rules."""
        egress = policy.egress()
        if egress.default:  # what every sandbox starts with
            return None, {}
        await self.runtime.set_egress(handle, egress, cut=False)  # it has made no connection yet
        if not policy.rules:
            return None, {}
        return await self._install_ca(handle)

    async def update(self, sandbox: Sandbox, network: dict[str, Any], allow_internet_access: bool | None) -> None:
        """Replace the sandbox's egress policy (all of it: what the update leaves out is cleared); the
        caller stores the record."""
        policy = parse_policy(network, allow_internet_access, set(sandbox.record.iam_tokens), sandbox.record.team)
        try:
            await self.runtime.set_egress(sandbox.handle, policy.egress())
        except RuntimeError_ as e:
            raise BadRequest(str(e)) from None
        if policy.rules and "egress_ca" not in sandbox.ext:
            ca, ca_vars = await self._install_ca(sandbox.handle)
            sandbox.ext["egress_ca"] = ca
            sandbox.record.env_vars = {**ca_vars, **sandbox.record.env_vars}
        sandbox.policy = policy
        sandbox.record.network = policy.to_json()
        sandbox.record.allow_internet_access = allow_internet_access is not False
        sandbox.record.handle = {**asdict(sandbox.handle), "state_dir": str(sandbox.handle.state_dir)}
        self._changed(sandbox.handle.address)

    async def _install_ca(self, handle: SandboxHandle) -> tuple[SandboxCA, dict[str, str]]:
        try:
            return await egress_ca.install(self.runtime, handle)
        except egress_ca.CaInstallError as e:
            raise BadRequest(f"network.rules: {e}") from None

    # -- what the resolver and the egress proxy ask ---------------------------------------------------
    def add_builder(self, address: str) -> None:
        """A template build's sandbox: the default policy (the internet, as package managers need)."""
        self._builders[address] = parse_policy(None, None, set())

    def remove_builder(self, address: str) -> None:
        if self._builders.pop(address, None) is not None:
            self._changed(address)

    def policy_for(self, address: str) -> NetworkPolicy | None:
        """The network policy of the live sandbox with this address."""
        if address in self._builders:
            return self._builders[address]
        sandbox = self._by_address.get(address)
        return sandbox.policy if sandbox is not None and not sandbox.killed.is_set() else None

    def ca_for(self, address: str) -> SandboxCA | None:
        """The egress CA of the sandbox with this address (for intercepted TLS)."""
        sandbox = self._by_address.get(address)
        if sandbox is None:
            return None
        ca = sandbox.ext.get("egress_ca")
        if ca is None and (sandbox.handle.state_dir / "egress-ca.pem").exists():  # re-adopted
            ca = sandbox.ext["egress_ca"] = SandboxCA(sandbox.handle.state_dir)
        return ca

    def fill(self, text: str, address: str) -> str:
        """A rule's header value with its placeholders filled in, for a request of the sandbox at `address`:
        `${e2b.secrets.NAME}` (the secret's current value), `${e2b.identity.tokens.NAME}` (a token minted
        now). KeyError names what does not exist."""
        sandbox = self._by_address.get(address)
        if SECRET_PLACEHOLDER.search(text) and (sandbox is None or sandbox.record.team != DEFAULT_TEAM):
            raise KeyError("secrets (only the operator's sandboxes use them)")
        text = self.secrets.fill(text)
        if "${e2b.identity." not in text:
            return text
        tokens = sandbox.record.iam_tokens if sandbox is not None else {}

        def mint(m: re.Match[str]) -> str:
            token = tokens.get(m.group(1))
            if token is None or self.identity is None or sandbox is None:
                raise KeyError(m.group(1))
            return self.identity.mint(sandbox.id, token["audience"])

        return workload_identity.PLACEHOLDER.sub(mint, text)
