"""Router tokens: long-lived credentials that let a router list the fleet (ListNodes), nothing
else.

A token reads ``tdmr_<token_id>_<secret>``, a ``core.tokens`` format like a join token: the id
names it in listings and logs, the secret is 256 random bits of which only the sha256 digest
is kept, in ``DIR/router-tokens.json`` (mode 0600). A file beside the database rather than a
table: it needs no schema migration, and it is read on each ListNodes call, so a token made or
revoked by the CLI takes effect without a server restart. Writers hold an exclusive lock and
replace the file with ``core.durable.write_atomic``, so a reader never sees half of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from core.durable import write_atomic
from core.errors import NotFound, Unauthenticated
from core.tokens import digest, new_token, parse_token, same_digest

log = logging.getLogger(__name__)

FILE_NAME = "router-tokens.json"
PREFIX = "tdmr"
_HOW = "make one with `tandem cloud token create --router` on the control host"


@dataclass(frozen=True)
class RouterToken:
    """A router token as stored: its id, the digest of its secret, and when it was made."""

    token_id: str
    secret_hash: str
    created_at: float
    note: str = ""


class RouterTokens:
    """The router tokens of one data directory (``root/router-tokens.json``)."""

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / FILE_NAME

    def create(self, *, note: str = "") -> str:
        """A new token, returned once (only its digest is kept)."""
        token_id, token, secret = new_token(PREFIX)
        with self._locked():
            tokens = self._read()
            tokens.append(RouterToken(token_id, digest(secret), time.time(), note))
            self._write(tokens)
        log.info("created router token %s", token_id)
        return token

    def tokens(self) -> list[RouterToken]:
        """Every valid token, oldest first."""
        return self._read()

    def revoke(self, token_id: str) -> None:
        """Forget ``token_id``: routers using it are refused from their next call."""
        with self._locked():
            tokens = self._read()
            kept = [t for t in tokens if t.token_id != token_id]
            if len(kept) == len(tokens):
                raise NotFound(f"no router token {token_id} (see `tandem cloud token list`)")
            self._write(kept)
        log.info("revoked router token %s", token_id)

    def authenticate(self, token: str) -> str:
        """The id of a valid token; raises Unauthenticated otherwise."""
        parsed = parse_token(PREFIX, (token or "").strip())
        if parsed is None:
            raise Unauthenticated("ListNodes needs a router token (tdmr_<id>_<secret>) as "
                                  f"metadata 'authorization: Bearer <token>'; {_HOW}")
        token_id, secret_hash = parsed[0], digest(parsed[1])
        for stored in self._read():
            if stored.token_id == token_id and same_digest(stored.secret_hash, secret_hash):
                return token_id
        raise Unauthenticated(f"router token {token_id} is not recognized (revoked, or made "
                              f"for another control plane); {_HOW}")

    def _read(self) -> list[RouterToken]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        return [RouterToken(**t) for t in raw["tokens"]]

    def _write(self, tokens: list[RouterToken]) -> None:
        data = json.dumps({"tokens": [asdict(t) for t in tokens]}, indent=1).encode()
        # 0600 from the start: the digests are useless to a thief, but the file is no one's.
        write_atomic(self.path, data, mode=0o600)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Two CLI invocations at once must not each write a list missing the other's token.
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(f".{FILE_NAME}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
