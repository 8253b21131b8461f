"""One engine of the edge-vs-llama.cpp benchmark, as a child process: loads once, then answers.

Run by benchmarks/edge_llamacpp.py, never by hand. ``genai`` runs under Tandem's Python (an
edge artifact through onnxruntime-genai and ``EdgeRuntime``); ``llamacpp`` runs under the
llama.cpp venv's Python (benchmarks/llamacpp_env.sh), which has numpy and llama_cpp and no Tandem,
so this file imports only the standard library and numpy at the top.

Protocol: one JSON request per stdin line, one JSON reply per line on the original stdout
(fd 1 is pointed at stderr first, so native libraries that print cannot corrupt replies).
Token ids always come from the driver, so both engines see exactly the same tokens. Between
requests the worker blocks on stdin: its threads are idle while the other engine is timed.

    {"op": "latency", "prompts": [[...], ...], "new_tokens": 32, "warmup": 1, "reps": 2}
      -> {"prefill_ms": [...], "decode_ms": [...], "tokens": [...]}   greedy, equal-length rows
    {"op": "nll", "windows": [[...], ...]} -> {"nll": [...], "count": [...]}  one prefill each
    {"op": "tokenize", "text": "..."} -> {"ids": [...]}             llama.cpp's own tokenizer
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# One rep: (prefill ms to the first token, [ms per later decode step], first row's tokens).
Rep = tuple[float, list[float], list[int]]


def nll_from_logits(logits: np.ndarray, ids: np.ndarray) -> float:
    """Sum of next-token NLL (nats): row t of ``logits`` (T, V) predicts ``ids[t + 1]``."""
    pred = logits[:-1].astype(np.float64)
    peak = pred.max(axis=-1)
    log_norm = peak + np.log(np.exp(pred - peak[:, None]).sum(axis=-1))
    return float((log_norm - pred[np.arange(len(ids) - 1), ids[1:]]).sum())


class GenaiEngine:
    """A Tandem edge artifact: latency through a genai Generator, NLL through EdgeRuntime."""

    def __init__(self, artifact: str, threads: int) -> None:
        import onnxruntime_genai as og

        from edge.runtime import EdgeRuntime

        self._og = og
        self._runtime = EdgeRuntime.load(artifact, threads=threads)
        # The thread settings EdgeRuntime.load(threads=) applies; a second og.Model because
        # EdgeRuntime generates one sequence at a time and batch 8 needs the Generator itself.
        config = og.Config(artifact)
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self._model = og.Model(config)
        manifest = json.loads((Path(artifact) / "manifest.json").read_text())
        self.info = {"onnxruntime_genai": og.__version__,
                     "quantization": self._runtime.quantization,
                     "model_version": self._runtime.model_version,
                     "recipe": manifest.get("recipe")}  # absent before export recipes existed

    def rep(self, prompts: np.ndarray, new_tokens: int) -> Rep:
        B, T = prompts.shape
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=T + new_tokens, min_length=0, batch_size=B,
                                  num_beams=1, do_sample=False)
        generator = self._og.Generator(self._model, params)
        start = time.perf_counter()
        # append_tokens runs the prompt's forward; the first generate_next_token picks from
        # those logits: together "to the first token", as the llama.cpp rep measures.
        generator.append_tokens(prompts)
        generator.generate_next_token()
        prefill = (time.perf_counter() - start) * 1e3
        tokens, steps = [int(generator.get_next_tokens()[0])], []
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            generator.generate_next_token()
            steps.append((time.perf_counter() - start) * 1e3)
            tokens.append(int(generator.get_next_tokens()[0]))
        return prefill, steps, tokens

    def nll(self, ids: np.ndarray) -> float:
        return self._runtime.score(ids.tolist()) * (len(ids) - 1)


class LlamaCppEngine:
    """A GGUF through llama.cpp's C API (llama_batch with one sequence id per row)."""

    def __init__(self, gguf: str, threads: int, max_batch: int, max_tokens: int) -> None:
        import llama_cpp as ll

        self._ll = ll
        self._log: list[str] = []
        # Kept on self: llama.cpp calls it for as long as the process lives.
        self._log_cb = ll.llama_log_callback(lambda level, text, user: self._log.append(
            text.decode(errors="replace")))
        ll.llama_log_set(self._log_cb, ctypes.c_void_p(0))
        ll.llama_backend_init()
        self._model = ll.llama_model_load_from_file(gguf.encode(), ll.llama_model_default_params())
        if not self._model:
            raise SystemExit(f"llama.cpp could not load {gguf}")
        self._vocab = ll.llama_model_get_vocab(self._model)
        self.n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        params = ll.llama_context_default_params()
        # Every other setting (flash attention "auto", f16 KV cache) is llama.cpp's default.
        params.n_seq_max = max_batch
        params.n_ctx = max_batch * max_tokens  # split evenly: max_tokens cells per sequence
        params.n_batch = max_batch * max_tokens  # a whole batch-8 prompt in one llama_decode
        params.n_threads = threads
        params.n_threads_batch = threads
        self._ctx = ll.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise SystemExit("llama.cpp could not create a context")
        self._batch = ll.llama_batch_init(params.n_batch, 0, 1)
        self.info = {
            "llama_cpp_python": ll.__version__,
            "system_info": ll.llama_print_system_info().decode(),
            "n_ctx": ll.llama_n_ctx(self._ctx),
            "n_seq_max": ll.llama_n_seq_max(self._ctx),
            "n_batch": params.n_batch,
            "n_ubatch": params.n_ubatch,
            "type_k": params.type_k,
            "type_v": params.type_v,
            "flash_attn_type": params.flash_attn_type,
            "model_size_bytes": ll.llama_model_size(self._model),
            "log": [line.strip() for line in "".join(self._log).splitlines()
                    if any(k in line for k in ("flash_attn", "n_ctx_seq", "file type",
                                               "repack", "CPU_REPACK", "type q4_1",
                                               "type q8_0", "type  f32", "type q6_K"))],
        }

    def _fill(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """Write (token, position, sequence, wants logits) rows into the shared batch."""
        b = self._batch
        for i, (token, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
            b.seq_id[i][0], b.logits[i] = seq, logits
        b.n_tokens = len(rows)

    def _decode(self, n_outputs: int) -> np.ndarray:
        """Run the filled batch; the (n_outputs, vocab) logits, in batch order."""
        if (rc := self._ll.llama_decode(self._ctx, self._batch)) != 0:
            raise RuntimeError(f"llama_decode failed with {rc}")
        ptr = self._ll.llama_get_logits(self._ctx)  # synchronizes
        return np.ctypeslib.as_array(ptr, shape=(n_outputs, self.n_vocab))

    def _clear(self) -> None:
        self._ll.llama_memory_clear(self._ll.llama_get_memory(self._ctx), True)

    def rep(self, prompts: np.ndarray, new_tokens: int) -> Rep:
        B, T = prompts.shape
        self._clear()
        self._fill([(int(prompts[b, t]), t, b, t == T - 1) for b in range(B) for t in range(T)])
        start = time.perf_counter()
        nxt = self._decode(B).argmax(axis=-1)  # (B,) greedy, as genai's search picks
        prefill = (time.perf_counter() - start) * 1e3
        tokens, steps = [int(nxt[0])], []
        for i in range(new_tokens - 1):
            start = time.perf_counter()
            self._fill([(int(nxt[b]), T + i, b, True) for b in range(B)])
            nxt = self._decode(B).argmax(axis=-1)
            steps.append((time.perf_counter() - start) * 1e3)
            tokens.append(int(nxt[0]))
        return prefill, steps, tokens

    def nll(self, ids: np.ndarray) -> float:
        self._clear()
        self._fill([(int(tok), t, 0, True) for t, tok in enumerate(ids)])
        return nll_from_logits(self._decode(len(ids)), ids)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (self._ll.llama_token * (len(data) + 16))()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, len(buf), False, False)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return list(buf[:n])


def serve(engine: GenaiEngine | LlamaCppEngine, replies: Any) -> None:
    """Answer requests from stdin until it closes."""
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "latency":
            prompts = np.asarray(req["prompts"], dtype=np.int32)
            for _ in range(req["warmup"]):
                engine.rep(prompts, req["new_tokens"])
            prefill, decode, tokens = [], [], []
            for _ in range(req["reps"]):
                p, d, tokens = engine.rep(prompts, req["new_tokens"])
                prefill.append(p)
                decode.extend(d)
            reply = {"prefill_ms": prefill, "decode_ms": decode, "tokens": tokens}
        elif op == "nll":
            windows = [np.asarray(w, dtype=np.int32) for w in req["windows"]]
            reply = {"nll": [engine.nll(w) for w in windows],
                     "count": [len(w) - 1 for w in windows]}
        elif op == "tokenize" and isinstance(engine, LlamaCppEngine):
            reply = {"ids": engine.tokenize(req["text"])}
        else:
            reply = {"error": f"unknown op {op!r} for {type(engine).__name__}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backend", choices=("genai", "llamacpp"))
    parser.add_argument("path", help="edge artifact directory or GGUF file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=640, help="prompt + new, per sequence")
    args = parser.parse_args()
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if args.backend == "genai":
        engine: GenaiEngine | LlamaCppEngine = GenaiEngine(args.path, args.threads)
    else:
        engine = LlamaCppEngine(args.path, args.threads, args.max_batch, args.max_tokens)
    replies.write(json.dumps({"ready": engine.info}) + "\n")
    replies.flush()
    serve(engine, replies)


if __name__ == "__main__":
    main()
