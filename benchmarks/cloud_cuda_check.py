"""On a GPU: the cloud engine's batched greedy output equals the reference decoding loop."""

from __future__ import annotations

import asyncio
import sys

import torch

from cloud.engine import CloudEngine, CloudEngineConfig
from cloud.scheduler import SchedulerConfig
from core.request import Limits, validate
from model.demo import DEMO_DIR
from model.generate import generate_tokens

PROMPTS = ["The json module", "Return a new list", "socket.socket(family", "asyncio event loop"]


async def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = CloudEngine(CloudEngineConfig(
        checkpoint=DEMO_DIR / "cloud", device=device, dtype="float32",
        scheduler=SchedulerConfig(slots=3),
    ))
    await engine.start()

    async def one(prompt: str) -> list[int]:
        ids: list[int] = []
        req = validate(prompt=prompt, limits=Limits(), max_tokens=32, temperature=0.0)
        async for chunk in engine.generate(req):
            ids += chunk.token_ids
        return ids

    got = await asyncio.gather(*(one(p) for p in PROMPTS))
    await engine.stop(1.0)
    bad = 0
    for prompt, ids in zip(PROMPTS, got, strict=True):
        ref = list(generate_tokens(engine.model, engine.tokenizer.encode(prompt), 32,
                                   eos_id=engine.eos_id))
        ok = ids == [t for t in ref if t != engine.eos_id]
        bad += not ok
        print(f"{device} greedy parity {'ok' if ok else 'MISMATCH'}: {prompt!r}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
