"""Mutual TLS inside a cluster (optional; `--cluster-ca/--cluster-cert/--cluster-key`, the same three on every
process): a node serves its replicas and the other nodes on `--cluster-port` over TLS and takes only clients whose
certificate the cluster's CA signed; replicas and nodes present their certificate when they connect and check the
node's against the same CA (and its name or IP against the URL the node advertised). One certificate per process
serves as both (server and client authentication). With the cluster token as well, a request needs both.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ClusterTLSError(Exception):
    """The cluster's certificates cannot be used: which file, and why."""


@dataclass(frozen=True)
class ClusterTLS:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_args(cls, ca: str | None, cert: str | None, key: str | None) -> ClusterTLS | None:
        given = {"--cluster-ca": ca, "--cluster-cert": cert, "--cluster-key": key}
        if not any(given.values()):
            return None
        missing = [flag for flag, value in given.items() if not value]
        if missing:
            raise ClusterTLSError(
                f"mutual TLS needs all three of --cluster-ca, --cluster-cert, --cluster-key: {missing}"
            )
        tls = cls(Path(ca or ""), Path(cert or ""), Path(key or ""))
        tls.client_context()  # (read now: a bad file is said at start, not at the first request)
        tls.server_context()
        return tls

    def client_context(self) -> ssl.SSLContext:
        """What a replica or a node connects to a node with: its certificate shown, the node's checked."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self._load(ctx)
        return ctx

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.verify_mode = ssl.CERT_REQUIRED
        self._load(ctx)
        return ctx

    def uvicorn_options(self) -> dict[str, Any]:
        """A node's cluster listener: TLS, a client certificate the CA signed required."""
        return {
            "ssl_certfile": str(self.cert),
            "ssl_keyfile": str(self.key),
            "ssl_ca_certs": str(self.ca),
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
        }

    def _load(self, ctx: ssl.SSLContext) -> None:
        try:
            ctx.load_verify_locations(cafile=str(self.ca))
        except (OSError, ssl.SSLError) as e:
            raise ClusterTLSError(f"--cluster-ca {self.ca}: not a readable PEM file of CA certificates ({e})") from None
        try:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as e:
            raise ClusterTLSError(
                f"--cluster-cert {self.cert} / --cluster-key {self.key}: not a certificate and its key in PEM ({e})"
            ) from None
