"""Edge export recipes: a named, pinned set of onnxruntime-genai model builder options.

A recipe says everything that decides an artifact's weights: the builder's precision and every
extra option, pinned here rather than left to the builder's defaults, so a newer builder cannot
silently change what a name means. Which recipe a model gets is data (its catalog record,
``model/catalog.py``) or a measurement (``auto``: the first candidate, smallest first, whose
perplexity stays within budget; ``model/export.py``). Plain Python, no builder, no torch.

The demo pair keeps ``int4``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PRECISIONS = ("fp32", "int8", "int4")
AUTO = "auto"
# block_size 32 divides every hidden size we use; accuracy_level 4 quantizes activations to int8
# inside MatMulNBits, the fastest CPU kernel (held-out perplexity within 0.5% of fp32 on the
# micro model).
QUANT_OPTIONS = ("block_size=32", "accuracy_level=4")


@dataclass(frozen=True)
class Recipe:
    """A named builder configuration: ``precision`` plus the ``--extra_options`` it pins."""

    name: str
    precision: str
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if not self.name or self.name == AUTO:
            raise ValueError(f"a recipe needs a name other than {AUTO!r}")
        for option in self.options:
            if "=" not in option:
                raise ValueError(f"builder option must be KEY=VALUE, got {option!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "precision": self.precision, "options": list(self.options)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Recipe:
        return cls(str(raw["name"]), str(raw["precision"]), tuple(str(o) for o in raw["options"]))


# The body int4 with k_quant; the tied embedding table split (the builder's shared embeddings
# cannot carry an int8 lm_head: such artifacts fail to load) into an int8 lm_head and an int4
# embedding lookup (GatherBlockQuantized is 4-bit only).
_SPLIT_HEAD = ("shared_embeddings=false", "op_types_to_quantize=MatMul/Gather")

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        # The defaults of each precision: what "int4", "int8" and "fp32" have always meant.
        Recipe("fp32", "fp32"),
        Recipe("int8", "int8", QUANT_OPTIONS),  # SmolLM2: 259 MB, +0.5%
        Recipe("int4", "int4", QUANT_OPTIONS),  # SmolLM2: 90 MB, +35% (answers ramble)
        Recipe("int4-kquant", "int4", (*QUANT_OPTIONS, "algo_config=k_quant")),
        Recipe(
            "int4-kquant-head8",
            "int4",
            (*QUANT_OPTIONS, "algo_config=k_quant", "matmul_mixed_precision=last_matmul:int8",
             *_SPLIT_HEAD),
        ),
        Recipe(
            "int4-kquant-mixed",
            "int4",
            (*QUANT_OPTIONS, "algo_config=k_quant",
             "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8", *_SPLIT_HEAD),
        ),
        Recipe(
            "int4-kquant-b16-mixed",
            "int4",
            ("block_size=16", "accuracy_level=4", "algo_config=k_quant",
             "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8", *_SPLIT_HEAD),
        ),
    )
}

# What ``auto`` tries, smallest artifact first; fp32 last, which always passes.
AUTO_CANDIDATES = (
    "int4",
    "int4-kquant",
    "int4-kquant-head8",
    "int4-kquant-mixed",
    "int4-kquant-b16-mixed",
    "int8",
    "fp32",
)


def resolve_recipe(recipe: str | Recipe) -> Recipe:
    """A recipe by name (or the recipe itself); ValueError naming the known ones."""
    if isinstance(recipe, Recipe):
        return recipe
    try:
        return RECIPES[recipe]
    except KeyError:
        raise ValueError(
            f"recipe must be one of {', '.join(RECIPES)} or {AUTO!r}, got {recipe!r}"
        ) from None
