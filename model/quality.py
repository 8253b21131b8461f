"""Measure an edge artifact against its source checkpoint: perplexity, and router calibration.

Both sides score the same token windows of held-out text every machine has: the GNU GPL v3 in
``/usr/share/common-licenses`` (where the system ships it) and Python's pydoc topics
(``pydoc_data.topics``). Windows are cut at fixed, evenly spaced offsets, so two exports of one
checkpoint score the same ids (``Quality.tokens_sha256`` says so). The bound (6 windows of up to
512 tokens per text) keeps the demo model's measurement well under a second.

The source side runs our Transformer (``sequence_nll``); the artifact side runs
onnxruntime-genai directly, with the same prefill-logits NLL as ``EdgeRuntime.score``, since
``model/`` sits below ``edge/`` and does not import it. Calibration measures the artifact's own
losses, as the router will see them: the difficulty score of held-out prompts, and the cascade's
confidence (its loss on its own greedy answers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.durable import write_atomic
from model.manifest import CALIBRATION_FILE, Quality, TextQuality
from model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Publishing refuses an artifact more than this much worse than its source (relative perplexity).
QUALITY_BUDGET = 0.03
LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSE_TEXT = "GPL-3"
PYDOC_TOPICS = "pydoc_data.topics"
WINDOWS_PER_TEXT = 6
WINDOW_TOKENS = 512
# Calibration, as federation measures it on sites' documents (federation/task.py): the
# difficulty score of a prompt is the mean loss on its first 48 tokens, and the threshold is
# the 0.9-quantile, so the least familiar tenth of held-out prompts goes to the cloud.
PROMPT_TOKENS = 48
DIFFICULTY_QUANTILE = 0.9
# The cascade's confidence: mean loss on the edge's own greedy answer; escalate the least
# confident ~15% of answers to held-out prompts.
CASCADE_PROMPTS = 16
CASCADE_ANSWER_TOKENS = 32
CASCADE_QUANTILE = 0.85


@dataclass(frozen=True)
class Windows:
    """Token windows to score, grouped by the text they were cut from."""

    window_tokens: int
    texts: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for name, windows in self.texts:
            h.update(name.encode())
            for ids in windows:
                h.update(np.asarray(ids, dtype="<i4").tobytes())
        return h.hexdigest()


def heldout_texts() -> list[tuple[str, str]]:
    """(name, text) of the perplexity texts: the GPL v3 where the system has it, pydoc topics."""
    from pydoc_data.topics import topics

    texts = []
    license_path = LICENSE_DIR / LICENSE_TEXT
    if license_path.is_file():
        texts.append((str(license_path), license_path.read_text(encoding="utf-8")))
    else:
        log.info("%s is absent; measuring on pydoc topics alone", license_path)
    texts.append((PYDOC_TOPICS, "\n\n".join(topics[k].strip() for k in sorted(topics))))
    return texts


def perplexity_windows(tokenizer: Tokenizer, context: int, *,
                       per_text: int = WINDOWS_PER_TEXT,
                       window_tokens: int = WINDOW_TOKENS) -> Windows:
    """Up to ``per_text`` non-overlapping windows per held-out text, evenly spaced."""
    size = min(window_tokens, context)
    bos = [tokenizer.bos_id] if tokenizer.adds_bos and tokenizer.bos_id is not None else []
    body = size - len(bos)
    grouped = []
    for name, text in heldout_texts():
        ids = tokenizer.encode(text, add_bos=False)
        n = min(per_text, len(ids) // body)
        if n == 0:
            continue
        step = (len(ids) - body) // max(n - 1, 1)
        grouped.append((name, tuple(tuple(bos + ids[i * step:i * step + body]) for i in range(n))))
    if not grouped:
        raise ValueError(f"no held-out text is {body} tokens long")
    return Windows(size, tuple(grouped))


def source_nll(checkpoint: Path, windows: Windows) -> list[tuple[float, int]]:
    """Summed NLL and predictions per text of ``windows`` under the checkpoint, in fp32."""
    from model.checkpoint import load_checkpoint
    from model.generate import sequence_nll

    model = load_checkpoint(checkpoint, dtype="float32")
    per_text = []
    for _, group in windows.texts:
        scored = [sequence_nll(model, ids) for ids in group]
        per_text.append((sum(s for s, _ in scored), sum(n for _, n in scored)))
    return per_text


class SourceReference:
    """The source checkpoint's side of the measurement, computed on first use and kept (recipe
    ``auto`` measures several artifacts against one source)."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self._measured: tuple[Windows, list[tuple[float, int]]] | None = None

    def measure(self, artifact: Path) -> Quality:
        """The artifact's perplexity against the checkpoint's, on the same windows."""
        if self._measured is None:
            from model.config import ModelArgs

            context = ModelArgs.from_file(self.checkpoint / "config.json").max_seq_len
            windows = perplexity_windows(Tokenizer.from_dir(self.checkpoint), context)
            self._measured = windows, source_nll(self.checkpoint, windows)
        windows, source = self._measured
        return measure_quality(ArtifactScorer(artifact), windows, source)


class ArtifactScorer:
    """An artifact loaded with onnxruntime-genai, for scoring and greedy decoding (one thread
    at a time)."""

    def __init__(self, artifact: Path) -> None:
        import onnxruntime_genai as og

        self._og = og
        self._model = og.Model(str(artifact))
        genai = json.loads((artifact / "genai_config.json").read_text())["model"]
        self.vocab_size = int(genai["vocab_size"])
        self.context = int(genai["context_length"])
        eos = genai["eos_token_id"]
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [eos])

    def nll_sum(self, ids: Sequence[int]) -> tuple[float, int]:
        """Summed next-token NLL of ``ids`` (2 to context tokens) from one prefill, and count."""
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=len(ids), batch_size=1)
        generator = self._og.Generator(self._model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32)[None, :])
        logits = generator.get_output("logits")[0, :-1].astype(np.float64)  # (T-1, V)
        peak = logits.max(axis=-1)
        log_norm = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=-1))
        target = logits[np.arange(len(ids) - 1), np.asarray(ids[1:])]
        return float((log_norm - target).sum()), len(ids) - 1

    def greedy(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Up to ``max_new_tokens`` greedy tokens after ``ids``, stopping before EOS."""
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, batch_size=1,
                                  do_sample=False)
        generator = self._og.Generator(self._model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32)[None, :])
        out: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self.eos_ids:
                break
            out.append(token)
        return out


def measure_quality(scorer: ArtifactScorer, windows: Windows,
                    source: list[tuple[float, int]]) -> Quality:
    """The artifact's perplexity on ``windows`` against the source's (``source_nll``)."""
    texts, totals = [], [0.0, 0.0, 0]
    for (name, group), (src_sum, count) in zip(windows.texts, source, strict=True):
        art_sum = sum(scorer.nll_sum(ids)[0] for ids in group)
        texts.append(TextQuality(name, len(group), _ppl(src_sum, count), _ppl(art_sum, count)))
        totals = [totals[0] + src_sum, totals[1] + art_sum, int(totals[2]) + count]
    src_ppl, art_ppl = _ppl(totals[0], int(totals[2])), _ppl(totals[1], int(totals[2]))
    return Quality(
        source_perplexity=src_ppl,
        artifact_perplexity=art_ppl,
        relative_change=round(art_ppl / src_ppl - 1.0, 5),
        window_tokens=windows.window_tokens,
        tokens_sha256=windows.sha256,
        texts=tuple(texts),
    )


def calibration_prompts(tokenizer: Tokenizer) -> list[tuple[str, list[int]]]:
    """(group, ids) of held-out prompts: each pydoc topic and each license file, cut to
    ``PROMPT_TOKENS`` predictions as the router scores a prompt."""
    from pydoc_data.topics import topics

    docs = [(PYDOC_TOPICS, topics[k]) for k in sorted(topics)]
    if LICENSE_DIR.is_dir():
        docs += [("common-licenses", p.read_text(encoding="utf-8", errors="replace"))
                 for p in sorted(LICENSE_DIR.iterdir()) if p.is_file() and not p.is_symlink()]
    prompts = []
    for group, text in docs:
        ids = tokenizer.encode(text.strip(), add_bos=True)[:PROMPT_TOKENS + 1]
        if len(ids) >= 3:
            prompts.append((group, ids))
    return prompts


def calibrate(scorer: ArtifactScorer, tokenizer: Tokenizer) -> dict[str, Any]:
    """The router's settings for this artifact, from its own losses (``calibration.json``)."""
    prompts = calibration_prompts(tokenizer)
    losses: dict[str, list[float]] = {}
    for group, ids in prompts:
        total, count = scorer.nll_sum(ids)
        losses.setdefault(group, []).append(total / count)
    every = [v for group in losses.values() for v in group]
    threshold = float(np.quantile(every, DIFFICULTY_QUANTILE))
    # Every k-th prompt, so the cascade's sample spans both groups.
    answer_losses = []
    for _, ids in prompts[:: max(1, len(prompts) // CASCADE_PROMPTS)][:CASCADE_PROMPTS]:
        room = min(CASCADE_ANSWER_TOKENS, scorer.context - len(ids))
        answer = scorer.greedy(ids, room) if room > 0 else []
        if answer:
            full, _ = scorer.nll_sum(ids + answer)
            prompt, _ = scorer.nll_sum(ids)
            answer_losses.append((full - prompt) / len(answer))
    calibration: dict[str, Any] = {
        "difficulty_threshold": round(threshold, 4),
        "quantile": DIFFICULTY_QUANTILE,
        "per_site": {g: round(float(np.quantile(v, DIFFICULTY_QUANTILE)), 4)
                     for g, v in losses.items()},
        "measured_on": (f"{len(every)} held-out prompts at export (pydoc topics, common "
                        f"licenses; prompt = first {PROMPT_TOKENS} tokens)"),
    }
    if answer_losses:
        calibration |= {
            "cascade_threshold": round(float(np.quantile(answer_losses, CASCADE_QUANTILE)), 4),
            "cascade_quantile": CASCADE_QUANTILE,
            "cascade_measured_on": (f"greedy answers of up to {CASCADE_ANSWER_TOKENS} tokens "
                                    f"to {len(answer_losses)} of those prompts"),
        }
    return calibration


def write_calibration(artifact: Path, calibration: dict[str, Any]) -> None:
    """Write ``calibration.json`` in the format federation writes and the edge engine reads."""
    write_atomic(artifact / CALIBRATION_FILE, json.dumps(calibration, indent=1) + "\n")


def _ppl(total: float, count: int) -> float:
    return round(math.exp(total / count), 4)
