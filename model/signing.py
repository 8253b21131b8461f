"""Ed25519 signatures over artifact manifests: the cloud signs, every edge node verifies.

What is signed is the exact canonical bytes of ``manifest.json`` (``Manifest.to_json_bytes``),
so a node checks the bytes it received before parsing them. This module imports only the
standard library and ``cryptography``: edge nodes import it without torch, grpc or SQLite.
The private key lives in one PEM file (mode 0600); the key id is a fingerprint of the public
key, so a node can tell which key signed a manifest after a rotation.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from core.durable import write_atomic

log = logging.getLogger(__name__)

SIGNATURE_BYTES = 64


class SignatureError(Exception):
    """A manifest signature is missing, malformed, made by another key, or does not match."""


def _public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def _key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def _load_public(public_pem: str | bytes) -> Ed25519PublicKey:
    data = public_pem.encode("ascii") if isinstance(public_pem, str) else public_pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"manifest public key is not a readable PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(
            f"manifest public key must be Ed25519, got {type(key).__name__}; "
            "re-enroll the node to fetch the cloud's key"
        )
    return key


def public_key_id(public_pem: str | bytes) -> str:
    """The fingerprint (``ed25519:<16 hex>``) of a PEM public key, as ``SigningKey.key_id``."""
    return _key_id(_load_public(public_pem))


def verify_manifest(
    public_pem: str | bytes,
    manifest_bytes: bytes,
    signature: bytes,
    *,
    key_id: str | None = None,
) -> None:
    """Raise ``SignatureError`` unless ``signature`` is the key's signature of the bytes.

    With ``key_id`` (as sent beside the manifest), a manifest signed by another key is
    refused with a message naming both keys rather than a bare mismatch.
    """
    public = _load_public(public_pem)
    if key_id is not None and key_id != _key_id(public):
        raise SignatureError(
            f"manifest was signed by key {key_id}, but this node trusts {_key_id(public)}; "
            "re-enroll the node if the cloud's signing key was rotated"
        )
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(
            f"manifest signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}"
        )
    try:
        public.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise SignatureError(
            f"manifest signature does not verify with key {_key_id(public)}: the manifest "
            "or its signature was altered"
        ) from None


@dataclass(frozen=True)
class SigningKey:
    """The cloud's Ed25519 manifest signing key."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | Path) -> SigningKey:
        """Load the PEM key at ``path``, creating it (mode 0600) if there is none."""
        path = Path(path)
        if not path.exists():
            cls._create(path)
        return cls.load(path)

    @classmethod
    def load(cls, path: str | Path) -> SigningKey:
        path = Path(path)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("signing key %s is readable by others (mode %o); chmod 600 it",
                        path, mode)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def _create(cls, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # 0600 from its first byte. Linked, not renamed: if another process created the key
        # meanwhile, theirs wins and both end up signing with the same key.
        try:
            write_atomic(path, pem, mode=0o600, exclusive=True)
        except FileExistsError:
            return
        log.info("created manifest signing key %s", path)

    def sign(self, manifest_bytes: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``manifest_bytes``."""
        return self.private.sign(manifest_bytes)

    @property
    def public_pem(self) -> str:
        """The public key as PEM (SubjectPublicKeyInfo), what Enroll hands to nodes."""
        return _public_pem(self.private.public_key())

    @property
    def key_id(self) -> str:
        """Fingerprint of the public key: ``ed25519:`` and 16 hex digits of its sha256."""
        return _key_id(self.private.public_key())

