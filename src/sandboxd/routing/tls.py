"""The server's own certificate authority, for `--domain`: HTTPS on `api.D` and `{port}-{id}.D`.

The CA (`<data>/ca/ca.pem`, its key `ca.key`, 0600) is made on first use and kept; `sandboxd ca export`
prints it, `sandboxd ca install` adds it to the host's trust store (Debian's update-ca-certificates). The
server certificate (`<data>/ca/server.pem`) names `D` and `*.D`; it is remade when the domain changes or
within 30 days of its end. ECDSA P-256 throughout.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)


class CertError(Exception):
    pass


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class LocalCA:
    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "ca"
        self.cert_path = self.dir / "ca.pem"
        self.key_path = self.dir / "ca.key"

    def ensure(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.cert_path.exists() and self.key_path.exists():
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise CertError(f"{self.key_path} is not an EC key")
            return cert, key
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sandboxd"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"sandboxd local CA ({os.uname().nodename})"),
            ]
        )
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(self.key_path, _key_pem(key))
        _write_private(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))
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
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(domain)))
        except ValueError:
            pass
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(key_path, _key_pem(key))
        _write_private(
            chain, cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
        )
        return chain, key_path

    def install(self, target_dir: Path = Path("/usr/local/share/ca-certificates")) -> Path:
        """Add the CA to the host's trust store (Debian: update-ca-certificates)."""
        import subprocess

        pem = self.pem()
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / "sandboxd-local-ca.crt"
        target.write_text(pem)
        res = subprocess.run(["update-ca-certificates"], capture_output=True, text=True)
        if res.returncode != 0:
            raise CertError(f"update-ca-certificates failed: {res.stderr.strip()}")
        return target
