"""What the commands on the control plane's data directory share: the ``--data-dir`` flag, one
line per typed error, and how times are shown.

``tandem cloud`` (control_cmd.py), ``tandem model publish|versions`` (model_cmd.py),
``tandem rollout`` and ``tandem fed`` all work on the same directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path


def data_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                        help="the control plane's data directory (env TANDEM_CONTROL_DIR, "
                             "default ~/.tandem/control)")


def data_dir(args: argparse.Namespace) -> Path:
    from control.datadir import default_data_dir

    return args.data_dir.expanduser() if args.data_dir is not None else default_data_dir()


def guarded(action: Callable[[], int]) -> int:
    """Run ``action``; a typed error becomes one line on stderr and exit status 1."""
    from core.errors import TandemError
    from model.manifest import ArtifactIntegrityError

    try:
        return action()
    except TandemError as e:
        print(f"tandem: error: {e.message}", file=sys.stderr)
        return 1
    except ArtifactIntegrityError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 1


def when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    seconds = max(0.0, now - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"
