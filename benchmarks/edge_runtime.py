"""Edge runtime benchmark: the shipped demo edge model, torch fp32 eager vs the edge artifacts.

For torch fp32 eager (our Transformer, static KV cache, ``torch.inference_mode``) and each edge
artifact (onnxruntime-genai fp32 / int8 / int4, exported here with ``export_edge_artifact``),
measured in one run on this machine: prefill of a 128-token prompt (to the first token) and
per-token greedy decode at batch 1 and 8, artifact size, and held-out perplexity.

    python benchmarks/edge_runtime.py [--out FILE] [--data runs/demo-data] [--threads 2]

Reps run in blocks per (engine, batch), each after warm-up, so neither runtime's idle worker
threads spin while the other is timed; blocks repeat in rounds, so load from other users of a
shared machine spreads over all engines. Ratios are against torch measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import onnxruntime_genai as og
import torch

from edge.runtime import EdgeRuntime
from model.checkpoint import load_checkpoint
from model.demo import DEMO_DIR, DemoData, load_data, prepare_data
from model.export import export_edge_artifact
from model.manifest import Manifest
from model.tokenizer import Tokenizer
from model.train import evaluate_nll
from model.transformer import Transformer

QUANTIZATIONS = ("fp32", "int8", "int4")
BATCH_SIZES = (1, 8)
TORCH = "torch-fp32-eager"
# The demo pair was trained and evaluated (tandem.json) on windows of this many tokens.
TRAIN_WINDOW = 256
# One rep: prefill, then new_tokens - 1 timed decode steps -> (prefill ms, [step ms, ...]).
Rep = tuple[float, list[float]]


def torch_rep(model: Transformer, prompts: np.ndarray, new_tokens: int) -> tuple[Rep, list[int]]:
    """Greedy prefill + decode with our static cache, as model/generate.py does per row."""
    B, T = prompts.shape
    with torch.inference_mode():
        cache = model.new_cache(n_slots=B, max_len=T + new_tokens)
        tokens = torch.from_numpy(prompts).long()
        start = time.perf_counter()
        pos = torch.arange(T)[None].expand(B, T)
        logits = model(tokens, pos, cache, logit_index=torch.full((B,), T - 1))
        nxt = logits.argmax(-1)  # (B,)
        prefill = (time.perf_counter() - start) * 1e3
        out, steps = [int(nxt[0])], []
        for i in range(new_tokens - 1):
            start = time.perf_counter()
            pos = torch.full((B, 1), T + i)
            nxt = model(nxt[:, None], pos, cache)[:, -1].argmax(-1)
            steps.append((time.perf_counter() - start) * 1e3)
            out.append(int(nxt[0]))
    return (prefill, steps), out


def genai_rep(model: og.Model, prompts: np.ndarray, new_tokens: int) -> tuple[Rep, list[int]]:
    """Greedy prefill + decode with one genai Generator for the whole (equal-length) batch."""
    B, T = prompts.shape
    params = og.GeneratorParams(model)
    params.set_search_options(
        max_length=T + new_tokens, min_length=0, batch_size=B, num_beams=1, do_sample=False
    )
    generator = og.Generator(model, params)
    start = time.perf_counter()
    # append_tokens runs the prompt's forward; the first generate_next_token only picks from
    # those logits, so both together are "to the first token" as in torch_rep.
    generator.append_tokens(prompts)
    generator.generate_next_token()
    prefill = (time.perf_counter() - start) * 1e3
    out, steps = [int(generator.get_next_tokens()[0])], []
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        generator.generate_next_token()
        steps.append((time.perf_counter() - start) * 1e3)
        out.append(int(generator.get_next_tokens()[0]))
    return (prefill, steps), out


def run_block(
    rep: Callable[[np.ndarray], tuple[Rep, list[int]]],
    prompts: np.ndarray,
    warmup: int,
    reps: int,
    samples: tuple[list[float], list[float]],
) -> list[int]:
    """Warm up, then time ``reps`` reps into (prefill ms, decode ms); the last rep's tokens."""
    for _ in range(warmup):
        rep(prompts)
    tokens: list[int] = []
    for _ in range(reps):
        (prefill, decode), tokens = rep(prompts)
        samples[0].append(prefill)
        samples[1].extend(decode)
    return tokens


def summarize(prefills: list[float], steps: list[float], batch: int, prompt_len: int) -> dict:
    """Median / p99 / min of prefill and per-token decode, and tokens/s at the median."""
    pre, dec = _stats(prefills), _stats(steps)
    return {
        "prefill_ms": pre,
        "decode_ms_per_token": dec,
        "prefill_tokens_per_s": batch * prompt_len / pre["median"] * 1e3,
        "decode_tokens_per_s": batch / dec["median"] * 1e3,
        "prefill_samples": len(prefills),
        "decode_samples": len(steps),
    }


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "median": float(np.median(a)),
        "p99": float(np.percentile(a, 99)),
        "min": float(a.min()),
    }


def load_genai(artifact: Path, threads: int) -> og.Model:
    """The artifact's genai model with the thread settings EdgeRuntime.load(threads=) uses."""
    config = og.Config(str(artifact))
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def heldout_tokens(data: DemoData, model_dir: Path, window: int) -> list[int]:
    """The held-out split cut to whole perplexity windows; checks the data's tokenizer."""
    shipped = Tokenizer.from_dir(model_dir)
    if shipped.backend.to_str() != data.tokenizer.backend.to_str():
        raise SystemExit(
            f"the data's tokenizer differs from {model_dir}'s (corpus built by Python "
            f"{data.python_version}, this is {platform.python_version()}); perplexity would "
            "be meaningless"
        )
    ids = data.stream("heldout").tolist()
    return ids[: (len(ids) - 1) // window * window + 1]


def _cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, CPU seconds busy on the whole machine, CPU seconds of this process)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # up to steal, not guests
    own = resource.getrusage(resource.RUSAGE_SELF)
    return time.monotonic(), busy, own.ru_utime + own.ru_stime


def _other_cores(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Average cores that other processes kept busy between two ``_cpu_seconds`` snapshots."""
    wall, busy, own = (a - b for a, b in zip(after, before, strict=True))
    return max(0.0, (busy - own) / wall)


def hardware(threads: int) -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "load_average_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_genai": og.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "ort_intra_op_threads": threads,
        "ort_inter_op_threads": 1,
    }


def markdown(result: dict[str, Any]) -> str:
    """The latency table and the per-variant table."""
    lat = result["latency"]
    rows = [
        "| engine | batch | prefill ms median / p99 / min | prefill tok/s | "
        "decode ms/token median / p99 / min | decode tok/s | speed-up vs torch "
        "(prefill, decode) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for batch in BATCH_SIZES:
        base = lat[f"{TORCH}/b{batch}"]
        for engine in (TORCH, *(f"ort-genai-{q}" for q in QUANTIZATIONS)):
            r = lat[f"{engine}/b{batch}"]
            p, d = r["prefill_ms"], r["decode_ms_per_token"]
            sp = base["prefill_ms"]["median"] / p["median"]
            sd = base["decode_ms_per_token"]["median"] / d["median"]
            rows.append(
                f"| {engine} | {batch} | {p['median']:.2f} / {p['p99']:.2f} / {p['min']:.2f} | "
                f"{r['prefill_tokens_per_s']:,.0f} | {d['median']:.3f} / {d['p99']:.3f} / "
                f"{d['min']:.3f} | {r['decode_tokens_per_s']:,.0f} | {sp:.2f}x, {sd:.2f}x |"
            )
    window = result["settings"]["perplexity_window"]
    rows += [
        "",
        f"| variant | size on disk MB | held-out ppl, {TRAIN_WINDOW}-token windows (vs torch) | "
        f"held-out ppl, EdgeRuntime.perplexity {window}-token windows (vs torch) | "
        "greedy tokens equal to torch's (b1) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    var = result["variants"]
    for name, v in var.items():
        size = f"{v['size_mb']:.2f}" if v["size_mb"] is not None else "-"
        cells = [
            f"{v[key]:.3f} ({v[key] / var[TORCH][key] - 1:+.2%})"
            for key in ("ppl_train_window", "ppl_runtime_window")
        ]
        rows.append(f"| {name} | {size} | {cells[0]} | {cells[1]} | {v['greedy_agree']} |")
    st = result["settings"]
    rows += [
        "",
        f"Prompt {st['prompt_len']} tokens, {st['new_tokens']} greedy tokens per rep, "
        f"{st['reps']} reps per row in {st['rounds']} rounds (warm-up {st['warmup']} reps, then 1 "
        f"per block); {st['threads']} threads for torch "
        f"and ORT; held-out {st['heldout_tokens']:,} tokens; torch loads the "
        f"{result['checkpoint_mb']:.2f} MB bf16 checkpoint as fp32. Other processes kept "
        f"{result['other_processes_cores_while_timing']:.2f} of "
        f"{result['hardware']['usable_cores']} cores busy while timing.",
    ]
    return "\n".join(rows)


def measure_latency(
    engines: dict[str, Callable[[np.ndarray], tuple[Rep, list[int]]]],
    prompts: np.ndarray,
    warmup: int,
    reps: int,
    rounds: int,
) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Latency per ``"{engine}/b{batch}"``, and each engine's greedy tokens at batch 1.

    Reps run in ``rounds`` rounds over every (batch, engine) block, so load from other users of
    a shared machine spreads over all engines instead of landing on one; each block warms up
    first (``warmup`` reps in round one, one later) so the previous block's threads settle.
    """
    samples: dict[tuple[str, int], tuple[list[float], list[float]]] = {
        (name, batch): ([], []) for batch in BATCH_SIZES for name in engines
    }
    greedy: dict[str, list[int]] = {}
    for r in range(rounds):
        print(f"timing round {r + 1}/{rounds} ...", flush=True)
        n = reps // rounds + (r < reps % rounds)
        for (name, batch), into in samples.items():
            tokens = run_block(engines[name], prompts[:batch], warmup if r == 0 else 1, n, into)
            if batch == 1:
                greedy[name] = tokens
    latency = {
        f"{name}/b{batch}": summarize(pre, dec, batch, prompts.shape[1])
        for (name, batch), (pre, dec) in samples.items()
    }
    return latency, greedy


def measure_variants(
    model: Transformer,
    heldout: list[int],
    artifacts: Path,
    manifests: dict[str, Manifest],
    greedy: dict[str, list[int]],
    threads: int,
) -> dict[str, Any]:
    """Size, held-out perplexity (two window lengths) and greedy agreement of each variant."""
    ids = torch.tensor(heldout)
    window = model.args.max_seq_len - 1
    variants: dict[str, Any] = {
        TORCH: {
            "size_mb": None,
            "ppl_train_window": math.exp(evaluate_nll(model, ids, TRAIN_WINDOW)),
            # EdgeRuntime.perplexity scores windows of max_context overlapping by one, i.e.
            # max_context - 1 predictions each: evaluate_nll's windows of that length.
            "ppl_runtime_window": math.exp(evaluate_nll(model, ids, window)),
            "greedy_agree": _prefix_agreement(greedy[TORCH], greedy[TORCH]),
        }
    }
    for q in QUANTIZATIONS:
        rt = EdgeRuntime.load(artifacts / q, threads=threads)
        name = f"ort-genai-{q}"
        variants[name] = {
            "size_mb": manifests[q].total_size / 1e6,
            "ppl_train_window": _windowed_perplexity(rt, heldout, TRAIN_WINDOW),
            "ppl_runtime_window": rt.perplexity(heldout),
            "greedy_agree": _prefix_agreement(greedy[name], greedy[TORCH]),
        }
    return variants


def _windowed_perplexity(rt: EdgeRuntime, ids: list[int], seq_len: int) -> float:
    """Perplexity over evaluate_nll's windows (seq_len predictions each), one prefill each."""
    n = (len(ids) - 1) // seq_len
    nll = [rt.score(ids[i * seq_len : (i + 1) * seq_len + 1]) for i in range(n)]
    return math.exp(sum(nll) / n)


def _prefix_agreement(a: list[int], b: list[int]) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return f"{n}/{len(a)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--data", type=Path, help="demo data dir (default: prepare_data to tmp)")
    parser.add_argument("--model", type=Path, default=DEMO_DIR / "edge")
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=50, help="timed reps per engine and batch")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the reps are spread over")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    started = datetime.now(UTC)
    hw = hardware(args.threads)
    print("hardware:", json.dumps(hw))

    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        tmp_dir = Path(tmp)
        data = load_data(args.data) if args.data else prepare_data(tmp_dir / "data")
        model = load_checkpoint(args.model, dtype="float32")
        # Whole windows of EdgeRuntime.perplexity (max_context tokens, overlapping by one).
        window = model.args.max_seq_len - 1
        heldout = heldout_tokens(data, args.model, window)
        rng = np.random.default_rng(0)
        starts = rng.integers(0, len(heldout) - args.prompt_len, size=max(BATCH_SIZES))
        prompts = np.stack([heldout[s : s + args.prompt_len] for s in starts]).astype(np.int32)

        print(f"exporting {', '.join(QUANTIZATIONS)} artifacts of {args.model} ...", flush=True)
        with ThreadPoolExecutor(max_workers=2) as pool:  # builder subprocesses, two at a time
            jobs = {
                q: pool.submit(export_edge_artifact, args.model, tmp_dir / q, q, "bench")
                for q in QUANTIZATIONS
            }
            manifests = {q: job.result() for q, job in jobs.items()}

        engines: dict[str, Callable[[np.ndarray], tuple[Rep, list[int]]]] = {
            TORCH: lambda p: torch_rep(model, p, args.new_tokens)
        }
        for q in QUANTIZATIONS:
            genai_model = load_genai(tmp_dir / q, args.threads)
            engines[f"ort-genai-{q}"] = lambda p, m=genai_model: genai_rep(m, p, args.new_tokens)

        before = _cpu_seconds()
        latency, greedy = measure_latency(engines, prompts, args.warmup, args.reps, args.rounds)
        other_cores = _other_cores(before, _cpu_seconds())
        print(f"other processes used {other_cores:.2f} cores on average while timing")
        print("held-out perplexity ...", flush=True)
        variants = measure_variants(model, heldout, tmp_dir, manifests, greedy, args.threads)

    result = {
        "benchmark": "edge_runtime",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "hardware": hw | {"load_average_1m_end": os.getloadavg()[0]},
        "other_processes_cores_while_timing": other_cores,
        "model": str(args.model),
        "parameters": model.args.num_parameters,
        "checkpoint_mb": sum(f.stat().st_size for f in args.model.glob("*.safetensors")) / 1e6,
        "settings": {
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "warmup": args.warmup,
            "reps": args.reps,
            "rounds": args.rounds,
            "threads": args.threads,
            "heldout_tokens": len(heldout),
            "perplexity_window": window + 1,
        },
        "latency": latency,
        "variants": variants,
    }
    table = markdown(result)
    print()
    print(table)
    if args.out:
        args.out.write_text(json.dumps(result | {"table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
