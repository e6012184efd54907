"""What we know about gemma_pytorch's variants, without importing torch or gemma.

Numbers are gemma_pytorch's ``get_config_for_*`` values (commit 014acb7); they let
the planner and the profile checks reason about a variant before any model
exists, and let a constructed ``GemmaConfig`` be matched back to its variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class VariantShape:
    """The shape of one gemma_pytorch variant."""

    name: str
    family: str  # "gemma1" | "gemma2" | "gemma3"
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int = 256_000
    max_position_embeddings: int = 8192
    sliding_window_size: int | None = None


VARIANTS: dict[str, VariantShape] = {
    v.name: v
    for v in (
        VariantShape("2b", "gemma1", 18, 2048, 16384, 8, 1, 256),
        VariantShape("7b", "gemma1", 28, 3072, 24576, 16, 16, 256),
        VariantShape("2b-v2", "gemma2", 26, 2304, 9216, 8, 4, 256, sliding_window_size=4096),
        VariantShape("9b", "gemma2", 42, 3584, 14336, 16, 8, 256, sliding_window_size=4096),
        VariantShape("27b", "gemma2", 46, 4608, 36864, 32, 16, 128, sliding_window_size=4096),
        VariantShape("1b", "gemma3", 26, 1152, 6912, 4, 1, 256, 262_144, 32_768, 512),
        VariantShape("4b", "gemma3", 34, 2560, 10240, 8, 4, 256, 262_144, 8192, 1024),
        VariantShape("12b", "gemma3", 48, 3840, 15360, 16, 8, 256, 262_144, 131_072, 1024),
        VariantShape("27b_v3", "gemma3", 62, 5376, 21504, 32, 16, 128, 262_144, 131_072, 1024),
    )
}

FAMILIES = ("gemma1", "gemma2", "gemma3")
# Families whose activations overflow float16 (docs/design.md: vLLM's
# _FLOAT16_NOT_SUPPORTED_MODELS, transformers #36822, gemma_pytorch #10 for 7b).
FLOAT16_UNSAFE_FAMILIES = frozenset({"gemma2", "gemma3"})
FLOAT16_UNSAFE_VARIANTS = frozenset({"7b"})


def family_of_architecture(architecture: Any) -> str | None:
    """``Architecture.GEMMA_2`` (or ``"GEMMA_2"`` or ``2``) -> ``"gemma2"``."""
    name = getattr(architecture, "name", architecture)
    if isinstance(name, int):
        return f"gemma{name}" if 1 <= name <= 3 else None
    if isinstance(name, str) and name.upper().startswith("GEMMA_"):
        return "gemma" + name.split("_", 1)[1]
    return None


def identify_variant(config: Any) -> str | None:
    """Match a GemmaConfig-like object to a known variant by its shape, or None."""
    family = family_of_architecture(getattr(config, "architecture", None))
    for shape in VARIANTS.values():
        if (
            shape.family == family
            and getattr(config, "num_hidden_layers", None) == shape.num_hidden_layers
            and getattr(config, "hidden_size", None) == shape.hidden_size
            and getattr(config, "intermediate_size", None) == shape.intermediate_size
            and getattr(config, "num_attention_heads", None) == shape.num_attention_heads
            and getattr(config, "num_key_value_heads", None) == shape.num_key_value_heads
        ):
            return shape.name
    return None


def float16_unsafe(variant: str | None, family: str | None) -> bool:
    """True when float16 *compute* is known to overflow for this model."""
    return family in FLOAT16_UNSAFE_FAMILIES or variant in FLOAT16_UNSAFE_VARIANTS
