"""Join tokens and node credentials: how they look, how they are made, and how they are hashed.

A join token reads ``tdmj_<token_id>_<secret>``: the id is public (it names the token in logs
and listings), the secret is 256 random bits. A node credential reads ``tdmn_<secret>``. The
control store keeps only sha256 digests: the secrets are random, so a plain hash can't be
brute-forced, and a copy of the database lets no one enroll or impersonate a node.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

JOIN_TOKEN_PREFIX = "tdmj"
CREDENTIAL_PREFIX = "tdmn"
_JOIN_TOKEN = re.compile(r"^tdmj_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_CREDENTIAL = re.compile(r"^tdmn_[A-Za-z0-9_-]{43}$")
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def digest(secret: str) -> str:
    """The stored form of a secret."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def same_digest(a: str, b: str) -> bool:
    # Constant time: how long a comparison takes says nothing about how much matched.
    return hmac.compare_digest(a.encode(), b.encode())


def new_join_token() -> tuple[str, str, str]:
    """A fresh token: ``(token_id, token, digest of its secret)``."""
    token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    return token_id, f"{JOIN_TOKEN_PREFIX}_{token_id}_{secret}", digest(secret)


def parse_join_token(token: str) -> tuple[str, str] | None:
    """``(token_id, digest of the secret)``, or None when ``token`` is not shaped like one."""
    match = _JOIN_TOKEN.match(token.strip())
    return None if match is None else (match.group(1), digest(match.group(2)))


def new_credential() -> tuple[str, str]:
    """A fresh node credential and its digest."""
    credential = f"{CREDENTIAL_PREFIX}_{secrets.token_urlsafe(32)}"
    return credential, digest(credential)


def is_credential(text: str) -> bool:
    return _CREDENTIAL.match(text) is not None


def new_node_id() -> str:
    return f"edge-{secrets.token_hex(4)}"


def is_node_id(text: str) -> bool:
    """Node ids name files and metric labels downstream: letters, digits, '.', '_', '-'."""
    return _NODE_ID.match(text) is not None
