"""``tandem router``: run the adaptive router in front of edge nodes and cloud replicas."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from tandem.commands.flags import add_metrics_flags

# Off the ports node_exporter (9100) and friends hold on the same hosts.
METRICS_PORT = 9190


def register(groups: Any) -> None:
    router = groups.add_parser("router", help="the adaptive router (one endpoint, both tiers)")
    sub = router.add_subparsers(dest="command", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="route requests to edge nodes and the cloud tier")
    serve.add_argument("--backend", action="append", default=[], metavar="HOST:PORT",
                       help="an edge node or cloud replica (repeatable); at least one, or "
                            "--control")
    fleet = serve.add_argument_group("edge nodes from the control plane")
    fleet.add_argument("--control", default=None, metavar="HOST:PORT",
                       help="control plane to learn enrolled edge nodes from (nodes installed "
                            "later get traffic without a router restart)")
    fleet.add_argument("--control-token", default=os.environ.get("TANDEM_ROUTER_TOKEN"),
                       metavar="TOKEN",
                       help="router token from `tandem cloud token create --router` (env "
                            "TANDEM_ROUTER_TOKEN, which keeps it out of process listings)")
    fleet.add_argument("--discovery-interval", type=float, default=3.0, metavar="SECONDS",
                       help="how often the control plane is asked for nodes (default 3)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50050)
    serve.add_argument("--node-id", default="router")
    serve.add_argument("--difficulty-threshold", type=float, default=None,
                       help="edge loss (nats/token) above which the cloud answers (default 4.0)")
    serve.add_argument("--cascade", action="store_true",
                       help="the edge answers first; low-confidence answers go to the cloud")
    serve.add_argument("--cascade-threshold", type=float, default=None,
                       help="edge loss on its own answer above which it escalates (default 1.5)")
    serve.add_argument("--ready-timeout", type=float, default=60.0,
                       help="seconds to wait for a first healthy backend")
    add_metrics_flags(serve, METRICS_PORT)
    door = serve.add_argument_group("front door (API keys, rate limits, response cache)")
    door.add_argument("--redis-url", default=os.environ.get("TANDEM_REDIS_URL"),
                      help="shared Redis for keys, token buckets and the cache (env "
                           "TANDEM_REDIS_URL); without it keys and limits are off and the cache "
                           "is this router's own")
    door.add_argument("--no-auth", action="store_true",
                      help="serve without API keys (development only)")
    door.add_argument("--no-rate-limit", action="store_true")
    door.add_argument("--no-cache", action="store_true")
    door.add_argument("--on-redis-error", choices=("open", "closed"), default="open",
                      help="rate limiting while Redis is down: open serves on a local bucket "
                           "and logs loudly, closed refuses (default open)")
    door.add_argument("--router-replicas", type=int, default=1, metavar="N",
                      help="routers sharing the Redis: while it is down each admits 1/N of a "
                           "key's rate, so the fleet keeps the limit (default 1)")
    door.add_argument("--tokenizer", type=Path, default=None,
                      help="tokenizer directory to count prompt tokens for the rate-limit cost "
                           "(default: the demo model's)")
    serve.add_argument("--escalation-log", type=Path, default=None, metavar="DIR",
                       help="cascade mode: append each escalated prompt with the cloud's "
                            "answer to DIR/<edge node id>/escalations.jsonl, the site data "
                            "the node's SuperNode trains on next round")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from core.errors import TandemError
    from core.grpc_server import ServerConfig
    from core.metrics import MetricsConfig
    from federation.sitedata import EscalationLog
    from model.demo import DEMO_DIR
    from router.cache import CacheConfig
    from router.discovery import DiscoveryConfig
    from router.frontdoor import FrontDoorConfig
    from router.keys import AuthConfig
    from router.policy import PolicyConfig
    from router.ratelimit import RateLimitConfig
    from router.server import RouterConfig, run_router

    overrides: dict[str, Any] = {"cascade": args.cascade}
    if args.difficulty_threshold is not None:
        overrides["difficulty_threshold"] = args.difficulty_threshold
    if args.cascade_threshold is not None:
        overrides["cascade_threshold"] = args.cascade_threshold
    discovery = None
    if args.control:
        discovery = DiscoveryConfig(args.control, args.control_token or "",
                                    interval_s=args.discovery_interval)
    elif args.control_token:
        raise ValueError("--control-token needs --control HOST:PORT")
    config = RouterConfig(
        backends=args.backend,
        discovery=discovery,
        server=ServerConfig(host=args.host, port=args.port),
        policy=dataclasses.replace(PolicyConfig(), **overrides),
        node_id=args.node_id,
        ready_timeout_s=args.ready_timeout,
        on_escalation=None if args.escalation_log is None else EscalationLog(args.escalation_log),
        front_door=FrontDoorConfig(
            redis_url=args.redis_url,
            auth=AuthConfig(enabled=bool(args.redis_url) and not args.no_auth,
                            pepper=os.environ.get("TANDEM_API_KEY_PEPPER", "").encode() or None),
            rate_limit=None if args.no_rate_limit else RateLimitConfig(
                on_redis_error=args.on_redis_error,
                local_rate_share=1.0 / max(1, args.router_replicas)),
            cache=CacheConfig(enabled=not args.no_cache),
            tokenizer_dir=args.tokenizer or DEMO_DIR / "edge",
        ),
    )
    try:
        asyncio.run(run_router(
            config, MetricsConfig.from_flags(args.metrics_port, METRICS_PORT, args.no_metrics)))
    except TandemError as e:
        # No healthy backend in time: one line, no traceback (a supervisor will restart us).
        logging.getLogger("tandem.router").error("router: %s", e.message)
        return 1
    return 0
