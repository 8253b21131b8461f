"""``tandem edge``: run an edge node.

Imports happen inside the command: ``tandem --help`` stays fast, and serving never imports
torch (only ``--export-from`` does, through the exporter).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

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
    serve.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                       help=f"Prometheus /metrics port on --host (default {METRICS_PORT}, or "
                            "any free port if it is taken; 0: any free port)")
    serve.add_argument("--no-metrics", action="store_true", help="export no metrics")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from edge.engine import EdgeEngineConfig
    from edge.server import EdgeServerConfig, run_edge_server
    from tandem.serving.grpc_server import ServerConfig
    from tandem.serving.metrics import MetricsConfig

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


def _export(checkpoint: Path, out: Path, quantization: str) -> None:
    from model.checkpoint import checkpoint_version
    from model.export import export_edge_artifact

    print(f"exporting {checkpoint} to {out} ({quantization}) ...", flush=True)
    manifest = export_edge_artifact(
        checkpoint, out, quantization, base_version=checkpoint_version(checkpoint)
    )
    print(f"wrote {out}: {manifest.model_version}", flush=True)
