"""The server's own certificate authority, for `--domain`: HTTPS on `api.D` and `{port}-{id}.D`.

The CA (`<data>/ca/ca.pem`, its key `ca.key`, 0600) is made on first use and kept; `sandboxd ca export`
prints it, `sandboxd ca install` adds it to the host's trust store (Debian's update-ca-certificates). The
server certificate (`<data>/ca/server.pem`) names `D` and `*.D`; it is remade when the domain changes or
within 30 days of its end. ECDSA P-256 throughout.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from pathlib import Path

from cryptography import x509

from sandboxd import pki

CA_DAYS = 3650
LEAF_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)


class CertError(Exception):
    pass


class LocalCA:
    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "ca"
        self.cert_path = self.dir / "ca.pem"
        self.key_path = self.dir / "ca.key"

    def ensure(self) -> tuple[x509.Certificate, pki.Key]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.cert_path.exists() and self.key_path.exists():
            try:
                return pki.load(self.cert_path.read_bytes(), self.key_path.read_bytes())
            except ValueError as e:
                raise CertError(f"{self.key_path}: {e}") from None
        cert, key = pki.make_ca(f"sandboxd local CA ({os.uname().nodename})", CA_DAYS)
        pki.write_private(self.key_path, pki.key_pem(key))
        pki.write_private(self.cert_path, pki.cert_pem(cert))
        return cert, key

    def pem(self) -> str:
        self.ensure()
        return self.cert_path.read_text()

    def server_cert(self, domain: str) -> tuple[Path, Path]:
        """(certificate chain, key) files for `domain` and `*.domain`, made or renewed as needed."""
        ca_cert, ca_key = self.ensure()
        chain, key_path = self.dir / "server.pem", self.dir / "server.key"
        names = [domain, f"*.{domain}"]
        if chain.exists() and key_path.exists():
            current = x509.load_pem_x509_certificate(chain.read_bytes())
            try:
                san = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                have = sorted(san.get_values_for_type(x509.DNSName))
            except x509.ExtensionNotFound:
                have = []
            fresh = current.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > RENEW_BEFORE
            if have == sorted(names) and fresh and current.issuer == ca_cert.subject:
                return chain, key_path
        cert, key = pki.issue(ca_cert, ca_key, names, LEAF_DAYS)
        pki.write_private(key_path, pki.key_pem(key))
        pki.write_private(chain, pki.cert_pem(cert) + pki.cert_pem(ca_cert))
        return chain, key_path

    def install(self, target_dir: Path = Path("/usr/local/share/ca-certificates")) -> Path:
        """Add the CA to the host's trust store (Debian: update-ca-certificates)."""
        import subprocess

        pem = self.pem()
        target_dir.mkdir(parents=True, exist_ok=True)
        # one file per data dir: two servers on a host have two CAs
        target = target_dir / f"sandboxd-{hashlib.sha256(str(self.dir.resolve()).encode()).hexdigest()[:8]}.crt"
        target.write_text(pem)
        res = subprocess.run(["update-ca-certificates"], capture_output=True, text=True)
        if res.returncode != 0:
            raise CertError(f"update-ca-certificates failed: {res.stderr.strip()}")
        return target
