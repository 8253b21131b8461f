"""The training loop: pre-training of the demo pair and federated fine-tuning share it.

Next-token prediction on a packed token stream (documents joined with BOS/EOS), random windows,
AdamW with warm-up and cosine decay, gradient clipping, bf16 autocast on CUDA, and an optional
FedProx proximal term that keeps a site's update near the global model it started from.
Deterministic for a given seed on a given device.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from model.transformer import Transformer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run."""

    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    # FedProx: weight of (mu / 2) * ||w - w_start||^2; 0 is plain fine-tuning (FedAvg).
    prox_mu: float = 0.0
    log_every: int = 100
    # Early stopping: every this many steps, score the validation stream and keep the best
    # weights (0 = off; the final weights are kept).
    eval_every: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    seconds: float = 0.0
    # (step, validation NLL) pairs, and the step whose weights were kept.
    evals: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None

    @property
    def final_loss(self) -> float:
        tail = self.losses[-20:]
        return sum(tail) / len(tail) if tail else float("nan")


def pack_documents(docs: Iterable[Sequence[int]], bos_id: int | None, eos_id: int) -> Tensor:
    """Join tokenized documents into one stream: ``<bos> doc <eos> <bos> doc <eos> ...``; for
    a tokenizer without a BOS token (``bos_id`` None, Qwen style) ``doc <eos> doc <eos> ...``,
    the EOS alone separating documents."""
    out: list[int] = []
    for doc in docs:
        if bos_id is not None:
            out.append(bos_id)
        out.extend(doc)
        out.append(eos_id)
    return torch.tensor(out, dtype=torch.long)


def init_weights(model: Transformer, seed: int, std: float = 0.02) -> None:
    """GPT-2 style init; residual output projections scaled down by depth (nanoGPT)."""
    gen = torch.Generator().manual_seed(seed)
    resid_std = std / math.sqrt(2 * model.args.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.zeros_like(p))
                continue
            s = resid_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            p.copy_(torch.randn(p.shape, generator=gen) * s)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on norms and biases (vectors), as in nanoGPT.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def train(
    model: Transformer,
    tokens: Tensor,
    cfg: TrainConfig,
    *,
    eval_tokens: Tensor | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on random windows of the packed stream ``tokens``.

    With ``cfg.eval_every`` and ``eval_tokens``, the weights with the lowest validation loss
    are restored at the end (early stopping against a split that is not the held-out one).
    """
    if tokens.numel() < cfg.seq_len + 2:
        raise ValueError(
            f"need more than seq_len + 1 = {cfg.seq_len + 1} tokens to train, got {tokens.numel()}"
        )
    device = torch.device(cfg.device)
    model.to(device).train()
    data = tokens.to(device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    anchor = (
        [p.detach().clone() for p in model.parameters()] if cfg.prox_mu > 0 else None
    )
    opt = _optimizer(model, cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    offsets = torch.arange(cfg.seq_len + 1)
    result = TrainResult()
    best_state: dict[str, Tensor] = {}
    start = time.perf_counter()
    for step in range(cfg.steps):
        starts = torch.randint(0, data.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        window = data[(starts[:, None] + offsets).to(device)]  # (B, T + 1)
        x, y = window[:, :-1], window[:, 1:]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        total = loss
        if anchor is not None:
            params = zip(model.parameters(), anchor, strict=True)
            prox = sum(((p - a) ** 2).sum() for p, a in params)
            total = loss + 0.5 * cfg.prox_mu * prox
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        value = float(loss.detach())
        result.losses.append(value)
        result.tokens_seen += x.numel()
        if on_step is not None:
            on_step(step, value)
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            log.info("step %d/%d loss %.4f lr %.2e", step + 1, cfg.steps, value, _lr_at(step, cfg))
        due = cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1)
        if eval_tokens is not None and due:
            val = evaluate_nll(model, eval_tokens, seq_len=cfg.seq_len)
            result.evals.append((step + 1, val))
            log.info("step %d validation loss %.4f", step + 1, val)
            if val <= min(v for _, v in result.evals):
                result.best_step = step + 1
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
    if result.best_step is not None:
        model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


@torch.no_grad()
def evaluate_nll(
    model: Transformer, tokens: Tensor, seq_len: int = 256, batch_size: int = 16
) -> float:
    """Mean next-token NLL (nats) over non-overlapping windows covering ``tokens``."""
    device = model.lm_head.weight.device
    was_training = model.training
    model.eval()
    n = (tokens.numel() - 1) // seq_len
    if n == 0:
        raise ValueError(f"need more than {seq_len} tokens to evaluate, got {tokens.numel()}")
    x_all = tokens[: n * seq_len].view(n, seq_len)
    y_all = tokens[1 : n * seq_len + 1].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        x, y = x_all[i : i + batch_size].to(device), y_all[i : i + batch_size].to(device)
        logits = model(x).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    model.train(was_training)
    return total / count


def perplexity(model: Transformer, tokens: Tensor, seq_len: int = 256) -> float:
    return math.exp(evaluate_nll(model, tokens, seq_len))
