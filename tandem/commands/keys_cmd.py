"""``tandem keys``: create, list and revoke the API keys routers accept (kept in Redis)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
PEPPER_ENV = "TANDEM_API_KEY_PEPPER"


def register(groups: Any) -> None:
    keys = groups.add_parser("keys", help="API keys: create, list, revoke")
    sub = keys.add_subparsers(dest="command", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--redis-url", default=os.environ.get("TANDEM_REDIS_URL", DEFAULT_REDIS_URL),
        help=f"the routers' Redis (env TANDEM_REDIS_URL, default {DEFAULT_REDIS_URL}); "
             f"a hashing pepper, if the routers use one, comes from env {PEPPER_ENV}")
    create = sub.add_parser("create", parents=[common], help="make a key (shown once)")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--tier", default="default", help="rate-limit tier (default: default)")
    create.add_argument("--routes", default="auto,edge,cloud",
                        help="routes the key may ask for, comma-separated (default: all)")
    create.set_defaults(func=cmd_create)
    listing = sub.add_parser("list", parents=[common], help="show every key (never secrets)")
    listing.set_defaults(func=cmd_list)
    revoke = sub.add_parser("revoke", parents=[common], help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_revoke)


def _run(args: argparse.Namespace, action: Callable[[Any], Awaitable[int]]) -> int:
    """Run ``action(store)`` against the Redis at --redis-url; one line if it is unreachable."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError

    from router.keys import AuthConfig, KeyStore

    async def main() -> int:
        # One quick try: redis-py's default retries would leave the user waiting for seconds.
        client = aioredis.Redis.from_url(args.redis_url, socket_connect_timeout=2.0,
                                         socket_timeout=5.0, retry=Retry(NoBackoff(), 0))
        pepper = os.environ.get(PEPPER_ENV)
        try:
            return await action(KeyStore(client, AuthConfig(
                pepper=pepper.encode() if pepper else None)))
        finally:
            await client.aclose()

    try:
        return asyncio.run(main())
    except (RedisError, OSError) as e:
        print(f"tandem: error: cannot reach Redis at {args.redis_url} ({e}); start one or pass "
              "--redis-url (or set TANDEM_REDIS_URL)", file=sys.stderr)
        return 1


def cmd_create(args: argparse.Namespace) -> int:
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]

    async def create(store: Any) -> int:
        key_id, token = await store.create(args.name, args.tier, routes)
        print(f"key id:  {key_id}")
        print(f"name:    {args.name}   tier: {args.tier}   routes: {','.join(routes)}")
        print(f"API key: {token}")
        print("This key is shown once and cannot be recovered: store it now. Clients send it "
              "as gRPC metadata 'x-api-key' (tandem generate --api-key, or env TANDEM_API_KEY).")
        return 0

    return _run(args, create)


def cmd_list(args: argparse.Namespace) -> int:
    async def show(store: Any) -> int:
        records = await store.list()
        if not records:
            print("no API keys (create one with `tandem keys create --name NAME`)")
            return 0
        print(f"{'KEY ID':<18} {'NAME':<24} {'TIER':<12} {'ROUTES':<16} {'CREATED (UTC)':<20} "
              "STATE")
        for r in records:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created_at))
            state = "revoked" if r.revoked else "active"
            print(f"{r.key_id:<18} {r.name[:24]:<24} {r.tier:<12} {','.join(r.routes):<16} "
                  f"{created:<20} {state}")
        return 0

    return _run(args, show)


def cmd_revoke(args: argparse.Namespace) -> int:
    async def revoke(store: Any) -> int:
        if not await store.revoke(args.key_id):
            print(f"tandem: error: no API key with id {args.key_id!r} (`tandem keys list` shows "
                  "them)", file=sys.stderr)
            return 1
        print(f"revoked {args.key_id}; routers refuse it once their key cache expires "
              f"(default {store.config.cache_ttl_s:g} s)")
        return 0

    return _run(args, revoke)
