"""``tandem generate``: one request to a router (or any tier), printed with who served it.

With ``--chat`` the prompt is a user turn rendered with the model's chat template; on a
terminal the conversation goes on (history kept) until an empty line or end of input.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

DEFAULT_ADDRESS = "127.0.0.1:50050"


def register(groups: Any) -> None:
    gen = groups.add_parser("generate", help="send a prompt to a Tandem endpoint")
    gen.add_argument("prompt", nargs="?", default=None,
                     help="the prompt (with --chat: the first user message; optional)")
    gen.add_argument("--chat", action="store_true",
                     help="chat with the model's template; interactive on a terminal")
    gen.add_argument("--system", default=None, help="system message for --chat")
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

    if args.prompt is None and not args.chat:
        print("tandem generate: give a prompt (or --chat for a conversation)", file=sys.stderr)
        return 2
    if args.system is not None and not args.chat:
        print("tandem generate: --system needs --chat", file=sys.stderr)
        return 2
    fields = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed, stop=args.stop, route=args.route,
                  quality=args.quality, no_cache=args.no_cache)
    with Client(args.address, api_key=args.api_key, timeout=args.timeout) as client:
        try:
            if args.chat:
                return _chat(client, args, fields)
            _answer(client, args.stream, fields, prompt=args.prompt)
        except TandemError as e:
            return _failed(e)
    return 0


def _chat(client: Any, args: argparse.Namespace, fields: dict[str, Any]) -> int:
    """A conversation: each answer joins the history the next turn is sent with."""
    from core.errors import TandemError

    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    turn = args.prompt
    while True:
        if turn is None:
            if not interactive:
                return 0
            try:
                turn = input("> ")
            except EOFError:
                print()
                return 0
            if not turn.strip():
                return 0
        history.append({"role": "user", "content": turn})
        try:
            text = _answer(client, args.stream, fields, messages=history)
        except TandemError as e:
            code = _failed(e)
            if not interactive:
                return code
            history.pop()  # the turn was not answered: the user may rephrase it
        else:
            history.append({"role": "assistant", "content": text})
        turn = None


def _answer(client: Any, stream: bool, fields: dict[str, Any], *, prompt: str = "",
            messages: list[dict[str, str]] | None = None) -> str:
    """Send one request, print its answer (and who served it, on stderr); returns the text."""
    if messages is not None:
        fields = {**fields, "messages": messages}
    if not stream:
        done = client.generate(prompt, **fields)
        print(done.text)
        print(_describe(done.served_by, done.route_reason, done.cached, done.usage,
                        done.timings), file=sys.stderr)
        return str(done.text)
    first = last = None
    parts = []
    for chunk in client.stream(prompt, **fields):
        first = first or chunk
        last = chunk
        parts.append(chunk.text)
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    print()
    if last is not None:
        served = last.served_by or (first.served_by if first else None)
        print(_describe(served, last.route_reason, last.cached, last.usage, last.timings),
              file=sys.stderr)
    return "".join(parts)


def _failed(e: Any) -> int:
    hint = f" (retry after {e.retry_after_s:.1f} s)" if e.retry_after_s else ""
    print(f"tandem: {e.message}{hint}", file=sys.stderr)
    return 1
