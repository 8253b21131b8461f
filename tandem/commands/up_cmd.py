"""``tandem up``: a whole Tandem on one machine — cloud tier, control plane with Flower's
SuperLink, edge nodes with their agents and SuperNodes, a router, Redis.

Each server runs as its own process (as in a deployment). The model is the shipped demo pair,
or with ``--model NAME`` a catalog model (a packaged one, e.g. smollm2-135m-instruct, is
imported on first use): the cloud tier serves it in full precision, and its edge artifact
(built once, with the model's recipe or the smallest within the quality budget) is published
to the control plane as the fleet's first version. Each
edge node is installed with a join token, serves what the control plane says and holds one
family of the demo corpus as its site data, so `tandem fed run` works at once. The router
learns the nodes from the control plane and logs cascade escalations into the nodes' site
data. Ctrl-C drains and stops everything, the router first.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def default_home() -> Path:
    return Path(os.environ.get("TANDEM_HOME", Path.home() / ".tandem"))


DEMO = "demo"
# The demo pair until a real model's first `tandem up` is measured end to end here; serve
# SmolLM2-135M-Instruct with --model smollm2-135m-instruct.
DEFAULT_MODEL = DEMO


def register(groups: Any) -> None:
    up = groups.add_parser("up", help="run cloud tier, two edge nodes and a router here")
    up.add_argument("--port", type=int, default=50050, help="router port")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--edges", type=int, default=2, help="number of edge nodes")
    up.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"catalog model to serve (default {DEFAULT_MODEL}; 'demo': the small "
                         "shipped pair)")
    up.add_argument("--quantization", default=None,
                    help="edge export recipe (default: the model's own; the demo's is int4)")
    up.add_argument("--home", type=Path, default=None,
                    help="where artifacts and logs go (env TANDEM_HOME, default ~/.tandem)")
    up.add_argument("--device", default="auto", help="the cloud tier's device")
    up.add_argument("--cascade", action="store_true", help="router cascade mode")
    up.add_argument("--redis-url", default=None,
                    help="use this Redis (default: start one for this run)")
    up.add_argument("--no-auth", action="store_true", help="serve without API keys")
    up.set_defaults(func=cmd_up)


def model_checkpoints(home: Path, model: str) -> tuple[Path, Path]:
    """The (cloud, edge-source) checkpoints of ``model``; a packaged model is imported once."""
    if model == DEMO:
        from model.demo import DEMO_DIR

        return DEMO_DIR / "cloud", DEMO_DIR / "edge"
    from model import catalog

    root = Path(os.environ["TANDEM_MODELS"]) if os.environ.get("TANDEM_MODELS") else (
        home / "models")
    try:
        path = catalog.model_dir(model, root)
    except catalog.CatalogError:
        if model not in catalog.PACKAGED:
            raise
        print(f"importing {model} into {root} (once) ...", flush=True)
        record = catalog.import_model(model, model, root)
        print(f"  {record.architecture}, {record.parameters / 1e6:.1f}M parameters, context "
              f"{record.context}", flush=True)
        path = catalog.model_dir(model, root)
    # One model, two tiers: the cloud serves the checkpoint, the edge a quantized export of it.
    return path, path


def ensure_edge_artifact(home: Path, checkpoint: Path, quantization: str | None) -> Path:
    """``checkpoint``'s edge artifact under ``home`` (built once, then reused)."""
    from model.checkpoint import checkpoint_version
    from model.manifest import ArtifactIntegrityError, read_manifest

    version = checkpoint_version(checkpoint)
    out = home / "artifacts" / f"{version}-{quantization or 'recipe'}"
    try:
        read_manifest(out)
        return out
    except (OSError, ValueError, ArtifactIntegrityError):
        pass
    from model.export import export_edge_artifact

    print(f"building the edge artifact {out.name} (once; a real model takes a minute or two: "
          "export, then perplexity against the source) ...", flush=True)
    start = time.monotonic()
    manifest = export_edge_artifact(checkpoint, out, quantization, base_version=version)
    print(f"  {manifest.quantization}, {manifest.total_size / 1e6:.0f} MB, "
          f"{time.monotonic() - start:.0f} s", flush=True)
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


SITE_FAMILIES = ("text", "numeric", "concurrency", "data", "net", "system", "devtools")


def _cli(*args: str) -> str:
    """Run a ``tandem`` command to completion; its stdout (raises with its output if it fails)."""
    import subprocess

    from core.launcher import tandem_argv

    done = subprocess.run(tandem_argv(*args), capture_output=True, text=True, timeout=300,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"tandem {' '.join(args[:3])} failed: "
                           f"{(done.stderr or done.stdout).strip()[-600:]}")
    return done.stdout


def _token(output: str, kind: str) -> str:
    import re

    match = re.search(rf"^{kind} token: (\S+)$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {kind} token in: {output}")
    return match.group(1)


def cmd_up(args: argparse.Namespace) -> int:
    from core.launcher import ManagedProcess, free_port, stop_all, tandem_argv
    from core.redis_server import RedisServer
    from edge.agent.config import read_node_config

    home = args.home or default_home()
    run_dir = home / "up" / time.strftime("%Y%m%d-%H%M%S")
    control_dir = run_dir / "control"
    try:
        cloud_checkpoint, edge_checkpoint = model_checkpoints(home, args.model)
        # A catalog model without a recipe of its own gets the smallest within the quality
        # budget (publish refuses more than 3% worse than the source).
        quantization = args.quantization or ("int4" if args.model == DEMO else "auto")
        artifact = ensure_edge_artifact(home, edge_checkpoint, quantization)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"tandem up: {e}", file=sys.stderr)
        return 1
    redis = None
    redis_url = args.redis_url
    procs: list[ManagedProcess] = []

    def server(name: str, *argv: str, port: int | None = None, enrolled: bool = False,
               env: dict[str, str] | None = None) -> ManagedProcess:
        # An enrolled edge node listens where it enrolled (node.json); the others take --port.
        port = port or free_port()
        listen = () if enrolled else ("--port", str(port))
        metrics = free_port()
        return ManagedProcess(
            name, tandem_argv(*argv, *listen, "--metrics-port", str(metrics)),
            run_dir / f"{name}.log", address=f"127.0.0.1:{port}",
            metrics_url=f"http://127.0.0.1:{metrics}/metrics", env=env)

    def start(process: ManagedProcess) -> ManagedProcess:
        procs.append(process)
        return process.start()

    # Federated learning needs Flower (the `federation` extra); without it the fleet runs
    # and serves all the same.
    federated = importlib.util.find_spec("flwr") is not None
    superlink = f"127.0.0.1:{free_port()}"
    fed_flags = ("--superlink-port", superlink.rsplit(":", 1)[1]) if federated else ()
    control = server("control", "cloud", "control", "serve", "--data-dir", str(control_dir),
                     "--heartbeat-interval", "2", *fed_flags, "--rollout-min-requests", "20",
                     "--rollout-min-duration", "60s", "--rollout-window", "5m")
    cloud = server("cloud", "cloud", "serve", "--device", args.device,
                   "--checkpoint", str(cloud_checkpoint))
    router_port = args.port
    try:
        if redis_url is None:
            redis = RedisServer(run_dir / "redis").start()
            redis_url = redis.url
        key = None if args.no_auth else create_demo_key(redis_url)
        start(control)
        start(cloud)
        control.wait_healthy(timeout_s=120)
        data = ("--data-dir", str(control_dir))
        _cli("model", "publish", str(artifact), *data)
        sites = run_dir / "sites"
        edges = []
        for i in range(1, args.edges + 1):
            node_dir, port = run_dir / f"edge-{i}", free_port()
            token = _token(_cli("cloud", "token", "create", *data), "join")
            _cli("edge", "install", "--cloud", control.address or "", "--token", token,
                 "--data-dir", str(node_dir), "--no-systemd", "--port", str(port))
            node = read_node_config(node_dir)
            assert node is not None
            # The site's data is named by node id: the router's escalation log finds it there.
            site = sites / node.node_id
            _cli("fed", "site", "--family", SITE_FAMILIES[(i - 1) % len(SITE_FAMILIES)],
                 "--data-path", str(site))
            node_fed = ("--superlink", superlink, "--fed-data", str(site),
                        "--fed-port", "0") if federated else ()
            edges.append(start(server(
                f"edge-{i}", "edge", "run", "--data-dir", str(node_dir), "--threads", "1",
                "--heartbeat", "2", *node_fed, port=port, enrolled=True)))
        router_token = _token(_cli("cloud", "token", "create", "--router", *data), "router")
        router_argv = ["router", "serve", "--host", args.host, "--backend", cloud.address or "",
                       "--control", control.address or "", "--discovery-interval", "2",
                       "--redis-url", redis_url, "--escalation-log", str(sites),
                       # Costs and context fits counted on the model's tokens (chat rendered).
                       "--tokenizer", str(edge_checkpoint)]
        router_argv += ["--cascade"] if args.cascade else []
        router_argv += ["--no-auth"] if args.no_auth else []
        for p in (cloud, *edges):
            p.wait_healthy(timeout_s=180)
        router = start(server("router", *router_argv, port=router_port,
                              env={"TANDEM_ROUTER_TOKEN": router_token}))
        router.wait_healthy(timeout_s=60)
        print(f"  redis    {redis_url}", flush=True)
        print(f"  flower   SuperLink {superlink}" if federated else
              "  flower   not installed: no federated learning (pip install "
              "'tandem[federation]')", flush=True)
        for p in procs:
            print(f"  {p.name:<8} {p.address}  metrics {p.metrics_url}  (log {p.log_path})",
                  flush=True)
        where = "" if args.port == 50050 else f" --address {args.host}:{args.port}"
        if args.model == DEMO:
            examples = (f"  tandem generate \"Return a new list\" --stream{where}\n"
                        f"  tandem generate \"Return a new list\" --route cloud{where}\n")
        else:
            ask = '--chat "What is the capital of France?"'
            examples = (f"  tandem generate {ask} --stream{where}\n"
                        f"  tandem generate {ask} --route edge{where}\n")
        auth = ("" if key is None else
                f"API key (shown once; create more with `tandem keys create`):\n"
                f"  export TANDEM_API_KEY={key}\n  export TANDEM_REDIS_URL={redis_url}\n")
        print(f"\nTandem is up. Router: {args.host}:{args.port}  (logs in {run_dir})\n{auth}"
              f"  export TANDEM_CONTROL_DIR={control_dir}\n"
              f"{examples}"
              f"  tandem fed run --rounds 3      # federated fine-tuning -> canary\n"
              f"  tandem rollout status\n"
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
