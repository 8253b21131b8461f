"""Command-line flags that several servers share."""

from __future__ import annotations

import argparse


def add_metrics_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    """``--metrics-port`` and ``--no-metrics`` (read back with ``MetricsConfig.from_flags``)."""
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help=f"Prometheus /metrics port on --host (default {default_port}, or "
                             "any free port if it is taken; 0: any free port)")
    parser.add_argument("--no-metrics", action="store_true", help="export no metrics")
