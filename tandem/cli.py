"""The ``tandem`` command line. Each command group lives in its own module and registers here."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tandem import __version__
from tandem.commands import (
    autoscale_cmd,
    cloud_cmd,
    edge_cmd,
    fed_cmd,
    generate_cmd,
    keys_cmd,
    model_cmd,
    rollout_cmd,
    router_cmd,
    up_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem", description="Serve one LLM across a cloud GPU tier and CPU edge nodes."
    )
    parser.add_argument("--version", action="version", version=f"tandem {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    model_cmd.register(groups)
    cloud_cmd.register(groups)
    edge_cmd.register(groups)
    router_cmd.register(groups)
    keys_cmd.register(groups)
    rollout_cmd.register(groups)
    fed_cmd.register(groups)
    up_cmd.register(groups)
    generate_cmd.register(groups)
    autoscale_cmd.register(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:
        # User errors: one line, no traceback.
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
