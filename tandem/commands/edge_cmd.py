"""``tandem edge``: run an edge node.

``serve`` serves one artifact as is; ``install`` enrolls the machine with a cloud's control
plane and fetches its model; ``run`` serves that model and keeps it in step with the cloud
(heartbeats, signed downloads, hot swap). Imports happen inside the command: ``tandem --help``
stays fast, and serving never imports torch (only ``--export-from`` does, through the exporter).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from tandem.commands.flags import add_metrics_flags

# Off the ports node_exporter (9100) and friends hold on the same hosts.
METRICS_PORT = 9192


def register(groups: Any) -> None:
    edge = groups.add_parser("edge", help="an edge node (ONNX Runtime on CPU)")
    sub = edge.add_subparsers(dest="command", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="serve an edge artifact over tandem.v1.Inference")
    serve.add_argument("--artifact", type=Path, required=True,
                       help="edge artifact directory (from `tandem model export`)")
    serve.add_argument("--export-from", type=Path, default=None, metavar="CHECKPOINT",
                       help="if --artifact does not exist, export this checkpoint there first")
    serve.add_argument("--quantization", choices=("int4", "int8", "fp32"), default="int4",
                       help="quantization for --export-from (default: int4)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50061)
    serve.add_argument("--node-id", default="edge-0")
    serve.add_argument("--max-concurrency", type=int, default=4,
                       help="sequences decoded in parallel")
    serve.add_argument("--max-queue", type=int, default=16,
                       help="requests that may wait for a slot; more are refused")
    serve.add_argument("--threads", type=int, default=None,
                       help="ONNX Runtime intra-op threads (default: one per core)")
    serve.add_argument("--grace", type=float, default=10.0,
                       help="seconds in-flight requests get to finish on shutdown")
    add_metrics_flags(serve, METRICS_PORT)
    serve.set_defaults(func=cmd_serve)

    install = sub.add_parser("install", help="enroll this machine as an edge node of a cloud")
    install.add_argument("--cloud", required=True, metavar="HOST:PORT",
                         help="the cloud's control service (`tandem cloud serve` prints it)")
    install.add_argument("--token", required=True,
                         help="a join token from `tandem cloud token create` (single use)")
    install.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                         help="node config and models (default: /var/lib/tandem-edge as root, "
                              "else ~/.tandem/edge)")
    install.add_argument("--no-systemd", action="store_true",
                         help="write tandem-edge.service into the data dir instead of "
                              "installing and starting it")
    install.add_argument("--host", default="127.0.0.1",
                         help="where `tandem edge run` listens (0.0.0.0: every interface)")
    install.add_argument("--port", type=int, default=50061, help="inference port")
    install.add_argument("--advertise", default=None, metavar="HOST:PORT",
                         help="where routers reach this node (default: --host:--port, or this "
                              "host's name for 0.0.0.0)")
    install.set_defaults(func=cmd_install)

    run = sub.add_parser("run", help="serve the enrolled node's model and keep it in sync")
    run.add_argument("--data-dir", type=Path, default=None, metavar="DIR",
                     help="as given to `tandem edge install`")
    run.add_argument("--max-concurrency", type=int, default=4,
                     help="sequences decoded in parallel")
    run.add_argument("--max-queue", type=int, default=16,
                     help="requests that may wait for a slot; more are refused")
    run.add_argument("--threads", type=int, default=None,
                     help="ONNX Runtime intra-op threads (default: one per core)")
    run.add_argument("--grace", type=float, default=10.0,
                     help="seconds in-flight requests get to finish on shutdown")
    add_metrics_flags(run, METRICS_PORT)
    run.add_argument("--heartbeat", type=float, default=5.0, metavar="SECONDS",
                     help="heartbeat period until the cloud sets one")
    run.add_argument("--report-every", type=float, default=15.0, metavar="SECONDS",
                     help="how often serving outcomes per version go to the cloud")
    fed = run.add_argument_group("federated learning (see `tandem fed`)")
    fed.add_argument("--superlink", default=None, metavar="HOST:PORT",
                     help="run a Flower SuperNode joining this SuperLink (the cloud's, "
                          "port 8000 by convention)")
    fed.add_argument("--fed-data", type=Path, default=None, metavar="DIR",
                     help="the site's training data (default DATA_DIR/federation; fill it "
                          "with `tandem fed site`)")
    fed.add_argument("--fed-port", type=int, default=9094, metavar="PORT",
                     help="the SuperNode's local runtime API port (0: any free port)")
    fed.add_argument("--fed-root-cert", type=Path, default=None, metavar="PEM",
                     help="CA certificate of a TLS SuperLink")
    fed.add_argument("--fed-auth-key", type=Path, default=None, metavar="PEM",
                     help="the SuperNode's private key, for a SuperLink that authenticates "
                          "nodes")
    run.set_defaults(func=cmd_run)


def cmd_serve(args: argparse.Namespace) -> int:
    from core.grpc_server import ServerConfig
    from core.metrics import MetricsConfig
    from edge.config import EdgeEngineConfig
    from edge.server import EdgeServerConfig, run_edge_server

    if not args.artifact.exists():
        if args.export_from is None:
            raise FileNotFoundError(
                f"no edge artifact at {args.artifact}; build one with `tandem model export "
                f"--out {args.artifact}` or pass --export-from CHECKPOINT"
            )
        _export(args.export_from, args.artifact, args.quantization)
    config = EdgeServerConfig(
        engine=EdgeEngineConfig(
            artifact_dir=args.artifact,
            node_id=args.node_id,
            max_concurrency=args.max_concurrency,
            max_queue=args.max_queue,
            threads=args.threads,
        ),
        server=ServerConfig(host=args.host, port=args.port, grace_s=args.grace),
        metrics=MetricsConfig.from_flags(args.metrics_port, METRICS_PORT, args.no_metrics),
    )
    asyncio.run(run_edge_server(config))
    return 0


def _data_dir(arg: Path | None) -> Path:
    from edge.agent.config import default_data_dir

    return arg if arg is not None else default_data_dir()


def cmd_install(args: argparse.Namespace) -> int:
    from edge.agent.client import ControlError
    from edge.agent.download import ArtifactRejected
    from edge.agent.install import InstallError, install, unit_hint

    data_dir = _data_dir(args.data_dir)
    try:
        result = asyncio.run(install(
            args.cloud, args.token, data_dir, args.no_systemd, host=args.host, port=args.port,
            advertise=args.advertise,
        ))
    except (InstallError, ArtifactRejected, ControlError) as e:
        print(f"tandem: install failed: {e}", file=sys.stderr)
        return 1
    node = result.node
    print(f"node {node.node_id} enrolled with {node.cloud}"
          + (" (kept its existing enrollment)" if result.kept_enrollment else ""))
    print(f"  config  {data_dir / 'node.json'}")
    print(f"  model   {node.current_version or 'none published yet'}")
    if result.unit_enabled:
        print(f"  service {result.unit_path} (enabled and started)")
    else:
        print(f"  service {result.unit_path}\n"
              f"start it now with:  tandem edge run --data-dir {data_dir}\n"
              f"or install it with: {unit_hint(result.unit_path)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from core.metrics import MetricsConfig
    from edge.agent.config import AgentConfig
    from edge.agent.run import NodeRunConfig, serve_node

    data_dir = _data_dir(args.data_dir)
    config = NodeRunConfig(
        agent=AgentConfig(data_dir=data_dir, heartbeat_s=args.heartbeat,
                          report_s=args.report_every),
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        threads=args.threads,
        grace_s=args.grace,
        metrics=MetricsConfig.from_flags(args.metrics_port, METRICS_PORT, args.no_metrics),
        supernode=_supernode_config(args, data_dir),
    )
    asyncio.run(serve_node(config))
    return 0


def _supernode_config(args: argparse.Namespace, data_dir: Path) -> Any:
    from core.launcher import free_port
    from federation.processes import FlowerTls, SuperNodeConfig

    if args.superlink is None:
        return None
    return SuperNodeConfig(
        superlink=args.superlink,
        data_path=(args.fed_data or data_dir / "federation").expanduser().resolve(),
        state_dir=data_dir.resolve() / "flower",
        port=args.fed_port or free_port(),
        tls=FlowerTls(ca_cert=args.fed_root_cert, supernode_key=args.fed_auth_key))


def _export(checkpoint: Path, out: Path, quantization: str) -> None:
    from model.checkpoint import checkpoint_version
    from model.export import export_edge_artifact

    print(f"exporting {checkpoint} to {out} ({quantization}) ...", flush=True)
    manifest = export_edge_artifact(
        checkpoint, out, quantization, base_version=checkpoint_version(checkpoint)
    )
    print(f"wrote {out}: {manifest.model_version}", flush=True)
