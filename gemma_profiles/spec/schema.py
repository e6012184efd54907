"""The typed shape of a profile.

These pydantic models are the single definition of what a profile may say;
`gemma_profiles.spec.profile` turns YAML into them and their validation errors into
``file:line`` messages.  Nothing here imports torch.

Sizes a profile may give a model (``config:``) are bounded by `SIZE_LIMITS`, far
beyond any Gemma (a value past them is a typo or an attack, refused before anything
is planned or allocated); whether a size that passes fits the machine is the
planner's verdict.  ``compute: {allow_float16_overflow: true}`` is the one way to keep
an explicit ``dtype: float16`` for a model whose activations overflow it (Gemma 2, 3
and Gemma 1 7b): without it the planner refuses such a profile (see `Compute`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    StrictBool,
    field_validator,
)

from gemma_profiles.spec.variants import FAMILIES, VARIANTS
from gemma_profiles.units import parse_memory

DType = Literal["float32", "float", "float16", "bfloat16"]
AttentionTypeName = Literal["GLOBAL", "LOCAL_SLIDING"]
#: gemma_pytorch's ``gemma.config.Architecture`` member names (checked against gemma's enum by the tests).
ArchitectureName = Literal["GEMMA_1", "GEMMA_2", "GEMMA_3"]

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
_MEMORY_KEY = re.compile(r"^(cpu|mps|disk|cuda:\d+|\d+)$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def _memory(value: Any) -> str:
    parse_memory(value)  # raises ValueError with the accepted forms
    return str(value)


def _device(value: str) -> str:
    if not _DEVICE.match(value):
        raise ValueError(f"unknown device {value!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return value


def _compute_capability(value: Any) -> Any:
    if isinstance(value, float):  # YAML reads 6.1 as a number
        return f"{value:.1f}"
    return value


MemorySize = Annotated[str | int, AfterValidator(_memory)]
Device = Annotated[str, AfterValidator(_device)]

#: The most a profile may set each GemmaConfig size to, and the largest value among
#: gemma_pytorch's own variants (`variants.VARIANTS`).  Each limit is at least 8x
#: the largest Gemma's; past it the value alone is not a model (2 000 000 layers,
#: 2 000 000 000 positions), and gemma would hang or fail allocating it.
SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1024, 62),
    "hidden_size": (65_536, 5376),
    "intermediate_size": (524_288, 36_864),
    "num_attention_heads": (1024, 32),
    "num_key_value_heads": (1024, 16),
    "head_dim": (4096, 256),
    "vocab_size": (4_194_304, 262_144),
    "max_position_embeddings": (1_048_576, 131_072),
    "sliding_window_size": (1_048_576, 4096),
    "query_pre_attn_scalar": (1_048_576, 256),
}
MAX_TOKENIZER_PATH = 4096


def _bounded(field: str) -> AfterValidator:
    limit, largest = SIZE_LIMITS[field]

    def check(value: int) -> int:
        if value > limit:
            raise ValueError(
                f"{value:,} is beyond any sane model: the limit is {limit:,} (the largest Gemma has {largest:,}); "
                "check the value"
            )
        return value

    return AfterValidator(check)


def _even(value: int) -> int:
    if value % 2:
        raise ValueError(f"{value} is odd: rotary embeddings turn pairs of dimensions, so head_dim must be even")
    return value


def _tokenizer(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty: give the path of a tokenizer.model file, or leave it out")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("holds a control character (a NUL, a line break): give a plain path")
    if len(value) > MAX_TOKENIZER_PATH:
        raise ValueError(f"is {len(value)} characters long (at most {MAX_TOKENIZER_PATH}): give a plain path")
    if value.startswith("~"):
        raise ValueError("starts with '~', which gemma does not expand: write the path out")
    if value.endswith(("/", "\\")):
        raise ValueError("ends with a separator: give the path of the tokenizer.model file, not a folder")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class GemmaConfigOverrides(_Strict):
    """GemmaConfig fields a profile may set; applied at model construction.

    Field names are gemma_pytorch's own (``gemma.config.GemmaConfig``).  Enum
    fields take the member's name (``architecture: GEMMA_2``).
    """

    architecture: ArchitectureName | None = None
    vocab_size: Annotated[PositiveInt, _bounded("vocab_size")] | None = None
    max_position_embeddings: Annotated[PositiveInt, _bounded("max_position_embeddings")] | None = None
    num_hidden_layers: Annotated[PositiveInt, _bounded("num_hidden_layers")] | None = None
    num_attention_heads: Annotated[PositiveInt, _bounded("num_attention_heads")] | None = None
    num_key_value_heads: Annotated[PositiveInt, _bounded("num_key_value_heads")] | None = None
    hidden_size: Annotated[PositiveInt, _bounded("hidden_size")] | None = None
    intermediate_size: Annotated[PositiveInt, _bounded("intermediate_size")] | None = None
    head_dim: Annotated[PositiveInt, _bounded("head_dim"), AfterValidator(_even)] | None = None
    rms_norm_eps: PositiveFloat | None = None
    dtype: DType | None = None
    quant: StrictBool | None = None
    tokenizer: Annotated[str, AfterValidator(_tokenizer)] | None = None
    attn_types: Annotated[list[AttentionTypeName], Field(min_length=1, max_length=1024)] | None = None
    sliding_window_size: Annotated[PositiveInt, _bounded("sliding_window_size")] | None = None
    final_logit_softcapping: PositiveFloat | None = None
    attn_logit_softcapping: PositiveFloat | None = None
    query_pre_attn_scalar: Annotated[PositiveInt, _bounded("query_pre_attn_scalar")] | None = None
    use_pre_ffw_norm: StrictBool | None = None
    use_post_ffw_norm: StrictBool | None = None
    rope_wave_length: dict[AttentionTypeName, PositiveInt] | None = None
    use_qk_norm: StrictBool | None = None
    rope_scaling_factor: PositiveInt | None = None


# GemmaConfig fields that exist but a profile cannot set, and why.
NOT_OVERRIDABLE = {
    "vision_config": "it is a nested SigLIP config object; choose a variant instead",
}


class Hardware(_Strict):
    """The machine a profile is written for (documentation and `detect` matching)."""

    device: Literal["cpu", "cuda", "mps"]
    gpu: list[str] = Field(default_factory=list, description="GPU model names this profile fits")
    compute_capability: Annotated[str | None, BeforeValidator(_compute_capability)] = Field(
        default=None, pattern=r"^\d{1,2}\.\d$"
    )
    memory: MemorySize | None = Field(default=None, description="accelerator memory")
    host_memory: MemorySize | None = Field(default=None, description="system RAM")
    cpu_cores: PositiveInt | None = None

    def capability_tuple(self) -> tuple[int, int] | None:
        if self.compute_capability is None:
            return None
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)


class Placement(_Strict):
    """Where the model runs and what may be offloaded."""

    device: Device | None = None
    device_map: Literal["auto"] | dict[str, str] | None = None
    max_memory: dict[str, MemorySize] | None = None
    offload: Literal["none", "cpu", "disk"] = "none"
    offload_folder: str | None = None
    tensor_parallel: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1,
        description="ranks that share each layer's attention heads and MLP (docs/parallel.md): "
        "run the script under 'torchrun --nproc-per-node N'; 1: one process",
    )
    tensor_parallel_timeout: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=300.0,
        description="seconds a rank waits for the others (joining, each collective) before it stops with one line",
    )

    @field_validator("max_memory")
    @classmethod
    def _memory_keys(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key in value or {}:
            if not _MEMORY_KEY.match(key):
                raise ValueError(f"max_memory key {key!r} is not a device: use 'cuda:N', 'cpu', 'mps' or 'disk'")
        return value


class Quantization(_Strict):
    """How weights are stored.

    ``int8`` sets gemma's own ``quant`` flag (int8 weights, per-row scales).
    ``float16`` stores the weights in float16 while every layer computes in the
    compute dtype (``config.dtype``, float32): half float32's weight memory with
    float32's arithmetic, for Gemma 2/3 on GPUs where float16 compute overflows and
    bfloat16 is not native.  The plan carries it as ``Plan.weight_storage``.
    """

    weights: Literal["none", "int8", "float16"] = "none"


class Generation(_Strict):
    """The workload the memory plan is sized for (``plan --batch/--seq-len`` override it)."""

    batch: PositiveInt = 1
    seq_len: PositiveInt = 1024


class Loading(_Strict):
    """How the checkpoint is read (docs/loading.md).

    ``mmap: false`` copies every weight the loader would leave memory-mapped into
    the process's own memory: a checkpoint changed on disk after loading cannot
    reach the model (the cost: those weights are read at load, not on first use).
    """

    mmap: StrictBool = True


class Compute(_Strict):
    """Deliberate exceptions to the compute-dtype rules.

    ``allow_float16_overflow: true`` keeps an explicit ``config.dtype: float16`` for a
    model whose activations overflow float16 (Gemma 2, Gemma 3, Gemma 1 7b): the
    planner refuses that combination otherwise, because such a model returns empty or
    garbage text rather than an error (a real Gemma 3 in float16 generates '').  Set
    it only to study the overflow; the plan still carries a warning.
    """

    allow_float16_overflow: StrictBool = False


class ProfileBody(_Strict):
    """The part of a profile that variant overrides may change."""

    config: GemmaConfigOverrides = Field(default_factory=GemmaConfigOverrides)
    placement: Placement = Field(default_factory=Placement)
    quantization: Quantization = Field(default_factory=Quantization)
    generation: Generation = Field(default_factory=Generation)
    loading: Loading = Field(default_factory=Loading)
    compute: Compute = Field(default_factory=Compute)


class ProfileModel(ProfileBody):
    """A whole profile file, after ``extends`` has been merged in."""

    name: Annotated[str, Field(pattern=_NAME.pattern)]
    description: str = ""
    extends: str | list[str] | None = None
    abstract: StrictBool = False
    hardware: Hardware | None = None
    variants: dict[str, ProfileBody] = Field(default_factory=dict)

    @field_validator("variants")
    @classmethod
    def _variant_keys(cls, value: dict[str, ProfileBody]) -> dict[str, ProfileBody]:
        for key in value:
            if key not in VARIANTS and key not in FAMILIES:
                raise ValueError(f"unknown variant {key!r}")
        return value


VARIANT_KEYS = (*VARIANTS, *FAMILIES)
