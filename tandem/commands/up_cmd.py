"""``tandem up``: a whole Tandem on one machine — cloud tier, two edge nodes, a router, Redis.

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
    up.add_argument("--redis-url", default=None,
                    help="use this Redis (default: start one for this run)")
    up.add_argument("--no-auth", action="store_true", help="serve without API keys")
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


def create_demo_key(redis_url: str) -> str:
    """A fresh API key named "demo" (standard tier, every route); returns the secret."""
    import asyncio

    from router.keys import KeyStore
    from router.ratelimit import redis_client

    async def create() -> str:
        client = redis_client(redis_url, timeout_s=2.0)
        try:
            _, secret = await KeyStore(client).create("demo", tier="standard")
            return secret
        finally:
            await client.aclose()

    return asyncio.run(create())


def cmd_up(args: argparse.Namespace) -> int:
    from tandem.launcher import ManagedProcess, free_port, stop_all, tandem_argv
    from tandem.redis_server import RedisServer

    home = args.home or default_home()
    run_dir = home / "up" / time.strftime("%Y%m%d-%H%M%S")
    artifact = ensure_edge_artifact(home, args.quantization)
    redis = None
    redis_url = args.redis_url
    if redis_url is None:
        redis = RedisServer(run_dir / "redis").start()
        redis_url = redis.url

    def server(name: str, *argv: str) -> ManagedProcess:
        port, metrics = free_port(), free_port()
        return ManagedProcess(
            name, tandem_argv(*argv, "--port", str(port), "--metrics-port", str(metrics)),
            run_dir / f"{name}.log", address=f"127.0.0.1:{port}",
            metrics_url=f"http://127.0.0.1:{metrics}/metrics",
        )

    procs = [server("cloud", "cloud", "serve", "--device", args.device)]
    procs += [server(f"edge-{i}", "edge", "serve", "--artifact", str(artifact), "--node-id",
                     f"edge-{i}", "--threads", "1") for i in range(1, args.edges + 1)]
    backends = [arg for p in procs for arg in ("--backend", p.address or "")]
    router_argv = ["router", "serve", "--host", args.host, *backends, "--redis-url", redis_url]
    router_argv += ["--cascade"] if args.cascade else []
    router_argv += ["--no-auth"] if args.no_auth else []
    metrics_port = free_port()
    router = ManagedProcess(
        "router", tandem_argv(*router_argv, "--port", str(args.port), "--metrics-port",
                              str(metrics_port)),
        run_dir / "router.log", address=f"127.0.0.1:{args.port}",
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
    )
    try:
        key = None if args.no_auth else create_demo_key(redis_url)
        for p in procs:
            p.start()
        for p in procs:
            p.wait_healthy(timeout_s=180)
        procs.append(router.start())
        router.wait_healthy(timeout_s=60)
        print(f"  redis    {redis_url}", flush=True)
        for p in procs:
            print(f"  {p.name:<8} {p.address}  metrics {p.metrics_url}  (log {p.log_path})",
                  flush=True)
        where = "" if args.port == 50050 else f" --address {args.host}:{args.port}"
        auth = ("" if key is None else
                f"API key (shown once; create more with `tandem keys create`):\n"
                f"  export TANDEM_API_KEY={key}\n  export TANDEM_REDIS_URL={redis_url}\n")
        print(f"\nTandem is up. Router: {args.host}:{args.port}  (logs in {run_dir})\n{auth}"
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
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"tandem up: {e}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping ...", flush=True)
        stop_all(procs)
        if redis is not None:
            redis.stop()
        print("stopped.", flush=True)
