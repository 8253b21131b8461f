"""``tandem cloud``: run the cloud tier."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from tandem.commands import control_cmd
from tandem.commands.flags import add_metrics_flags, parse_size

# Off the ports node_exporter (9100) and friends hold on the same hosts.
METRICS_PORT = 9191


def register(groups: Any) -> None:
    cloud = groups.add_parser("cloud", help="the cloud GPU tier")
    sub = cloud.add_subparsers(dest="command", metavar="ACTION", required=True)
    serve = sub.add_parser("serve", help="serve the full model with continuous batching")
    serve.add_argument("--checkpoint", type=Path, default=None,
                       help="checkpoint directory (default: the shipped demo cloud model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--node-id", default="cloud-0")
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    serve.add_argument("--dtype", default=None, help="float32, bfloat16 (default per device)")
    serve.add_argument("--slots", type=int, default=8, help="sequences decoded together")
    serve.add_argument("--max-queue", type=int, default=64)
    serve.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    serve.add_argument("--max-context", type=int, default=None,
                       help="cap the tokens a sequence may hold (default: the model's context)")
    serve.add_argument("--kv-cache-memory", type=parse_size, default=None,
                       help="KV cache budget, e.g. 4GiB (default: a share of free memory)")
    add_metrics_flags(serve, METRICS_PORT)
    serve.set_defaults(func=cmd_serve)
    control_cmd.register_cloud(sub)


def cmd_serve(args: argparse.Namespace) -> int:
    import torch

    from cloud.engine import CloudEngineConfig
    from cloud.scheduler import SchedulerConfig
    from cloud.server import CloudServerConfig, run_cloud_server
    from core.grpc_server import ServerConfig
    from core.metrics import MetricsConfig
    from model.demo import DEMO_DIR

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    config = CloudServerConfig(
        engine=CloudEngineConfig(
            checkpoint=args.checkpoint or DEMO_DIR / "cloud",
            node_id=args.node_id,
            device=device,
            dtype=args.dtype,
            scheduler=SchedulerConfig(slots=args.slots, max_queue=args.max_queue),
            threads=args.threads,
            max_context=args.max_context,
            kv_cache_bytes=args.kv_cache_memory,
        ),
        server=ServerConfig(host=args.host, port=args.port),
        metrics=MetricsConfig.from_flags(args.metrics_port, METRICS_PORT, args.no_metrics),
    )
    asyncio.run(run_cloud_server(config))
    return 0
