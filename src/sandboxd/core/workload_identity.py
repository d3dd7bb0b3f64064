"""Workload identity: a sandbox's `iam.tokens` (E2B's create field) are named JWT-SVIDs that the egress
proxy mints for each request where a network rule says `${e2b.identity.tokens.NAME}`, so that a
credential the sandbox never holds proves, to a relying party, which sandbox a request comes from.

Tokens are ES256 JWTs signed by the server's identity key (`<data>/identity/key.pem`, 0600, made on first
start): `iss` is the server's issuer URL, `sub` the sandbox's SPIFFE ID (`spiffe://sandboxd/sandbox/<id>`),
`aud` the audience given, valid for 5 minutes. Relying parties verify them with the public keys at
`/.well-known/jwks.json` (OpenID discovery at `/.well-known/openid-configuration`).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from sandboxd import pki
from sandboxd.core.errors import BadRequest
from sandboxd.core.secrets import UNUSABLE_IN_PLACEHOLDER

TOKEN_TYPES = ("JWT-SVID",)
LIFETIME = 300  # s
MAX_TOKENS = 16
PLACEHOLDER = re.compile(r"\$\{e2b\.identity\.tokens\.([^{}\x00-\x1f\x7f]+)\}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def check_tokens(iam: Any) -> dict[str, dict[str, str]]:
    """`iam` of a create, checked: {name: {"audience", "tokenType"}}."""
    if iam is None:
        return {}
    if not isinstance(iam, dict):
        raise BadRequest("iam must be an object with 'tokens'")
    tokens = iam.get("tokens") or {}
    if not isinstance(tokens, dict) or len(tokens) > MAX_TOKENS:
        raise BadRequest(f"iam.tokens must be an object of at most {MAX_TOKENS} named token definitions")
    out = {}
    for name, t in tokens.items():
        if not isinstance(name, str) or not name or len(name) > 128 or UNUSABLE_IN_PLACEHOLDER.search(name):
            raise BadRequest(f"iam.tokens: {name!r} is not a usable name (no '{{', '}}' or control characters)")
        if not isinstance(t, dict):
            raise BadRequest(f"iam.tokens.{name} must be an object with audience and tokenType")
        audience, kind = t.get("audience"), t.get("tokenType", t.get("token_type"))
        if not isinstance(audience, str) or not audience or len(audience) > 512:
            raise BadRequest(f"iam.tokens.{name}.audience must be a non-empty string")
        if kind not in TOKEN_TYPES:
            raise BadRequest(f"iam.tokens.{name}.tokenType must be one of {', '.join(TOKEN_TYPES)}, got {kind!r}")
        out[name] = {"audience": audience, "tokenType": kind}
    return out


class Issuer:
    def __init__(self, data_dir: Path, issuer: str) -> None:
        self.issuer = issuer
        directory = Path(data_dir) / "identity"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / "key.pem"
        if path.exists():
            from cryptography.hazmat.primitives import serialization

            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{path} is not an EC key")
            self.key = key
        else:
            self.key = pki.new_key()
            pki.write_private(path, pki.key_pem(self.key))
        numbers = self.key.public_key().public_numbers()
        self.jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64(numbers.x.to_bytes(32, "big")),
            "y": _b64(numbers.y.to_bytes(32, "big")),
            "use": "sig",
            "alg": "ES256",
        }
        digest = hashes.Hash(hashes.SHA256())
        digest.update(json.dumps({k: self.jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":")).encode())
        self.jwk["kid"] = _b64(digest.finalize())  # the RFC 7638 thumbprint

    def mint(self, sandbox_id: str, audience: str) -> str:
        now = int(time.time())
        header = {"alg": "ES256", "typ": "JWT", "kid": self.jwk["kid"]}
        claims = {
            "iss": self.issuer,
            "sub": f"spiffe://sandboxd/sandbox/{sandbox_id}",
            "aud": [audience],
            "iat": now,
            "nbf": now,
            "exp": now + LIFETIME,
            "jti": secrets.token_hex(12),
        }
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}".encode()
        r, s = decode_dss_signature(self.key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return signing_input.decode() + "." + _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk]}

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": self.issuer.rstrip("/") + "/.well-known/jwks.json",
            "id_token_signing_alg_values_supported": ["ES256"],
            "subject_types_supported": ["public"],
            "response_types_supported": ["id_token"],
        }
