"""Tandem's bearer secrets in one format: ``<prefix>_<id>_<secret>``, or ``<prefix>_<secret>``.

Join tokens (``tdmj``), node credentials (``tdmn``, no id), router tokens (``tdmr``) and API keys
(``tdm``) are all made, parsed and hashed here. The id is 16 hex digits and public: it names the
token in logs and listings. The secret is 256 random bits as urlsafe base64 (43 characters,
which may include '_': take it with ``parse_token``, never by splitting on '_'). Stores keep
only ``digest``: sha256, or HMAC-sha256 under a server pepper, so a copy of a store alone can't
be brute-forced offline (the secrets are random, so a plain hash is not guessable either).
Standard library only.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets

ID_BYTES = 8  # 16 hex digits
SECRET_BYTES = 32  # 43 urlsafe base64 characters


@functools.cache
def _pattern(prefix: str, with_id: bool) -> re.Pattern[str]:
    token_id = r"([0-9a-f]{16})_" if with_id else "()"
    return re.compile(rf"^{re.escape(prefix)}_{token_id}([A-Za-z0-9_-]{{43}})$")


def new_token(prefix: str, *, with_id: bool = True) -> tuple[str, str, str]:
    """A fresh ``(token_id, token, secret)``; ``token_id`` is "" for a token without one."""
    token_id = secrets.token_hex(ID_BYTES) if with_id else ""
    secret = secrets.token_urlsafe(SECRET_BYTES)
    token = f"{prefix}_{token_id}_{secret}" if with_id else f"{prefix}_{secret}"
    return token_id, token, secret


def parse_token(prefix: str, text: str, *, with_id: bool = True) -> tuple[str, str] | None:
    """``(token_id, secret)`` of ``text``, or None when it is not shaped like a ``prefix`` token
    (callers strip whitespace first where they accept it)."""
    match = _pattern(prefix, with_id).match(text)
    return None if match is None else (match.group(1), match.group(2))


def digest(secret: str, pepper: bytes | None = None) -> str:
    """The stored form of ``secret``: ``sha256:<hex>``, or ``hmac-sha256:<hex>`` with a pepper."""
    if pepper:
        return "hmac-sha256:" + hmac.new(pepper, secret.encode(), hashlib.sha256).hexdigest()
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def same_digest(a: str, b: str) -> bool:
    """Constant time: how long a comparison takes says nothing about how much matched."""
    return hmac.compare_digest(a.encode(), b.encode())
