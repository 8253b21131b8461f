"""Low-rank adapters (LoRA) on the decoder's linear layers: what a site trains and sends when
the model is too large to exchange whole.

``add_lora`` freezes the base model and wraps each targeted ``nn.Linear`` so that
``y = W x + (alpha / r) * B A x`` with ``A`` (r x in) drawn from a seeded generator (every
participant builds the same start) and ``B`` (out x r) zero, so a fresh adapter changes nothing.
Only ``A`` and ``B`` train and travel; ``merge_lora`` folds them into ``W`` for serving.
Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Attention and MLP projections: adapting all of them, at a small rank, tracks full
# fine-tuning far better than q/v alone for a model this small.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator
                 ) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        a = torch.empty(rank, base.in_features)
        # Kaiming-uniform as nn.Linear initialises, drawn from the shared generator.
        bound = 1 / math.sqrt(base.in_features)
        a.uniform_(-bound, bound, generator=generator)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(a.to(device, dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device,
                                               dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        """The base layer with the update folded in."""
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        self.base.weight.requires_grad_(True)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(True)
        return self.base


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, seed: int = 0,
             targets: tuple[str, ...] = DEFAULT_TARGETS) -> nn.Module:
    """Freeze ``model`` and wrap its ``targets`` linears with adapters (in place)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    # Sorted names: the same draw order, hence the same adapters, in every process.
    for _, module in sorted(model.named_modules(), key=lambda item: item[0]):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha, generator))
    if not lora_state(model):
        raise ValueError(f"no linear layer named any of {targets} to adapt")
    return model


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors by state-dict name (what a round exchanges)."""
    return {k: v for k, v in model.state_dict().items()
            if k.endswith((".lora_a", ".lora_b"))}


def check_names(expected: set[str], got: set[str], what: str) -> None:
    """Raise ValueError naming a few missing and unexpected tensor names, if any."""
    if got != expected:
        missing, unexpected = expected - got, got - expected
        raise ValueError(f"{what} differ: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")


def load_lora_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Set the adapters from ``state``; its names must be exactly the model's adapters."""
    check_names(set(lora_state(model)), set(state), "adapter names")
    model.load_state_dict(state, strict=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer and unwrap it (in place)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
