"""``tandem up``: a whole Tandem on one machine — cloud tier, two edge nodes, a router.

Each server runs as its own process (as in a deployment), started with the demo model pair;
the edge artifact is built once from the shipped edge checkpoint when it is missing. Ctrl-C
drains and stops everything, the router first.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def default_home() -> Path:
    return Path(os.environ.get("TANDEM_HOME", Path.home() / ".tandem"))


def register(groups: Any) -> None:
    up = groups.add_parser("up", help="run cloud tier, two edge nodes and a router here")
    up.add_argument("--port", type=int, default=50050, help="router port")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--edges", type=int, default=2, help="number of edge nodes")
    up.add_argument("--quantization", choices=("int4", "int8", "fp32"), default="int4")
    up.add_argument("--home", type=Path, default=None,
                    help="where artifacts and logs go (env TANDEM_HOME, default ~/.tandem)")
    up.add_argument("--device", default="auto", help="the cloud tier's device")
    up.add_argument("--cascade", action="store_true", help="router cascade mode")
    up.set_defaults(func=cmd_up)


def ensure_edge_artifact(home: Path, quantization: str) -> Path:
    """The shipped edge model as an artifact under ``home`` (built once, then reused)."""
    from model.checkpoint import checkpoint_version
    from model.demo import DEMO_DIR
    from model.manifest import ArtifactIntegrityError, read_manifest

    checkpoint = DEMO_DIR / "edge"
    version = checkpoint_version(checkpoint)
    out = home / "artifacts" / f"{version}-{quantization}"
    try:
        read_manifest(out)
        return out
    except (OSError, ValueError, ArtifactIntegrityError):
        pass
    from model.export import export_edge_artifact

    print(f"building the edge artifact {out.name} (once) ...", flush=True)
    export_edge_artifact(checkpoint, out, quantization, base_version=version)
    return out


def cmd_up(args: argparse.Namespace) -> int:
    from tandem.launcher import ManagedProcess, free_port, stop_all, tandem_argv

    home = args.home or default_home()
    run_dir = home / "up" / time.strftime("%Y%m%d-%H%M%S")
    artifact = ensure_edge_artifact(home, args.quantization)
    cloud_port = free_port()
    procs: list[ManagedProcess] = [ManagedProcess(
        "cloud", tandem_argv("cloud", "serve", "--port", str(cloud_port), "--device", args.device),
        run_dir / "cloud.log", address=f"127.0.0.1:{cloud_port}",
    )]
    for i in range(1, args.edges + 1):
        port = free_port()
        procs.append(ManagedProcess(
            f"edge-{i}",
            tandem_argv("edge", "serve", "--artifact", str(artifact), "--port", str(port),
                        "--node-id", f"edge-{i}", "--threads", "1"),
            run_dir / f"edge-{i}.log", address=f"127.0.0.1:{port}",
        ))
    backends = [arg for p in procs for arg in ("--backend", p.address or "")]
    router_cmd = ["router", "serve", "--host", args.host, "--port", str(args.port), *backends]
    if args.cascade:
        router_cmd.append("--cascade")
    router = ManagedProcess("router", tandem_argv(*router_cmd), run_dir / "router.log",
                            address=f"127.0.0.1:{args.port}")
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_healthy(timeout_s=180)
            print(f"  {p.name:<8} {p.address}  (log {p.log_path})", flush=True)
        procs.append(router.start())
        router.wait_healthy(timeout_s=60)
        where = "" if args.port == 50050 else f" --address {args.host}:{args.port}"
        print(f"\nTandem is up. Router: {args.host}:{args.port}  (logs in {run_dir})\n"
              f"  tandem generate \"Return a new list\" --stream{where}\n"
              f"  tandem generate \"Return a new list\" --route cloud{where}\n"
              f"Press Ctrl-C to stop.", flush=True)
        # Children run in their own sessions: the terminal's Ctrl-C reaches only this process,
        # which then drains them in order.
        signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        signal.sigwait(signals)
        return 0
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"tandem up: {e}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping ...", flush=True)
        stop_all(procs)
        print("stopped.", flush=True)

