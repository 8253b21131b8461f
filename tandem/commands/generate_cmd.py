"""``tandem generate``: one request to a router (or any tier), printed with who served it."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

DEFAULT_ADDRESS = "127.0.0.1:50050"


def register(groups: Any) -> None:
    gen = groups.add_parser("generate", help="send a prompt to a Tandem endpoint")
    gen.add_argument("prompt")
    gen.add_argument("--address", default=os.environ.get("TANDEM_ADDRESS", DEFAULT_ADDRESS),
                     help=f"router or tier address (env TANDEM_ADDRESS, default {DEFAULT_ADDRESS})")
    gen.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY"),
                     help="API key (env TANDEM_API_KEY)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    gen.add_argument("--route", choices=("auto", "edge", "cloud"), default="auto")
    gen.add_argument("--quality", choices=("default", "fast", "best"), default="default")
    gen.add_argument("--max-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1)")
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    gen.add_argument("--no-cache", action="store_true")
    gen.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
    gen.set_defaults(func=cmd_generate)


def _describe(served_by: Any, route_reason: str, cached: bool, usage: Any, timings: Any) -> str:
    who = f"{served_by.tier} {served_by.node_id} ({served_by.model_version})" if served_by else "?"
    parts = [f"served by {who}" + (" from cache" if cached else "")]
    if route_reason:
        parts.append(f"route: {route_reason}")
    if timings:
        parts.append(f"queue {timings.queue_ms:.0f} ms, first token "
                     f"{timings.time_to_first_token_ms:.0f} ms, total {timings.total_ms:.0f} ms")
    if usage:
        parts.append(f"tokens {usage.prompt_tokens} in + {usage.completion_tokens} out")
    return "\n".join(f"  {p}" for p in parts)


def cmd_generate(args: argparse.Namespace) -> int:
    from core.errors import TandemError
    from tandem.client import Client

    fields = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, stop=args.stop, route=args.route,
                  quality=args.quality, no_cache=args.no_cache)
    with Client(args.address, api_key=args.api_key, timeout=args.timeout) as client:
        try:
            if args.stream:
                first = last = None
                for chunk in client.stream(args.prompt, **fields):
                    first = first or chunk
                    last = chunk
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                print()
                if last is not None:
                    served = last.served_by or (first.served_by if first else None)
                    print(_describe(served, last.route_reason, last.cached, last.usage,
                                    last.timings), file=sys.stderr)
            else:
                done = client.generate(args.prompt, **fields)
                print(done.text)
                print(_describe(done.served_by, done.route_reason, done.cached, done.usage,
                                done.timings), file=sys.stderr)
        except TandemError as e:
            hint = f" (retry after {e.retry_after_s:.1f} s)" if e.retry_after_s else ""
            print(f"tandem: {e.message}{hint}", file=sys.stderr)
            return 1
    return 0
