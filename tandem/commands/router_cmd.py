"""``tandem router``: run the adaptive router in front of edge nodes and cloud replicas."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

# Off the ports node_exporter (9100) and friends hold on the same hosts.
METRICS_PORT = 9190


def register(groups: Any) -> None:
    router = groups.add_parser("router", help="the adaptive router (one endpoint, both tiers)")
    sub = router.add_subparsers(dest="command", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="route requests to edge nodes and the cloud tier")
    serve.add_argument("--backend", action="append", default=[], required=True,
                       metavar="HOST:PORT", help="an edge node or cloud replica (repeatable)")
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
    serve.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                       help=f"Prometheus /metrics port on --host (default {METRICS_PORT}, or "
                            "any free port if it is taken; 0: any free port)")
    serve.add_argument("--no-metrics", action="store_true", help="export no metrics")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from router.policy import PolicyConfig
    from router.server import RouterConfig, run_router
    from tandem.errors import TandemError
    from tandem.serving.grpc_server import ServerConfig
    from tandem.serving.metrics import MetricsConfig

    overrides: dict[str, Any] = {"cascade": args.cascade}
    if args.difficulty_threshold is not None:
        overrides["difficulty_threshold"] = args.difficulty_threshold
    if args.cascade_threshold is not None:
        overrides["cascade_threshold"] = args.cascade_threshold
    config = RouterConfig(
        backends=args.backend,
        server=ServerConfig(host=args.host, port=args.port),
        policy=dataclasses.replace(PolicyConfig(), **overrides),
        node_id=args.node_id,
        ready_timeout_s=args.ready_timeout,
    )
    try:
        asyncio.run(run_router(
            config, MetricsConfig.from_flags(args.metrics_port, METRICS_PORT, args.no_metrics)))
    except TandemError as e:
        # No healthy backend in time: one line, no traceback (a supervisor will restart us).
        logging.getLogger("tandem.router").error("router: %s", e.message)
        return 1
    return 0
