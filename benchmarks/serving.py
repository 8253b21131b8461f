"""Replay the Azure LLM inference trace open-loop against the cloud tier alone and the hybrid stack.

Both targets run on the same processes of one run: a cloud tier, N edge nodes and a router
(started as `tandem up` does). For each load level the trace's arrival process is rescaled to
that mean rate (its burstiness kept) and replayed for a fixed time against (a) the cloud tier
directly and (b) the router. Token counts come from the trace, scaled into the demo model's
512-token context; prompt text is real held-out corpus text of that many tokens.

Reports per target and level: throughput, error rate by status, p50/p99 time to first token
and end-to-end latency, and the share served by each tier.

    python benchmarks/serving.py --levels 0.5,1,2,4 --duration 20          # 2-core machine
    python benchmarks/serving.py --levels 10,40,160,640 --duration 30 \
        --device cuda --cloud-slots 256 --edges 4 \
        --cpus 'cloud=0-3;edge=4-11;router=12-13;client=14-15'
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import os
import platform
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from core.launcher import ManagedProcess, free_port, stop_all, tandem_argv
from protos.tandem.v1 import inference_pb2 as pb
from protos.tandem.v1 import inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
TRACE_DIR = Path(
    os.environ.get(
        "TANDEM_TRACE_DIR", ROOT.parent / "shared" / "data" / "traces" / "azure_llm_2023"
    )
)
TIERS = {pb.TIER_EDGE: "edge", pb.TIER_CLOUD: "cloud"}
log = logging.getLogger("serving-bench")


@dataclass(frozen=True)
class TraceRequest:
    offset_s: float  # arrival, seconds after the first request of the window
    prompt_tokens: int
    output_tokens: int


@dataclass
class Outcome:
    sent_at: float
    status: str = "OK"
    ttft_s: float | None = None
    e2e_s: float | None = None
    tier: str = ""
    output_tokens: int = 0


@dataclass
class LevelResult:
    target: str
    rate: float
    sent: int
    ok: int
    errors: dict[str, int] = field(default_factory=dict)
    throughput_rps: float = 0.0
    output_tokens_per_s: float = 0.0
    ttft_p50_ms: float = float("nan")
    ttft_p99_ms: float = float("nan")
    e2e_p50_ms: float = float("nan")
    e2e_p99_ms: float = float("nan")
    share: dict[str, float] = field(default_factory=dict)
    max_concurrency: int = 0


def load_trace(name: str, prompt_scale: float, output_scale: float) -> list[TraceRequest]:
    """Arrivals and token counts of the trace, lengths scaled into the demo context."""
    path = TRACE_DIR / f"AzureLLMInferenceTrace_{name}.csv"
    rows = list(csv.DictReader(path.open()))

    def seconds(ts: str) -> float:
        hms = ts.split(" ")[1]
        h, m, s = hms.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    t0 = seconds(rows[0]["TIMESTAMP"])
    return [
        TraceRequest(
            offset_s=seconds(r["TIMESTAMP"]) - t0,
            prompt_tokens=min(320, max(8, round(int(r["ContextTokens"]) * prompt_scale))),
            output_tokens=min(160, max(4, round(int(r["GeneratedTokens"]) * output_scale))),
        )
        for r in rows
    ]


def window(
    trace: list[TraceRequest], rate: float, duration_s: float, start_s: float
) -> list[TraceRequest]:
    """The trace from ``start_s`` on, its arrivals rescaled to mean ``rate`` req/s, cut to
    ``duration_s`` (the first minutes of the trace are sparse, hence the offset)."""
    native_rate = len(trace) / trace[-1].offset_s
    factor = native_rate / rate
    out = []
    for r in trace:
        if r.offset_s < start_s:
            continue
        t = (r.offset_s - start_s) * factor
        if t > duration_s:
            break
        out.append(TraceRequest(t, r.prompt_tokens, r.output_tokens))
    return out


class PromptBank:
    """Held-out corpus text cut to a requested number of tokens."""

    def __init__(self, seed: int = 0) -> None:
        from model.corpus import load_corpus
        from model.demo import DEMO_DIR
        from model.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.from_dir(DEMO_DIR / "edge")
        corpus = load_corpus()
        self.stream: list[int] = []
        for text in corpus.texts(split="heldout"):
            self.stream += self.tokenizer.encode(text, add_bos=False)
        self.rng = random.Random(seed)

    def prompt(self, tokens: int) -> str:
        start = self.rng.randrange(0, len(self.stream) - tokens)
        return self.tokenizer.decode(self.stream[start : start + tokens]).strip() or "Return"


async def one_request(
    stub: inference_pb2_grpc.InferenceStub,
    prompt: str,
    max_tokens: int,
    timeout_s: float,
    outcome: Outcome,
) -> None:
    req = pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0, no_cache=True)
    start = time.perf_counter()
    try:
        async for chunk in stub.GenerateStream(req, timeout=timeout_s):
            if outcome.ttft_s is None and chunk.token_ids:
                outcome.ttft_s = time.perf_counter() - start
            if chunk.HasField("served_by"):
                outcome.tier = TIERS.get(chunk.served_by.tier, "?")
            outcome.output_tokens += len(chunk.token_ids)
        outcome.e2e_s = time.perf_counter() - start
    except grpc.aio.AioRpcError as e:
        outcome.status = e.code().name


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_level(
    target: str,
    address: str,
    requests: list[TraceRequest],
    rate: float,
    bank: PromptBank,
    timeout_s: float,
    channels: int,
) -> LevelResult:
    chans = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    stubs = [inference_pb2_grpc.InferenceStub(c) for c in chans]
    prompts = [bank.prompt(r.prompt_tokens) for r in requests]
    outcomes: list[Outcome] = []
    tasks = []
    in_flight = peak = 0

    async def tracked(i: int, r: TraceRequest, o: Outcome) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await one_request(stubs[i % channels], prompts[i], r.output_tokens, timeout_s, o)
        finally:
            in_flight -= 1

    start = time.perf_counter()
    for i, r in enumerate(requests):
        delay = start + r.offset_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        o = Outcome(sent_at=time.perf_counter() - start)
        outcomes.append(o)
        tasks.append(asyncio.create_task(tracked(i, r, o)))
    await asyncio.gather(*tasks)
    # Over the offered window at least, so a short burst does not read as a huge rate.
    elapsed = max(time.perf_counter() - start, requests[-1].offset_s if requests else 0.0)
    for c in chans:
        await c.close()

    ok = [o for o in outcomes if o.status == "OK"]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.status != "OK":
            errors[o.status] = errors.get(o.status, 0) + 1
    tiers: dict[str, int] = {}
    for o in ok:
        tiers[o.tier] = tiers.get(o.tier, 0) + 1
    return LevelResult(
        target=target,
        rate=rate,
        sent=len(outcomes),
        ok=len(ok),
        errors=errors,
        throughput_rps=len(ok) / elapsed,
        output_tokens_per_s=sum(o.output_tokens for o in ok) / elapsed,
        ttft_p50_ms=percentile([o.ttft_s * 1e3 for o in ok if o.ttft_s], 0.5),
        ttft_p99_ms=percentile([o.ttft_s * 1e3 for o in ok if o.ttft_s], 0.99),
        e2e_p50_ms=percentile([o.e2e_s * 1e3 for o in ok if o.e2e_s], 0.5),
        e2e_p99_ms=percentile([o.e2e_s * 1e3 for o in ok if o.e2e_s], 0.99),
        share={k: round(v / max(1, len(ok)), 3) for k, v in sorted(tiers.items())},
        max_concurrency=peak,
    )


def parse_cpus(spec: str) -> dict[str, list[int]]:
    """'cloud=0-3;edge=4-7;router=8;client=9-11' -> {'cloud': [0, 1, 2, 3], ...}."""
    out: dict[str, list[int]] = {}
    for part in filter(None, spec.split(";")):
        name, ranges = part.split("=")
        cpus: list[int] = []
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            cpus += list(range(int(lo), int(hi or lo) + 1))
        out[name.strip()] = cpus
    return out


def start_stack(args: argparse.Namespace, home: Path) -> tuple[list[ManagedProcess], str, str]:
    from tandem.commands.up_cmd import ensure_edge_artifact

    cpus = parse_cpus(args.cpus)
    artifact = ensure_edge_artifact(home, args.quantization)
    procs = []
    cloud_port = free_port()
    cloud = ManagedProcess(
        "cloud",
        tandem_argv(
            "cloud",
            "serve",
            "--port",
            str(cloud_port),
            "--device",
            args.device,
            "--slots",
            str(args.cloud_slots),
            "--max-queue",
            str(args.cloud_queue),
        ),
        home / "cloud.log",
        address=f"127.0.0.1:{cloud_port}",
        cpus=cpus.get("cloud"),
    )
    procs.append(cloud)
    edge_cpus = cpus.get("edge")
    per_edge = len(edge_cpus) // args.edges if edge_cpus else 0
    for i in range(args.edges):
        port = free_port()
        mine = edge_cpus[i * per_edge : (i + 1) * per_edge] if per_edge else None
        procs.append(
            ManagedProcess(
                f"edge-{i + 1}",
                tandem_argv(
                    "edge",
                    "serve",
                    "--artifact",
                    str(artifact),
                    "--port",
                    str(port),
                    "--node-id",
                    f"edge-{i + 1}",
                    "--threads",
                    str(max(1, per_edge)),
                    "--max-concurrency",
                    str(args.edge_concurrency),
                ),
                home / f"edge-{i + 1}.log",
                address=f"127.0.0.1:{port}",
                cpus=mine,
            )
        )
    for p in procs:
        p.start()
    for p in procs:
        p.wait_healthy(300)
    router_port = free_port()
    backends = [a for p in procs for a in ("--backend", p.address or "")]
    router = ManagedProcess(
        "router",
        tandem_argv("router", "serve", "--port", str(router_port), *backends),
        home / "router.log",
        address=f"127.0.0.1:{router_port}",
        cpus=cpus.get("router"),
    )
    procs.append(router.start())
    router.wait_healthy(120)
    if cpus.get("client"):
        os.sched_setaffinity(0, cpus["client"])
    return procs, cloud.address or "", router.address or ""


def table(results: list[LevelResult]) -> str:
    lines = [
        "| target | offered req/s | sent | ok | errors | ok req/s | out tok/s | TTFT p50 / p99 ms "
        "| e2e p50 / p99 ms | share edge / cloud | peak streams |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        errs = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0"
        lines.append(
            f"| {r.target} | {r.rate:g} | {r.sent} | {r.ok} | {errs} | {r.throughput_rps:.2f} | "
            f"{r.output_tokens_per_s:.0f} | {r.ttft_p50_ms:.0f} / {r.ttft_p99_ms:.0f} | "
            f"{r.e2e_p50_ms:.0f} / {r.e2e_p99_ms:.0f} | {r.share.get('edge', 0):.2f} / "
            f"{r.share.get('cloud', 0):.2f} | {r.max_concurrency} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[LevelResult]:
    trace = load_trace(args.trace, args.prompt_scale, args.output_scale)
    bank = PromptBank()
    home = Path(args.home or tempfile.mkdtemp(prefix="tandem-bench-"))
    procs, cloud, router = start_stack(args, home)
    results = []
    try:
        for rate in [float(x) for x in args.levels.split(",")]:
            requests = window(trace, rate, args.duration, args.trace_start)
            for target, address in (("cloud only", cloud), ("hybrid", router)):
                res = await run_level(
                    target, address, requests, rate, bank, args.timeout, args.channels
                )
                log.info("%s", json.dumps(asdict(res)))
                results.append(res)
    finally:
        stop_all(procs)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", choices=("conv", "code"), default="conv")
    parser.add_argument("--levels", default="0.5,1,2,4", help="offered req/s, comma-separated")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of trace per level")
    parser.add_argument("--trace-start", type=float, default=600.0,
                        help="seconds into the trace where each window starts")
    parser.add_argument("--prompt-scale", type=float, default=1 / 8)
    parser.add_argument("--output-scale", type=float, default=1 / 4)
    parser.add_argument("--timeout", type=float, default=30.0, help="each request's deadline")
    parser.add_argument("--edges", type=int, default=2)
    parser.add_argument("--edge-concurrency", type=int, default=4)
    parser.add_argument("--quantization", default="int4")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cloud-slots", type=int, default=8)
    parser.add_argument("--cloud-queue", type=int, default=64)
    parser.add_argument("--channels", type=int, default=4, help="client HTTP/2 connections")
    parser.add_argument("--cpus", default="", help="pinning, e.g. 'cloud=0-3;edge=4-7;client=8'")
    parser.add_argument("--home", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = asyncio.run(main_async(args))
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}; trace {args.trace}, {args.duration:g} s per "
        f"level, prompt x{args.prompt_scale:g}, output x{args.output_scale:g}"
    )
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
