"""Command-line flags that several servers share."""

from __future__ import annotations

import argparse
import re


def add_metrics_flags(parser: argparse.ArgumentParser, default_port: int) -> None:
    """``--metrics-port`` and ``--no-metrics`` (read back with ``MetricsConfig.from_flags``)."""
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help=f"Prometheus /metrics port on --host (default {default_port}, or "
                             "any free port if it is taken; 0: any free port)")
    parser.add_argument("--no-metrics", action="store_true", help="export no metrics")


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``30m``, ``1h``, ``2d`` or a plain number of seconds."""
    match = _DURATION.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"duration must be a positive number with an optional unit s, m, h or d "
            f"(e.g. 30m, 1h, 2d), got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(|k|m|g|ki|mi|gi)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``512MiB``, ``4GiB``, ``2GB``, ``800M`` or a plain number of bytes."""
    match = _SIZE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"size must be a positive number with an optional unit (e.g. 512MiB, 4GiB, 2GB), "
            f"got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
