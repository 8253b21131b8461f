"""Join tokens and node credentials: how they look, how they are made, and how they are hashed.

A join token reads ``tdmj_<token_id>_<secret>``: the id is public (it names the token in logs
and listings), the secret is 256 random bits. A node credential reads ``tdmn_<secret>``. Both
are ``core.tokens`` formats. The control store keeps only sha256 digests: the secrets are
random, so a plain hash can't be brute-forced, and a copy of the database lets no one enroll or
impersonate a node.
"""

from __future__ import annotations

import re
import secrets

# digest and same_digest are control.store's too.
from core.tokens import digest, new_token, parse_token
from core.tokens import same_digest as same_digest

JOIN_TOKEN_PREFIX = "tdmj"
CREDENTIAL_PREFIX = "tdmn"
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def new_join_token() -> tuple[str, str, str]:
    """A fresh token: ``(token_id, token, digest of its secret)``."""
    token_id, token, secret = new_token(JOIN_TOKEN_PREFIX)
    return token_id, token, digest(secret)


def parse_join_token(token: str) -> tuple[str, str] | None:
    """``(token_id, digest of the secret)``, or None when ``token`` is not shaped like one."""
    parsed = parse_token(JOIN_TOKEN_PREFIX, token.strip())
    return None if parsed is None else (parsed[0], digest(parsed[1]))


def new_credential() -> tuple[str, str]:
    """A fresh node credential and its digest (of the whole credential, prefix included)."""
    _, credential, _ = new_token(CREDENTIAL_PREFIX, with_id=False)
    return credential, digest(credential)


def is_credential(text: str) -> bool:
    return parse_token(CREDENTIAL_PREFIX, text, with_id=False) is not None


def new_node_id() -> str:
    return f"edge-{secrets.token_hex(4)}"


def is_node_id(text: str) -> bool:
    """Node ids name files and metric labels downstream: letters, digits, '.', '_', '-'."""
    return _NODE_ID.match(text) is not None
