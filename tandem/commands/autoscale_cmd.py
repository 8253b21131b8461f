"""``tandem autoscale``: publish the cloud replicas the forecast load needs."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path
from typing import Any

from tandem.commands.flags import add_metrics_flags

# Next to the router (9190), cloud (9191), edge (9192) and control plane (9193).
METRICS_PORT = 9194


def register(groups: Any) -> None:
    from autoscale.forecast import DEFAULT_MODEL, MODELS
    from autoscale.recommender import DEFAULT_CAPACITY_RPS

    group = groups.add_parser("autoscale", help="forecast load and publish desired cloud "
                              "replicas")
    sub = group.add_subparsers(dest="command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="scrape routers, forecast, and serve "
                         "tandem_desired_cloud_replicas for a HorizontalPodAutoscaler")
    run.add_argument("--router-metrics", action="append", metavar="URL", default=None,
                     help="a router's /metrics URL (repeatable; env TANDEM_ROUTER_METRICS, "
                          "comma-separated)")
    run.add_argument("--resolve-all", action="store_true",
                     help="scrape every address the URL's host resolves to (a headless "
                          "Service of router pods)")
    run.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS),
                     help=f"forecast model (default {DEFAULT_MODEL}, the best in backtests)")
    run.add_argument("--capacity", type=float, default=DEFAULT_CAPACITY_RPS, metavar="REQ_S",
                     help="requests/s one cloud replica serves at saturation, as measured by "
                          f"benchmarks/serving.py (default {DEFAULT_CAPACITY_RPS:g}: one H100)")
    run.add_argument("--headroom", type=float, default=0.2,
                     help="capacity kept above the load (default 0.2)")
    run.add_argument("--min-replicas", type=int, default=1)
    run.add_argument("--max-replicas", type=int, default=16)
    run.add_argument("--cooloff", type=float, default=600.0, metavar="SECONDS",
                     help="scale down only after the load has asked for fewer replicas this "
                          "long (default 600)")
    run.add_argument("--interval", type=float, default=15.0, metavar="SECONDS",
                     help="scrape and decide every (default 15)")
    run.add_argument("--step", type=float, default=300.0, metavar="SECONDS",
                     help="one point of the forecast's history (default 300)")
    run.add_argument("--horizon", type=float, default=900.0, metavar="SECONDS",
                     help="how far ahead to forecast (default 900)")
    run.add_argument("--season", type=float, default=86_400.0, metavar="SECONDS",
                     help="the traffic's period (default one day)")
    run.add_argument("--history-file", type=Path, default=None,
                     help="keep the rate history here across restarts")
    run.add_argument("--host", default="127.0.0.1", help="where /metrics listens")
    add_metrics_flags(run, METRICS_PORT)
    run.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from autoscale.autoscaler import run_autoscaler
    from autoscale.config import AutoscaleConfig
    from autoscale.recommender import ReplicaPolicy
    from core.metrics import MetricsConfig

    urls = args.router_metrics or [
        u.strip() for u in os.environ.get("TANDEM_ROUTER_METRICS", "").split(",") if u.strip()]
    if args.no_metrics:
        raise ValueError("the autoscaler's output is its metrics: drop --no-metrics")
    config = AutoscaleConfig(
        router_metrics=tuple(urls),
        resolve_all=args.resolve_all,
        interval_s=args.interval,
        step_s=args.step,
        horizon_s=args.horizon,
        season_s=args.season,
        model=args.model,
        history_file=args.history_file,
        policy=ReplicaPolicy(capacity_rps=args.capacity, headroom=args.headroom,
                             min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                             scale_down_cooloff_s=args.cooloff),
        host=args.host,
        metrics=MetricsConfig.from_flags(args.metrics_port, METRICS_PORT, False),
    )
    stop = threading.Event()
    # SIGTERM (Kubernetes, systemd) ends the loop; the history is saved on the way out.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    run_autoscaler(config, stop)
    return 0
