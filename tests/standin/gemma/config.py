"""Model configurations (stand-in for ``gemma.config``)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import Any

import torch


class AttentionType(enum.Enum):
    GLOBAL = 1
    LOCAL_SLIDING = 2


class Architecture(enum.Enum):
    GEMMA_1 = 1
    GEMMA_2 = 2
    GEMMA_3 = 3


_STR_TO_DTYPE: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "float": torch.float32,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
}

_GEMMA3_TOKENIZER = "tokenizer/gemma3_cleaned_262144_v2.spiece.model"


@dataclasses.dataclass
class GemmaConfig:
    architecture: Architecture = Architecture.GEMMA_1
    vocab_size: int = 256000
    max_position_embeddings: int = 8192
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    hidden_size: int = 3072
    intermediate_size: int = 24576
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    dtype: str = "bfloat16"
    quant: bool = False
    tokenizer: str | None = "tokenizer/tokenizer.model"
    attn_types: Sequence[AttentionType] | None = None
    sliding_window_size: int | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    query_pre_attn_scalar: int | None = None
    use_pre_ffw_norm: bool = False
    use_post_ffw_norm: bool = False
    rope_wave_length: dict[AttentionType, int] | None = None
    use_qk_norm: bool = False
    vision_config: Any | None = None
    rope_scaling_factor: int | None = None

    def get_dtype(self) -> torch.dtype | None:
        """Returns the torch dtype named by ``dtype``, or None if unknown."""
        return _STR_TO_DTYPE.get(self.dtype)


def get_config_for_7b(dtype: str = "bfloat16") -> GemmaConfig:
    return GemmaConfig(dtype=dtype)


def get_config_for_2b(dtype: str = "bfloat16") -> GemmaConfig:
    return GemmaConfig(
        dtype=dtype,
        num_hidden_layers=18,
        num_attention_heads=8,
        num_key_value_heads=1,
        hidden_size=2048,
        intermediate_size=16384,
    )


def _gemma2_config(
    dtype: str,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    hidden_size: int,
    intermediate_size: int,
    head_dim: int = 256,
    query_pre_attn_scalar: int | None = None,
) -> GemmaConfig:
    return GemmaConfig(
        dtype=dtype,
        architecture=Architecture.GEMMA_2,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        use_pre_ffw_norm=True,
        use_post_ffw_norm=True,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        head_dim=head_dim,
        attn_types=[AttentionType.LOCAL_SLIDING, AttentionType.GLOBAL]
        * (num_hidden_layers // 2),
        sliding_window_size=4096,
        query_pre_attn_scalar=query_pre_attn_scalar,
    )


def get_config_for_2b_v2(dtype: str = "bfloat16") -> GemmaConfig:
    return _gemma2_config(dtype, 26, 8, 4, 2304, 9216)


def get_config_for_9b(dtype: str = "bfloat16") -> GemmaConfig:
    return _gemma2_config(dtype, 42, 16, 8, 3584, 14336)


def get_config_for_27b(dtype: str = "bfloat16") -> GemmaConfig:
    return _gemma2_config(
        dtype, 46, 32, 16, 4608, 36864, head_dim=128, query_pre_attn_scalar=144
    )


def _gemma3_config(
    dtype: str,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    hidden_size: int,
    intermediate_size: int,
    sliding_window_size: int,
    max_position_embeddings: int,
    head_dim: int = 256,
    query_pre_attn_scalar: int | None = None,
    rope_scaling_factor: int | None = None,
) -> GemmaConfig:
    return GemmaConfig(
        dtype=dtype,
        architecture=Architecture.GEMMA_3,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        use_pre_ffw_norm=True,
        use_post_ffw_norm=True,
        head_dim=head_dim,
        attn_types=[AttentionType.LOCAL_SLIDING] * 5 + [AttentionType.GLOBAL],
        sliding_window_size=sliding_window_size,
        rope_wave_length={
            AttentionType.LOCAL_SLIDING: 10_000,
            AttentionType.GLOBAL: 1_000_000,
        },
        vocab_size=262_144,
        max_position_embeddings=max_position_embeddings,
        tokenizer=_GEMMA3_TOKENIZER,
        use_qk_norm=True,
        query_pre_attn_scalar=query_pre_attn_scalar,
        rope_scaling_factor=rope_scaling_factor,
        vision_config=None,  # The stand-in has no vision tower.
    )


def get_config_for_1b(dtype: str = "bfloat16") -> GemmaConfig:
    return _gemma3_config(dtype, 26, 4, 1, 1152, 6912, 512, 32_768)


def get_config_for_4b(dtype: str = "bfloat16") -> GemmaConfig:
    return _gemma3_config(
        dtype, 34, 8, 4, 2560, 10240, 1024, 131_072, rope_scaling_factor=8
    )


def get_config_for_12b(dtype: str = "bfloat16") -> GemmaConfig:
    return _gemma3_config(
        dtype, 48, 16, 8, 3840, 15360, 1024, 131_072, rope_scaling_factor=8
    )


def get_config_for_27b_v3(dtype: str = "bfloat16") -> GemmaConfig:
    return _gemma3_config(
        dtype,
        62,
        32,
        16,
        5376,
        21504,
        1024,
        131_072,
        head_dim=128,
        query_pre_attn_scalar=168,
        rope_scaling_factor=8,
    )


_VARIANTS = {
    "7b": get_config_for_7b,
    "2b": get_config_for_2b,
    "2b-v2": get_config_for_2b_v2,
    "9b": get_config_for_9b,
    "27b": get_config_for_27b,
    "1b": get_config_for_1b,
    "4b": get_config_for_4b,
    "12b": get_config_for_12b,
    "27b_v3": get_config_for_27b_v3,
}


def get_model_config(variant: str, dtype: str = "bfloat16") -> GemmaConfig:
    try:
        factory = _VARIANTS[variant]
    except KeyError:
        raise ValueError(
            f'Invalid variant {variant}. Supported variants are "7b", "2b", '
            '"2b-v2", "9b", "27b", "1b", "4b", "12b" and "27b_v3".'
        ) from None
    return factory(dtype)
