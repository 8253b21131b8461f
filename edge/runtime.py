"""The edge node's model runtime: an onnxruntime-genai artifact loaded for generation and scoring.

Imports only onnxruntime-genai, numpy and the standard library (plus the stdlib-only manifest
module): an edge node has no torch and no transformers. One loaded model serves any number of
concurrent ``generate``/``score`` calls, each with its own genai Generator (its own KV cache).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from model.manifest import Manifest, read_manifest, verify_artifact

log = logging.getLogger(__name__)

# Tokens a Score prefills at a time (bounds the logits held: 256 x 49k vocabulary = 50 MB).
SCORE_CHUNK = 256


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood of ``targets`` under rows of ``logits`` (R, V)."""
    if len(targets) == 0:
        return 0.0
    pred = logits.astype(np.float64)
    peak = pred.max(axis=-1)
    log_norm = peak + np.log(np.exp(pred - peak[:, None]).sum(axis=-1))
    return float((log_norm - pred[np.arange(len(targets)), targets]).sum())


@dataclass(frozen=True)
class _ModelInfo:
    """What the runtime needs from genai_config.json."""

    vocab_size: int
    max_context: int
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int

    @classmethod
    def from_genai_config(cls, path: Path) -> _ModelInfo:
        model = json.loads(path.read_text())["model"]
        eos = model["eos_token_id"]
        return cls(
            vocab_size=int(model["vocab_size"]),
            max_context=int(model["context_length"]),
            bos_token_id=int(model["bos_token_id"]),
            eos_token_ids=tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])),
            pad_token_id=int(model["pad_token_id"]),
        )


class EdgeRuntime:
    """A verified edge artifact, ready to generate tokens and score prompts on CPU."""

    def __init__(self, model: og.Model, manifest: Manifest, info: _ModelInfo) -> None:
        self._model = model
        self._manifest = manifest
        self._info = info

    @classmethod
    def load(
        cls, artifact_dir: str | Path, *, verify: bool = True, threads: int | None = None
    ) -> EdgeRuntime:
        """Load an artifact; with ``verify`` every file is checked against the manifest first."""
        artifact_dir = Path(artifact_dir)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        manifest = read_manifest(artifact_dir)
        if verify:
            verify_artifact(artifact_dir, manifest)
        info = _ModelInfo.from_genai_config(artifact_dir / "genai_config.json")
        config = og.Config(str(artifact_dir))
        if threads is not None:
            # Leaves sibling processes (the agent, a second model during a swap) their cores.
            options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        model = og.Model(config)
        log.info(
            "loaded edge model %s (%s) from %s",
            manifest.model_version,
            manifest.quantization,
            artifact_dir,
        )
        return cls(model, manifest, info)

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def model_version(self) -> str:
        return self._manifest.model_version

    @property
    def quantization(self) -> str:
        return self._manifest.quantization

    @property
    def vocab_size(self) -> int:
        return self._info.vocab_size

    @property
    def max_context(self) -> int:
        """Most tokens (prompt plus generated) one sequence may hold."""
        return self._info.max_context

    @property
    def eos_token_id(self) -> int:
        return self._info.eos_token_ids[0]

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation."""
        return self._info.eos_token_ids

    @property
    def bos_token_id(self) -> int:
        return self._info.bos_token_id

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[int]:
        """Yield new token ids one at a time; greedy when temperature is 0; stops before EOS.

        Arguments are checked at the call; the prefill runs at the first ``next()``.
        """
        prompt = self._check_ids(prompt_ids, min_len=1)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompt) + max_new_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) must be at "
                f"most the model's context of {self.max_context} tokens"
            )
        if not temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        params = og.GeneratorParams(self._model)
        options: dict[str, float | int | bool] = {
            "max_length": len(prompt) + max_new_tokens,
            "min_length": 0,
            "batch_size": 1,
            "num_beams": 1,
            "repetition_penalty": 1.0,
            "do_sample": temperature > 0.0,
        }
        if temperature > 0.0:
            # genai_config.json carries the builder's defaults (top_k 50): always say ours.
            options |= {
                "temperature": temperature,
                "top_k": top_k or self.vocab_size,
                "top_p": top_p,
            }
            if seed is not None:
                options["random_seed"] = seed
        params.set_search_options(**options)
        return self._decode(params, prompt)

    def _decode(self, params: og.GeneratorParams, prompt: np.ndarray) -> Iterator[int]:
        generator = og.Generator(self._model, params)
        generator.append_tokens(prompt[None, :])
        eos = self._info.eos_token_ids
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in eos:
                return
            yield token

    def score(self, token_ids: Sequence[int]) -> float:
        """Mean next-token negative log-likelihood (nats) of ``token_ids`` from one prefill."""
        total, count = self._nll_sum(self._check_ids(token_ids, min_len=2))
        return total / count

    def perplexity(self, token_ids: Sequence[int]) -> float:
        """exp(mean NLL) over ``token_ids``; longer texts run as context-sized windows."""
        ids = self._check_ids(token_ids, min_len=2, fit_context=False)
        total, count = 0.0, 0
        # Windows overlap by one token so every token but the first is predicted exactly once.
        step = self.max_context - 1
        for start in range(0, len(ids) - 1, step):
            window_total, window_count = self._nll_sum(ids[start : start + self.max_context])
            total += window_total
            count += window_count
        return math.exp(total / count)

    def _nll_sum(self, ids: np.ndarray) -> tuple[float, int]:
        """Sum of next-token NLL over one window (len >= 2) and the number of predictions.

        The prompt is prefilled in chunks of ``SCORE_CHUNK`` tokens into one KV cache, so at
        most a chunk's logits exist at a time: an 8k-token prompt at a 49k vocabulary would
        otherwise materialise 1.6 GB of fp32 logits.
        """
        params = og.GeneratorParams(self._model)
        params.set_search_options(max_length=len(ids), batch_size=1)
        generator = og.Generator(self._model, params)
        total, carry = 0.0, None  # carry: the last logits row, which predicts the next chunk
        for start in range(0, len(ids), SCORE_CHUNK):
            piece = ids[start : start + SCORE_CHUNK]
            generator.append_tokens(piece[None, :])
            # After a prefill genai exposes the model's logits for every position appended.
            logits = generator.get_output("logits")
            if logits.shape != (1, len(piece), self.vocab_size):
                raise RuntimeError(
                    f"expected prefill logits of shape (1, {len(piece)}, {self.vocab_size}), "
                    f"got {logits.shape}; was the artifact built with prune_lm_head?"
                )
            rows = logits[0]
            if carry is not None:
                total += _nll(carry[None, :], piece[:1])
            total += _nll(rows[:-1], piece[1:])
            carry = rows[-1].copy()
        return total, len(ids) - 1

    def _check_ids(
        self, token_ids: Sequence[int], *, min_len: int, fit_context: bool = True
    ) -> np.ndarray:
        """Validate ids (flat, integer, in vocabulary, within context) as an int32 array."""
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or len(ids) < min_len or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"token_ids must be a flat sequence of at least {min_len} int ids")
        if fit_context and len(ids) > self.max_context:
            raise ValueError(
                f"token_ids has {len(ids)} tokens; the model's context is {self.max_context}"
            )
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}"
            )
        return ids.astype(np.int32)
