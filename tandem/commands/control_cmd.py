"""The control plane's commands in the ``tandem cloud`` group (via ``register_cloud``):

``tandem cloud control serve``, ``tandem cloud token create|list|revoke`` and ``tandem cloud
nodes``. Each works on a data directory (``--data-dir``, env TANDEM_CONTROL_DIR, default
~/.tandem/control) on the host that runs the control plane; several commands may use it at once.
``tandem model publish|versions`` use the same directory and live in model_cmd.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from tandem.commands.control_dir import ago, data_dir, data_dir_flag, guarded, when
from tandem.commands.flags import add_metrics_flags, parse_duration

# Beside the cloud tier's 50051; edge nodes and their installers dial it.
DEFAULT_PORT = 50052
# Off the ports the cloud tier (9191) and edge nodes (9192) export metrics on.
METRICS_PORT = 9193








def register_cloud(sub: Any) -> None:
    """Add ``control``, ``token`` and ``nodes`` to the ``tandem cloud`` subcommands."""
    control = sub.add_parser("control", help="the control plane for edge nodes")
    control_sub = control.add_subparsers(dest="control_command", metavar="ACTION",
                                         required=True)
    serve = control_sub.add_parser("serve", help="serve enrollment, heartbeats and artifacts")
    data_dir_flag(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0 for edge nodes on other hosts)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--heartbeat-interval", type=parse_duration, default=5.0,
                       metavar="DURATION", help="how often nodes report (default 5s)")
    serve.add_argument("--grace", type=float, default=10.0,
                       help="seconds in-flight downloads get to finish on shutdown")
    add_metrics_flags(serve, METRICS_PORT)
    fed = serve.add_argument_group("federated learning (see `tandem fed`)")
    fed.add_argument("--superlink-port", type=int, default=None, metavar="PORT",
                     help="start Flower's SuperLink on PORT (8000 by convention) beside the "
                          "control plane; SuperNodes and `tandem fed run` dial it")
    fed.add_argument("--superlink-host", default=None, metavar="HOST",
                     help="address the SuperLink listens on (default: --host)")
    fed.add_argument("--fed-ca-cert", type=Path, default=None, metavar="PEM",
                     help="serve the SuperLink with TLS: the CA certificate nodes trust...")
    fed.add_argument("--fed-cert", type=Path, default=None, metavar="PEM",
                     help="...the SuperLink's certificate (SAN: the address nodes dial)...")
    fed.add_argument("--fed-key", type=Path, default=None, metavar="PEM",
                     help="...and its private key")
    fed.add_argument("--fed-node-auth", action="store_true",
                     help="accept only SuperNodes registered with `flwr supernode register` "
                          "(needs TLS)")
    canary = serve.add_argument_group("canary rollouts (see `tandem rollout`)")
    canary.add_argument("--rollout-window", type=parse_duration, default=600.0,
                        metavar="DURATION", help="outcomes compared over the last (default 10m)")
    canary.add_argument("--rollout-min-requests", type=int, default=100, metavar="N",
                        help="requests each side needs in the window before a verdict "
                             "(default 100)")
    canary.add_argument("--rollout-min-duration", type=parse_duration, default=120.0,
                        metavar="DURATION", help="promote no sooner than this (default 2m)")
    canary.add_argument("--rollout-load-timeout", type=parse_duration, default=300.0,
                        metavar="DURATION", help="canaries not serving the version by then "
                                                 "roll it back (default 5m)")
    canary.add_argument("--rollout-interval", type=parse_duration, default=10.0,
                        metavar="DURATION", help="how often rollouts are judged (default 10s)")
    canary.add_argument("--no-auto-rollout", action="store_true",
                        help="only judge; an operator promotes or aborts")
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="join tokens that let an edge node enroll")
    token_sub = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    create = token_sub.add_parser("create", help="make a single-use join token, or a router "
                                                 "token with --router (shown once)")
    data_dir_flag(create)
    create.add_argument("--ttl", type=parse_duration, default=3600.0, metavar="DURATION",
                        help="how long the join token stays valid: 30m, 1h, 2d (default 1h)")
    create.add_argument("--router", action="store_true",
                        help="a router token instead: lets `tandem router serve --control` "
                             "list the edge nodes; valid until revoked")
    create.add_argument("--note", default="", help="what the token is for (shown in lists)")
    create.set_defaults(func=cmd_token_create)
    listing = token_sub.add_parser("list", help="show join and router tokens (never their "
                                                "secrets)")
    data_dir_flag(listing)
    listing.set_defaults(func=cmd_token_list)
    revoke = token_sub.add_parser("revoke", help="revoke a router token")
    revoke.add_argument("token_id", metavar="TOKEN_ID", help="as `tandem cloud token list` shows")
    data_dir_flag(revoke)
    revoke.set_defaults(func=cmd_token_revoke)

    nodes = sub.add_parser("nodes", help="show enrolled edge nodes and what they serve")
    data_dir_flag(nodes)
    nodes.add_argument("--json", action="store_true", help="machine-readable output")
    nodes.set_defaults(func=cmd_nodes)








def cmd_serve(args: argparse.Namespace) -> int:
    from control.config import ControlConfig
    from control.rollout import RolloutConfig
    from control.server import run_control_server
    from core.grpc_server import ServerConfig
    from core.metrics import MetricsConfig

    config = ControlConfig(
        data_dir=data_dir(args),
        server=ServerConfig(host=args.host, port=args.port, grace_s=args.grace),
        heartbeat_interval_s=args.heartbeat_interval,
        metrics=MetricsConfig.from_flags(args.metrics_port, METRICS_PORT, args.no_metrics),
    )
    rollout = RolloutConfig(
        window_s=args.rollout_window, min_requests=args.rollout_min_requests,
        min_duration_s=args.rollout_min_duration, load_timeout_s=args.rollout_load_timeout,
        tick_interval_s=args.rollout_interval, auto_decide=not args.no_auto_rollout,
        # Live as the fleet metrics and ListNodes count it: heard from in three heartbeats.
        node_stale_s=3 * args.heartbeat_interval,
    )
    superlink = _superlink_config(args)

    async def serve() -> None:
        if superlink is None:
            await run_control_server(config, rollout)
            return
        from federation.superlink import supervised_superlink

        # The SuperLink outlives the control plane's drain: a run in flight can still publish.
        async with supervised_superlink(superlink, config.data_dir):
            await run_control_server(config, rollout)

    asyncio.run(serve())
    return 0


def _superlink_config(args: argparse.Namespace) -> Any:
    from federation.processes import FlowerTls, SuperLinkConfig

    if args.superlink_port is None:
        return None
    tls = FlowerTls(ca_cert=args.fed_ca_cert, server_cert=args.fed_cert,
                    server_key=args.fed_key, supernode_auth=args.fed_node_auth)
    return SuperLinkConfig(state_dir=data_dir(args).resolve() / "flower" / "superlink",
                           host=args.superlink_host or args.host, port=args.superlink_port,
                           tls=tls)


def cmd_token_create(args: argparse.Namespace) -> int:
    from control.credentials import parse_join_token
    from control.datadir import ControlData

    if args.router:
        return _router_token_create(args)
    with ControlData.open(data_dir(args)) as data:
        token = data.store.create_join_token(args.ttl, note=args.note)
    parsed = parse_join_token(token)
    token_id = parsed[0] if parsed else "?"
    print(f"join token: {token}")
    print(f"token id:   {token_id}   expires {when(time.time() + args.ttl)} "
          f"(single use)")
    print("It is shown once and cannot be recovered. On the new edge node run:")
    print(f"  tandem edge install --cloud CONTROL_HOST:{DEFAULT_PORT} --token {token}")
    return 0


def _router_token_create(args: argparse.Namespace) -> int:
    from control.router_tokens import RouterTokens

    root = data_dir(args)
    token = RouterTokens(root).create(note=args.note)
    print(f"router token: {token}")
    print("It is shown once and cannot be recovered; it stays valid until "
          "`tandem cloud token revoke ID`. On the router host run:")
    print(f"  TANDEM_ROUTER_TOKEN={token} tandem router serve "
          f"--control CONTROL_HOST:{DEFAULT_PORT} [--backend CLOUD_HOST:50051]")
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from control.datadir import ControlData
    from control.router_tokens import RouterTokens

    with ControlData.open(data_dir(args)) as data:
        tokens = data.store.join_tokens()
    routers = RouterTokens(data_dir(args)).tokens()
    now = time.time()
    print(f"{'TOKEN ID':<18} {'KIND':<7} {'CREATED':<20} {'STATE':<34} NOTE")
    for t in tokens:
        if t.used_at is not None:
            state = f"used by {t.used_by} {ago(t.used_at, now)}"
        elif t.expires_at <= now:
            state = "expired"
        else:
            state = f"valid until {when(t.expires_at)}"
        print(f"{t.token_id:<18} {'join':<7} {when(t.created_at):<20} {state:<34} {t.note}")
    for r in routers:
        print(f"{r.token_id:<18} {'router':<7} {when(r.created_at):<20} "
              f"{'valid until revoked':<34} {r.note}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from control.router_tokens import RouterTokens

    def revoke() -> int:
        RouterTokens(data_dir(args)).revoke(args.token_id)
        print(f"revoked router token {args.token_id}: routers using it are refused from their "
              "next poll")
        return 0

    return guarded(revoke)


def cmd_nodes(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from control.datadir import ControlData

    with ControlData.open(data_dir(args)) as data:
        nodes = data.store.nodes()
    if args.json:
        print(json.dumps([asdict(n) for n in nodes], indent=2))
        return 0
    now = time.time()
    print(f"{'NODE':<16} {'ADDRESS':<22} {'SERVES':<30} {'DESIRED':<30} {'HEALTH':<9} HEARD")
    for n in nodes:
        health = "healthy" if n.healthy else "unhealthy"
        print(f"{n.node_id:<16} {n.inference_address:<22} {n.served_version or '-':<30} "
              f"{n.desired_version or '-':<30} {health:<9} {ago(n.last_heartbeat, now)}")
    return 0
