"""Profile (+ hardware, variant, workload) -> `Plan`: what will be done to one model, and why.

Explicit profile values always win; every automatic choice carries its reason.
Planning never imports torch: hardware arrives as a `Target` built from the
profile's ``hardware:`` facts (``gemma-profile plan``) or from detected
`Hardware` (``GEMMA_PROFILE=auto`` and the preflight at construction).

The plan sizes the model gemma will build: the variant's (or the caller's) shape
with the profile's ``config:`` values applied.  A shape gemma would refuse (heads
that do not divide) or that no machine can address is refused here, naming the
profile's field and line; whether it fits this machine is the verdict.  Explicit
dtypes are held to the same rules as automatic ones: bfloat16 needs compute
capability 8.0 on a GPU, and float16 is refused for models whose activations
overflow it unless ``compute: {allow_float16_overflow: true}`` says the profile
means it.  `plan_problems` runs every one of these checks for ``validate``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gemma_profiles.errors import GemmaProfileError, printable
from gemma_profiles.planning.hardware import Hardware, native_int8_expected, native_int8_path
from gemma_profiles.planning.memory import (
    ADDRESSABLE_BYTES,
    DTYPE_BYTES,
    MemoryEstimate,
    ModelShape,
    estimate_memory,
    reserve_for,
)
from gemma_profiles.spec import schema
from gemma_profiles.spec.profile import ExtendsResolver, Problem, Profile, ResolveCache, load_profile, problems_in
from gemma_profiles.spec.variants import FLOAT16_UNSAFE_FAMILIES, VARIANTS, family_of_architecture, float16_unsafe
from gemma_profiles.units import format_bytes, parse_memory

FAMILY_OF = {name: shape.family for name, shape in VARIANTS.items()}
NATIVE_BF16 = (8, 0)
MIN_FP16 = (6, 0)


@dataclass(frozen=True)
class Setting:
    """A resolved value and where it came from (``file:line``, or ``auto: <reason>``)."""

    value: Any
    origin: str


@dataclass(frozen=True)
class Target:
    """The machine a plan is for: its accelerator (if any) and host memory."""

    device: str  # "cpu", "cuda:0", "mps"
    name: str = ""
    compute_capability: tuple[int, int] | None = None
    memory: int | None = None  # accelerator memory, bytes
    host_memory: int | None = None
    cpu_isa: tuple[str, ...] = ()
    #: whether the CPU computes bfloat16 natively (AVX512-BF16, AMX, Arm BF16); None: not known
    cpu_bf16: bool | None = None
    #: where the facts come from: ``"detected"`` or ``"<profile>'s hardware: section"``
    source: str = "profile"

    @classmethod
    def of_profile(cls, profile: Profile) -> Target | None:
        hardware = profile.model.hardware
        if hardware is None:
            return None
        device = profile.model.placement.device or ("cuda:0" if hardware.device == "cuda" else hardware.device)
        return cls(
            normalize_device(device),
            ", ".join(hardware.gpu),
            hardware.capability_tuple(),
            parse_memory(hardware.memory) if hardware.memory is not None else None,
            parse_memory(hardware.host_memory) if hardware.host_memory is not None else None,
            ("avx2",) if hardware.device != "cuda" else (),
            None,
            f"{profile.name}'s {HARDWARE_SECTION}",
        )

    @classmethod
    def of_hardware(cls, hardware: Hardware, device: str | None = None) -> Target:
        device = normalize_device(device or ("cuda:0" if hardware.gpus else "cpu"))
        gpu = hardware.gpu(device)
        return cls(
            device,
            gpu.name if gpu else hardware.cpu.name,
            gpu.compute_capability if gpu else None,
            gpu.total_memory if gpu else None,
            hardware.cpu.total_memory,
            hardware.cpu.isa,
            native_cpu_bf16(hardware.cpu.isa),
            "detected",
        )


HARDWARE_SECTION = "hardware: section"


def describe_source(source: str) -> str:
    """A `Target.source` as a phrase: ``described by t4's hardware: section``, ``detected on this machine``."""
    if source == "detected":
        return "detected on this machine"
    if source.endswith(HARDWARE_SECTION):
        return f"described by {source}"
    return source


def _capacity_source(source: str) -> str:
    """Where a capacity figure comes from: ``from t4's hardware: section``, ``detected``."""
    return source if source == "detected" else f"from {source}"


@dataclass(frozen=True)
class Budget:
    """Memory one device may use."""

    device: str
    available: int
    note: str


@dataclass(frozen=True)
class Verdict:
    """Whether the plan fits, by how much it does not, and the cheapest change that would."""

    fits: bool
    message: str
    shortfall: int = 0
    suggestion: str | None = None


@dataclass(frozen=True)
class Plan:
    """What the active profile does to one model.

    :param config: GemmaConfig field -> `Setting` (explicit or automatic).
    :param device: where the model runs, or None to keep the script's choice.
    :param placement: the profile's placement section.
    :param quantization: ``"none"``, ``"int8"`` or ``"float16"`` (the profile's ``quantization.weights``).
    :param memory: the estimate, when the model's shape is known.
    :param budgets: memory each device may use, when the hardware is known.
    :param verdict: fits or not, when both are known.
    :param layers: decoder layer index ranges -> device (offloaded ones on ``cpu``/``disk``).
    :param loading: the profile's loading section (``mmap``).
    :param resized: the profile's ``config:`` values that change the model's size, with
        where each is set (``num_hidden_layers: 40 (cpu.yaml:7)``); named in a verdict
        that does not fit.
    """

    profile: str
    profile_path: str
    variant: str | None
    family: str | None
    config: dict[str, Setting]
    device: Setting | None
    placement: schema.Placement
    quantization: str
    overrides: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    target: Target | None = None
    batch: int = 1
    seq_len: int = 1024
    memory: MemoryEstimate | None = None
    budgets: tuple[Budget, ...] = ()
    verdict: Verdict | None = None
    layers: dict[str, str] = field(default_factory=dict)
    loading: schema.Loading = field(default_factory=schema.Loading)
    resized: tuple[str, ...] = ()
    #: ``"float16"``: weights are stored in float16 and each layer computes in ``dtype``
    #: (float32); None: weights are stored in the compute dtype (or int8, see ``quantization``).
    weight_storage: str | None = None
    #: where the tied embedder stays when not on the execution device (``cpu``, ``disk``), and why;
    #: None: on the execution device.  An automatic choice is also written into
    #: ``placement.device_map`` (with the layer map), which is what ``hooks/offload.py`` reads.
    embedder: Setting | None = None

    @property
    def offloads(self) -> bool:
        """Whether the placement offloads or maps modules (``hooks/offload.py`` places them after loading)."""
        return self.placement.offload != "none" or isinstance(self.placement.device_map, dict)

    def runs_on_cpu(self, device_problem: Callable[[str], str | None]) -> bool:
        """Whether the whole model computes on the CPU: nothing is offloaded or mapped, and the
        plan's device is ``cpu`` - or, without one, the script has no CUDA or MPS device to move
        the model to.  The CPU kernels (the ``quantization``, ``kernels`` and ``fused`` builtins)
        apply only then.

        :param device_problem: why a device (``cuda``, ``mps``) cannot be used here, or None when
            it can (`gemma_profiles.engine.devices.device_problem`; a test passes its own).  Asked
            only of a plan without a device: the planner itself never imports torch.
        """
        if self.offloads:
            return False
        if self.device is not None:
            return str(self.device.value).split(":")[0] == "cpu"
        return all(device_problem(kind) is not None for kind in ("cuda", "mps"))

    @property
    def dtype(self) -> str | None:
        setting = self.config.get("dtype")
        return None if setting is None else str(setting.value)

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "profile_path": self.profile_path,
            "variant": self.variant,
            "family": self.family,
            "overrides_applied": list(self.overrides),
            "dtype": self.dtype,
            "quantization": self.quantization,
            "weight_storage": self.weight_storage,
            "embedder": None if self.embedder is None else {"value": self.embedder.value, "from": self.embedder.origin},
            "device": None if self.device is None else self.device.value,
            "config": {k: {"value": s.value, "from": s.origin} for k, s in self.config.items()},
            "placement": self.placement.model_dump(exclude_unset=True),
            "layers": self.layers,
            "batch": self.batch,
            "seq_len": self.seq_len,
            "target": None if self.target is None else self.target.__dict__,
            "memory": None if self.memory is None else self.memory.as_dict(),
            "budgets": [b.__dict__ for b in self.budgets],
            "verdict": None if self.verdict is None else self.verdict.__dict__,
            "warnings": list(self.warnings),
            "resized": list(self.resized),
        }


def normalize_device(device: str) -> str:
    return "cuda:0" if device == "cuda" else device


#: CPU flags (Linux ``/proc/cpuinfo``) of native bfloat16 arithmetic: x86 AVX512-BF16 and AMX-BF16,
#: Arm's BF16 extension.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def native_cpu_bf16(isa: tuple[str, ...]) -> bool | None:
    """Whether detected ISA flags include native bfloat16; None when no flags were read at all."""
    if not isa:
        return None
    return any(flag in isa for flag in CPU_BF16_FLAGS)


OFFLOAD_TARGETS = ("cpu", "disk")
#: ``device_map`` keys naming decoder layers: ``3``, ``10-17``, ``layers.3``, ``model.layers.10-17``.
_LAYER_KEY = re.compile(r"^(?:(?:model\.)?layers\.)?(\d+)(?:-(\d+))?$")
#: ``device_map`` keys naming the tied embedder (``Gemma3ForMultimodalLM`` calls it ``text_token_embedder``).
EMBEDDER_KEYS = ("embedder", "text_token_embedder")


def split_device_map(
    device_map: dict[str, str], num_layers: int, where: str = "placement.device_map"
) -> tuple[dict[int, str], str | None]:
    """An explicit ``device_map`` as (layer index -> device, embedder device or None).

    Values are devices (``cuda`` means ``cuda:0``), ``cpu`` or ``disk``; layers it
    does not name stay on the execution device.

    :raises GemmaProfileError: for a key that is neither a decoder layer (range) nor
        the embedder, or a layer index the model does not have.
    """
    layers: dict[int, str] = {}
    embedder: str | None = None
    for key, value in device_map.items():
        device = normalize_device(str(value))
        if key in EMBEDDER_KEYS:
            embedder = device
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            raise GemmaProfileError(
                f"device_map key {key!r} names neither decoder layers nor the embedder",
                where=where,
                hint="use layer ranges ('0-12', 'model.layers.13') or 'embedder'; the final norm and the rope "
                "tables always stay on the execution device",
            )
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if first > last or last >= num_layers:
            raise GemmaProfileError(
                f"device_map key {key!r}: this model has decoder layers 0-{num_layers - 1}", where=where
            )
        for index in range(first, last + 1):
            layers[index] = device
    return layers, embedder


def compress_layers(devices: list[str]) -> dict[str, str]:
    """Per-layer devices as ranges: ``["cuda:0", "cuda:0", "cpu"]`` -> ``{"0-1": "cuda:0", "2-2": "cpu"}``."""
    ranges: dict[str, str] = {}
    start = 0
    for index in range(1, len(devices) + 1):
        if index == len(devices) or devices[index] != devices[start]:
            ranges[f"{start}-{index - 1}"] = devices[start]
            start = index
    return ranges


def expand_layers(layers: dict[str, str]) -> dict[int, str]:
    """``plan.layers`` ranges back to layer index -> device."""
    expanded: dict[int, str] = {}
    for span, device in layers.items():
        first, _, last = span.partition("-")
        for index in range(int(first), int(last or first) + 1):
            expanded[index] = device
    return expanded


def choose_dtype(target: Target | None, variant: str | None, family: str | None) -> Setting | None:
    """The compute dtype for a machine and model when the profile names none."""
    if target is None:
        return None
    unsafe = float16_unsafe(variant, family)
    model = variant or family or "this model"
    if target.device.startswith("cuda"):
        cc = target.compute_capability
        if cc is None:
            return Setting("float32", "auto: compute capability unknown, float32 is safe everywhere")
        cc_text = f"{cc[0]}.{cc[1]}"
        if cc >= NATIVE_BF16:
            return Setting("bfloat16", f"auto: native bfloat16 on compute capability {cc_text} (>= 8.0)")
        if cc >= MIN_FP16 and not unsafe:
            return Setting("float16", f"auto: no native bfloat16 below 8.0 (this GPU: {cc_text}); float16 is native")
        if cc >= MIN_FP16:
            return Setting("float32", f"auto: no native bfloat16 on {cc_text}, and float16 overflows for {model}")
        return Setting("float32", f"auto: compute capability {cc_text} < 6.0 has neither fast float16 nor bfloat16")
    if target.cpu_bf16:
        return Setting("bfloat16", "auto: this CPU computes bfloat16 natively (AVX512-BF16, AMX or Arm BF16)")
    if "avx2" in target.cpu_isa or any(flag.startswith("avx512") for flag in target.cpu_isa):
        return Setting("bfloat16", f"auto: {CPU_BF16_MEASURED}")
    return Setting("float32", "auto: no AVX2 on this CPU, float32 avoids slow bfloat16 conversion")


#: Why bfloat16 on an AVX2 CPU without native bfloat16 (docs/planning.md, "Compute dtype on a CPU").
CPU_BF16_MEASURED = (
    "decode reads half the bytes: 1.4x float32's tokens/s without native bfloat16 (AVX2, Gemma 3 270M); "
    "prompts run 2-5x slower there (compute-bound), so for long prompts set dtype: float32"
)


def check_dtype(dtype: Setting, target: Target | None, profile: str) -> None:
    """An explicit bfloat16 on a GPU without native support fails here, before construction."""
    if target is None or dtype.value != "bfloat16" or not target.device.startswith("cuda"):
        return
    cc = target.compute_capability
    if cc is not None and cc < NATIVE_BF16:
        raise GemmaProfileError(
            f"{target.name or target.device} (compute capability {cc[0]}.{cc[1]}) has no native bfloat16, "
            f"but profile '{profile}' asks for it",
            where=dtype.origin,
            hint="use dtype float16 for Gemma 1 2b, float32 for Gemma 2/3 and 7b",
        )


FAMILY_NAMES = {"gemma1": "Gemma 1", "gemma2": "Gemma 2", "gemma3": "Gemma 3"}


def _overflowing(variant: str | None, family: str | None) -> str:
    """The model float16 overflows for, as a user reads it: ``Gemma 2``, ``Gemma 1 7b``."""
    if family in FLOAT16_UNSAFE_FAMILIES:
        return FAMILY_NAMES[str(family)]
    return f"{FAMILY_NAMES.get(family or '', 'Gemma')} {variant}" if variant else "this model"


def check_float16(
    dtype: Setting,
    variant: str | None,
    family: str | None,
    target: Target | None,
    profile: str,
    allowed: bool,
) -> None:
    """An explicit float16 for a model whose activations overflow it fails here, unless the profile allows it.

    The overflow is silent: no error, only inf/NaN logits, and text that is empty (a real
    Gemma 3 in float16 returns '') or garbage.
    """
    if dtype.value != "float16" or allowed or not float16_unsafe(variant, family):
        return
    cc = target.compute_capability if target is not None and target.device.startswith("cuda") else None
    if cc is not None and cc >= NATIVE_BF16:
        use = "bfloat16 (native on this GPU) or float32"
    elif cc is not None:
        use = (
            f"float32, or int8 weights with float32 compute (quantization: {{weights: int8}}); "
            f"bfloat16 needs compute capability >= 8.0 (this GPU: {cc[0]}.{cc[1]})"
        )
    else:
        use = "float32, or int8 weights with float32 compute (quantization: {weights: int8}), or bfloat16 "
        use += "(on a GPU: compute capability >= 8.0)"
    key = family if family in FLOAT16_UNSAFE_FAMILIES else variant
    raise GemmaProfileError(
        f"float16 compute overflows for {_overflowing(variant, family)} (activations reach ~1e5; the model "
        f"returns empty or garbage text, without an error), but profile '{profile}' asks for float16",
        where=dtype.origin,
        hint=f"use {use}, e.g. variants: {{{key}: {{config: {{dtype: float32}}}}}}; "
        "'compute: {allow_float16_overflow: true}' keeps float16 on purpose",
    )


#: gemma_pytorch's own checks on a config (``assert`` in its constructors), as (field, divides field).
_DIVIDES = (("num_key_value_heads", "num_attention_heads"), ("num_attention_heads", "hidden_size"))


def check_shape(
    shape: ModelShape, overrides: dict[str, Setting], dtype: str | None, int8: bool, profile: str, model: str
) -> None:
    """A shape gemma would refuse, or one no machine can hold, fails here, naming the profile's field.

    Only shapes the profile changed are checked: gemma's own variants are gemma's business.
    """
    for part, whole in _DIVIDES:
        if part not in overrides and whole not in overrides:
            continue
        a, b = getattr(shape, part), getattr(shape, whole)
        if b % a:
            blamed = overrides.get(part) or overrides[whole]
            raise GemmaProfileError(
                f"config.{whole} {b} is not a multiple of config.{part} {a} for {FAMILY_NAMES.get(model, model)} "
                f"(gemma_pytorch asserts it while building the model)",
                where=blamed.origin,
                hint=f"set {part} and {whole} so that {whole} / {part} is a whole number",
            )
    resized = {name: overrides[name] for name in _SIZE_FIELDS if name in overrides}
    if not resized:
        return
    need = shape.weight_bytes(dtype if dtype in DTYPE_BYTES else "bfloat16", int8)
    rope = (2 if shape.family == "gemma3" else 1) * 2 * shape.max_position_embeddings * (shape.head_dim // 2) * 8
    if need + rope > ADDRESSABLE_BYTES:
        largest = max(resized, key=lambda name: getattr(shape, name) / max(1, _variant_value(model, name)))
        raise GemmaProfileError(
            f"{model} with config.{largest}: {getattr(shape, largest):,} needs {format_bytes(need + rope)} for its "
            f"weights alone, more than a process can address ({format_bytes(ADDRESSABLE_BYTES)})",
            where=resized[largest].origin,
            hint="check the profile's config sizes: " + ", ".join(_resized(shape, resized)),
        )


_SIZE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "sliding_window_size",
)


def _variant_value(model: str, name: str) -> int:
    shape = VARIANTS.get(model)
    value = getattr(shape, name, None) if shape is not None else None
    return value if isinstance(value, int) else 1


def _resized(shape: ModelShape, overrides: dict[str, Setting]) -> list[str]:
    return [f"{name}: {getattr(shape, name):,} ({overrides[name].origin})" for name in overrides]


def make_plan(
    profile: Profile,
    variant: str | None = None,
    family: str | None = None,
    *,
    target: Target | None = None,
    shape: ModelShape | None = None,
    batch: int | None = None,
    seq_len: int | None = None,
) -> Plan:
    """Resolve ``profile`` for one model, and size it against ``target`` when given.

    :param target: the machine; defaults to the profile's own ``hardware:`` facts.
    :param shape: the model's shape; defaults to the variant's.
    """
    if family is None and variant is not None:
        family = FAMILY_OF.get(variant)
    resolved = profile.resolve(variant, family)
    model = resolved.model
    target = target or Target.of_profile(resolved)
    if shape is None and variant in VARIANTS:
        shape = ModelShape.of_variant(variant)

    def origin(*key: str) -> str:
        found = resolved.origin(*key)
        return str(found) if found else f"profile {profile.name}"

    overrides = model.config.model_dump(exclude_unset=True)
    config = {name: Setting(value, origin("config", name)) for name, value in overrides.items()}
    # The model gemma builds: the profile's config values rewrite the caller's.
    family = family_of_architecture(overrides.get("architecture")) or family
    if shape is not None:
        shape = shape.with_overrides(overrides)
    explicit_quant = "weights" in model.quantization.model_fields_set
    quantization = model.quantization.weights
    if explicit_quant:
        config["quant"] = Setting(quantization == "int8", origin("quantization", "weights"))
    if "dtype" in config:
        check_dtype(config["dtype"], target, profile.name)
        if quantization == "float16":
            check_storage(config["dtype"], origin("quantization", "weights"), profile.name)
        else:
            check_float16(config["dtype"], variant, family, target, profile.name, model.compute.allow_float16_overflow)
    elif quantization == "float16":
        config["dtype"] = Setting("float32", "auto: float16 storage computes in float32 (quantization.weights)")
    else:
        chosen = choose_dtype(target, variant, family)
        if chosen is not None:
            config["dtype"] = chosen
    if shape is not None:
        dtype = config.get("dtype")
        check_shape(
            shape,
            config,
            None if dtype is None else str(dtype.value),
            quantization == "int8",
            profile.name,
            variant or family or "the model",
        )
    device = None
    if model.placement.device is not None:
        device = Setting(model.placement.device, origin("placement", "device"))
    embedder = None
    if isinstance(model.placement.device_map, dict):
        named = next(
            (str(model.placement.device_map[k]) for k in EMBEDDER_KEYS if k in model.placement.device_map), None
        )
        if named is not None:
            embedder = Setting(normalize_device(named), origin("placement", "device_map"))
    generation = model.generation
    plan = Plan(
        profile=profile.name,
        profile_path=str(profile.path),
        variant=variant,
        family=family,
        config=config,
        device=device,
        placement=model.placement,
        quantization=quantization,
        overrides=resolved.applied_overrides,
        warnings=tuple(_warnings(config, variant, family)),
        target=target,
        batch=batch or generation.batch,
        seq_len=min(seq_len or generation.seq_len, shape.max_position_embeddings if shape else 10**9),
        loading=model.loading,
        resized=tuple(_resized(shape, {n: config[n] for n in _SIZE_FIELDS if n in config})) if shape else (),
        weight_storage="float16" if quantization == "float16" else None,
        embedder=embedder,
    )
    if shape is None or plan.dtype not in DTYPE_BYTES or target is None:
        return plan
    sized = _size(plan, shape, target)
    if not explicit_quant and sized.verdict is not None and not sized.verdict.fits:
        # From the unsized plan: the split sizing wrote (device_map) was for the larger weights.
        int8 = _size(_with_quant(plan, "auto: the weights do not fit in " + str(plan.dtype)), shape, target)
        if int8.verdict is not None and int8.verdict.fits:
            return int8
    return sized


def check_storage(dtype: Setting, storage_origin: str, profile: str) -> None:
    """float16 storage is for float32 compute; any other compute dtype is refused, naming both settings."""
    if dtype.value in ("float32", "float"):
        return
    if dtype.value == "float16":
        what = (
            "float16 storage with float16 compute is plain float16: the activations still overflow for Gemma 2/3 "
            "(and 7b), which float16 storage exists to avoid"
        )
        use = "config.dtype: float32 with quantization: {weights: float16}, or drop quantization.weights"
    else:
        what = f"float16 storage with {dtype.value} compute converts every weight to a 16-bit type it could have "
        what += "been stored in"
        use = f"leave quantization.weights out (weights are then stored in {dtype.value}), or compute in float32"
    raise GemmaProfileError(
        f"profile '{profile}' stores weights in float16 ({storage_origin}) but computes in {dtype.value}: {what}",
        where=dtype.origin,
        hint=f"float16 storage is meant for float32 compute; use {use}",
    )


def profile_problems(
    path: str | Path, resolve_extends: ExtendsResolver | None = None, *, cache: ResolveCache | None = None
) -> list[Problem]:
    """Every problem ``validate`` reports for one file: loading it, then `plan_problems`."""
    problems = problems_in(path, resolve_extends, cache=cache)
    if problems:
        return problems
    return plan_problems(load_profile(path, resolve_extends, cache=cache))


def plan_problems(profile: Profile) -> list[Problem]:
    """What ``show`` and ``plan`` would refuse in ``profile``, for any variant; ``validate`` reports these.

    Plans the profile for no variant and for each gemma variant against its own
    ``hardware:`` facts (dtype rules, sizes from ``config:``, the device map).  An
    abstract profile is a base for others and is checked through them.  One problem
    found for several variants is reported once, naming them.  Two more that only
    ``validate`` can say: a profile that fits no variant on its own hardware, and an
    absolute ``config.tokenizer`` that is no file here (a relative one is looked up
    from the working directory when the model is built).
    """
    if profile.model.abstract:
        return []
    found: dict[tuple[str, str], tuple[str, list[str]]] = {}
    verdicts: list[tuple[str, Verdict]] = []
    for variant in (None, *VARIANTS):
        try:
            plan = make_plan(profile, variant)
        except GemmaProfileError as exc:
            text = exc.message + (f" ({exc.hint})" if exc.hint else "")
            where = exc.where or str(profile.path)
            # One check failing for several variants differs only in their numbers and names.
            key = (where, _NUMBERED.sub("#", text))
            found.setdefault(key, (text, []))[1].append(variant or "no variant")
            continue
        if variant is not None and plan.verdict is not None:
            verdicts.append((variant, plan.verdict))
    problems = [
        Problem(
            where, text if len(variants) in (1, len(VARIANTS) + 1) else f"{text} [also for {', '.join(variants[1:])}]"
        )
        for (where, _), (text, variants) in found.items()
    ]
    if verdicts and not any(verdict.fits for _, verdict in verdicts):
        variant, verdict = min(verdicts, key=lambda item: item[1].shortfall)
        hardware = profile.origin("hardware")
        problems.append(
            Problem(
                str(hardware) if hardware else str(profile.path),
                f"fits no gemma variant on its own hardware; the closest, {variant}, {verdict.message}"
                + (f" (cheapest change that fits: {verdict.suggestion})" if verdict.suggestion else ""),
            )
        )
    tokenizer = profile.model.config.tokenizer
    if tokenizer is not None and os.path.isabs(tokenizer) and not os.path.isfile(tokenizer):
        origin = profile.origin("config", "tokenizer")
        problems.append(
            Problem(
                str(origin) if origin else str(profile.path),
                f"config.tokenizer: no file '{printable(tokenizer)}' on this machine (building a model would stop "
                "there; give the path of your tokenizer.model)",
            )
        )
    return problems


_NUMBERED = re.compile(r"[\w.,:-]*\d[\w.,:-]*")


def _with_quant(plan: Plan, reason: str) -> Plan:
    config = dict(plan.config)
    config["quant"] = Setting(True, reason)
    return replace(plan, config=config, quantization="int8", weight_storage=None)


def _with_storage(plan: Plan) -> Plan:
    config = {**plan.config, "quant": Setting(False, "suggestion")}
    return replace(plan, config=config, quantization="float16", weight_storage="float16")


def _warnings(config: dict[str, Setting], variant: str | None, family: str | None) -> list[str]:
    dtype = config.get("dtype")
    if dtype is not None and dtype.value == "float16" and float16_unsafe(variant, family):
        return [
            f"float16 compute overflows for {_overflowing(variant, family)} (activations reach ~1e5), kept because "
            "the profile sets compute.allow_float16_overflow; expect empty or garbage text "
            f"(dtype set at {dtype.origin})"
        ]
    return []


def memory_limits(placement: schema.Placement) -> dict[str, str | int]:
    """``placement.max_memory`` by device name: ``cuda`` and a bare GPU index (``1``) as ``cuda:N``."""
    return {normalize_device(k) if not k.isdigit() else f"cuda:{k}": v for k, v in (placement.max_memory or {}).items()}


def budgets_for(plan: Plan, target: Target, stages: tuple[str, ...] = ()) -> dict[str, Budget]:
    """What each device may use: ``max_memory`` when the profile sets it, else capacity minus reserve.

    :param stages: other accelerators that compute layers (a pipeline): a stage ``max_memory``
        does not name is taken to be a GPU like the execution device (the profile's hardware
        section describes one GPU).
    """
    limits = memory_limits(plan.placement)
    budgets: dict[str, Budget] = {}
    capacities = {"cpu": target.host_memory}
    if target.device != "cpu":
        capacities[target.device] = target.memory
    for stage in stages:
        capacities[stage] = target.memory
    for device, capacity in capacities.items():
        if device in limits:
            budgets[device] = Budget(device, parse_memory(limits[device]), "placement.max_memory")
        elif capacity is not None:
            reserve = reserve_for(capacity)
            source = _capacity_source(target.source)
            if device in stages:
                source = f"as {target.device} ({source})"
            budgets[device] = Budget(
                device,
                capacity - reserve,
                f"{format_bytes(capacity)} {source}, less a {format_bytes(reserve)} reserve",
            )
    return budgets


def pipeline_stages(plan: Plan, target: Target) -> tuple[str, ...]:
    """The other GPUs layers may be split over when no ``device_map`` says where: each ``cuda:N``
    that ``max_memory`` names besides the execution device, by index (a pipeline; docs/parallel.md)."""
    if (
        not target.device.startswith("cuda")
        or isinstance(plan.placement.device_map, dict)
        or plan.placement.tensor_parallel > 1  # (each rank has one GPU of its own)
    ):
        return ()
    others = [d for d in memory_limits(plan.placement) if d.startswith("cuda:") and d != target.device]
    return tuple(sorted(others, key=lambda d: int(d.split(":")[1])))


def stage_problem(device: str, home: str, tensor_parallel: int = 1) -> str | None:
    """Why decoder layers mapped to ``device`` (a ``device_map`` value) cannot run there beside the
    execution device ``home``; None when they can (``home`` itself and the offload targets included)."""
    if device in OFFLOAD_TARGETS or device == home:
        return None
    if not re.fullmatch(r"cuda:\d+", device):
        return f"'{device}' is not a device layers can run on (cuda:N), nor cpu or disk (offload)"
    if not home.startswith("cuda"):
        return f"layers on {device} need the model to run on a CUDA device too (it runs on {home})"
    if tensor_parallel > 1:
        return (
            f"it maps layers to {device} and asks for tensor parallel: each rank computes on one GPU of "
            "its own; a device_map over several GPUs is a pipeline in one process - use one or the other"
        )
    return None


def _estimate(
    plan: Plan,
    shape: ModelShape,
    target: Target,
    offloaded: int = 0,
    seq_len: int | None = None,
    offload_device: str = "cpu",
    stages: dict[str, int] | None = None,
) -> MemoryEstimate:
    return estimate_memory(
        shape.per_rank(plan.placement.tensor_parallel),  # tensor parallel: one rank's share
        dtype=str(plan.dtype),
        int8=plan.quantization == "int8",
        device=target.device,
        batch=plan.batch,
        seq_len=seq_len or plan.seq_len,
        offloaded_layers=offloaded,
        offload_device=offload_device,
        cpu_int8_kernel=native_int8_expected(target.cpu_isa),
        cpu_int8_wide_prompts=native_int8_path(target.cpu_isa) == "avx2",
        embedder_device=None if plan.embedder is None else str(plan.embedder.value),
        weight_storage=plan.weight_storage,
        stages=stages,
    )


def _shortfall(estimate: MemoryEstimate, budgets: dict[str, Budget]) -> dict[str, int]:
    return {
        device: need - budgets[device].available
        for device, need in estimate.required.items()
        if device in budgets and need > budgets[device].available
    }


def _fit_layers(
    plan: Plan, shape: ModelShape, target: Target, budgets: dict[str, Budget]
) -> tuple[int, MemoryEstimate]:
    """Offload layers (to ``placement.offload``) until the execution device's budget holds the rest."""
    layers = shape.num_hidden_layers
    offload = plan.placement.offload
    offloaded = 0
    estimate = _estimate(plan, shape, target)
    offloading = offload != "none" and (target.device != "cpu" or offload == "disk")
    while offloading and offloaded < layers and _shortfall(estimate, budgets).get(target.device, 0) > 0:
        offloaded += 1
        estimate = _estimate(plan, shape, target, offloaded, offload_device=offload)
    return offloaded, estimate


def _embedder_on_cpu(plan: Plan, shape: ModelShape, target: Target, reason: str) -> Plan:
    size = shape.embedding_bytes(str(plan.weight_storage or plan.dtype), False)
    why = f"auto: the tied embedder ({format_bytes(size)} in {plan.weight_storage or plan.dtype}) {reason}"
    return replace(plan, embedder=Setting("cpu", why + "; its lookup and the sampler run on the CPU"))


def _size(plan: Plan, shape: ModelShape, target: Target) -> Plan:
    budgets = budgets_for(plan, target)
    layers = shape.num_hidden_layers
    offload = plan.placement.offload
    device_map = plan.placement.device_map
    stages: dict[str, int] = {}
    if isinstance(device_map, dict):
        # An explicit map wins; "cpu" on a CPU target is simply resident; another GPU computes its layers.
        where_map = f"{plan.profile_path} placement.device_map"
        named, _ = split_device_map(device_map, layers, where_map)
        devices = [named.get(index, target.device) for index in range(layers)]
        for device in dict.fromkeys(devices):
            problem = stage_problem(device, target.device, plan.placement.tensor_parallel)
            if problem:
                raise GemmaProfileError(f"profile '{plan.profile}': {problem}", where=where_map)
            if device not in OFFLOAD_TARGETS and device != target.device:
                stages[device] = devices.count(device)
        budgets = budgets_for(plan, target, tuple(stages))
        stored = [d for d in devices if d in OFFLOAD_TARGETS and d != target.device]
        offloaded = len(stored)
        where = "disk" if stored and all(d == "disk" for d in stored) else "cpu"
        if plan.embedder is not None and plan.embedder.value == target.device:
            plan = replace(plan, embedder=None)
        estimate = _estimate(plan, shape, target, offloaded, offload_device=where, stages=stages)
        layer_map = compress_layers(devices)
    elif pipeline_stages(plan, target) and _shortfall(_estimate(plan, shape, target), budgets).get(target.device):
        layer_map, stages, estimate, budgets = _split_over_gpus(plan, shape, target)
        offloaded = 0
        # hooks/offload.py places from the device_map: the plan writes the split there.
        mapped = {**layer_map, **({} if plan.embedder is None else {"embedder": str(plan.embedder.value)})}
        plan = replace(plan, placement=plan.placement.model_copy(update={"device_map": mapped}))
    else:
        # Keep as many layers resident as the budget allows; the rest wait on the CPU
        # (or on disk).  On a CPU target only disk offload frees anything.  When even
        # every layer offloaded leaves too little room, the tied embedder goes to the CPU.
        offloaded, estimate = _fit_layers(plan, shape, target, budgets)
        if (
            _shortfall(estimate, budgets)
            and offload != "none"
            and target.device != "cpu"
            and plan.embedder is None
            and "cpu" in budgets
        ):
            moved = _embedder_on_cpu(plan, shape, target, f"does not fit on {target.device} beside the streaming slots")
            moved_offloaded, moved_estimate = _fit_layers(moved, shape, target, budgets)
            if not _shortfall(moved_estimate, budgets):
                plan, offloaded, estimate = moved, moved_offloaded, moved_estimate
        resident = layers - offloaded
        layer_map = {f"0-{resident - 1}": target.device} if resident else {}
        if offloaded:
            layer_map[f"{resident}-{layers - 1}"] = offload
        if plan.embedder is not None and plan.embedder.origin.startswith("auto:"):
            # hooks/offload.py places the embedder from an explicit device map: the plan writes one.
            mapped = {"embedder": str(plan.embedder.value), **layer_map}
            plan = replace(plan, placement=plan.placement.model_copy(update={"device_map": mapped}))
    short = _shortfall(estimate, budgets)
    if not short:
        used = ", ".join(
            f"{d}: {format_bytes(estimate.required[d])} of {format_bytes(b.available)}"
            for d, b in budgets.items()
            if d in estimate.required
        )
        if plan.quantization == "int8":
            how = f"int8 weights, {plan.dtype} compute"
        elif plan.weight_storage is not None:
            how = f"{plan.weight_storage} weights, {plan.dtype} compute"
        else:
            how = f"{plan.dtype} weights"
        if offloaded:
            how += f", {offloaded} of {layers} layers offloaded to {offload if offload != 'none' else 'cpu/disk'}"
        if plan.embedder is not None:
            how += f", the embedder on {plan.embedder.value}"
        if stages:
            spans = ", ".join(f"{span} on {d}" for span, d in layer_map.items())
            how += f", layers split over {1 + len(stages)} GPUs (a pipeline: {spans})"
        ranks = plan.placement.tensor_parallel
        if ranks > 1:
            how += f", tensor parallel: each of {ranks} ranks holds 1/{ranks} of the layers and the embedder whole"
            used = f"{used} per rank" if used else "per rank"
        verdict = Verdict(True, f"fits ({how}; {used})")
    else:
        worst = max(short, key=lambda d: short[d])
        resized = f"; the profile sets {', '.join(plan.resized)}" if plan.resized else ""
        verdict = Verdict(
            False,
            f"does not fit: {worst} needs {format_bytes(estimate.required[worst])} but has "
            f"{format_bytes(budgets[worst].available)} ({budgets[worst].note}); short by {format_bytes(short[worst])}"
            + resized,
            short[worst],
            _cheapest_fix(plan, shape, target, budgets, worst, short[worst]),
        )
    return replace(plan, memory=estimate, budgets=tuple(budgets.values()), verdict=verdict, layers=layer_map)


def _split_over_gpus(
    plan: Plan, shape: ModelShape, target: Target
) -> tuple[dict[str, str], dict[str, int], MemoryEstimate, dict[str, Budget]]:
    """Consecutive layers on each GPU that ``max_memory`` names (`pipeline_stages`): the execution
    device keeps as many as fit, then the next GPU, and so on; the last one takes the rest.
    Returns the layer map, the layers per stage, their estimate and the budgets."""
    others = pipeline_stages(plan, target)
    budgets = budgets_for(plan, target, others)
    layers = shape.num_hidden_layers
    order = (target.device, *others)
    counts = dict.fromkeys(order, 0)
    remaining = layers
    for position, device in enumerate(order):
        if position == len(order) - 1:
            counts[device] = remaining
            break
        # Layers after this device's go to the next one while this one is sized; the
        # execution device's needs do not depend on how the others split theirs.
        best = 0
        for count in range(remaining, -1, -1):
            trial = {d: c for d, c in counts.items() if d != target.device and c}
            trial[order[position + 1]] = remaining - count
            if device != target.device:
                trial[device] = count  # (the execution device holds what no stage does)
            if not _shortfall(_estimate(plan, shape, target, stages=trial), budgets).get(device):
                best = count
                break
        counts[device] = best
        remaining -= best
    stages = {d: c for d, c in counts.items() if d != target.device and c}
    layer_map = compress_layers([d for d in order for _ in range(counts[d])])
    return layer_map, stages, _estimate(plan, shape, target, stages=stages), budgets


def _fits(plan: Plan, shape: ModelShape, target: Target, budgets: dict[str, Budget], **kwargs: Any) -> bool:
    if pipeline_stages(plan, target) and "offloaded" not in kwargs:
        # Other GPUs can take layers: the trial fits if some split over them does.
        trial = replace(plan, seq_len=kwargs.get("seq_len") or plan.seq_len)
        _, _, estimate, split_budgets = _split_over_gpus(trial, shape, target)
        return not _shortfall(estimate, split_budgets)
    return not _shortfall(_estimate(plan, shape, target, **kwargs), budgets)


def _cheapest_fix(
    plan: Plan, shape: ModelShape, target: Target, budgets: dict[str, Budget], worst: str, short: int
) -> str:
    """The first change that fits, of: the variant's own sizes (when the profile grew them), float16
    storage (float32 compute on a GPU), int8 weights, a shorter context, offload to the CPU or disk
    (with the embedder on the CPU when that is what fits), a smaller variant; else what is short."""
    if plan.resized and plan.variant in VARIANTS:
        own = ModelShape.of_variant(str(plan.variant))
        if own != shape and _fits(plan, own, target, budgets):
            return f"{plan.variant}'s own sizes: drop the profile's {', '.join(plan.resized)}"
    # On a GPU computing in float32, float16 storage keeps float32's answers; int8 loses some.
    if (
        plan.quantization == "none"
        and plan.dtype in ("float32", "float")
        and target.device != "cpu"
        and _fits(_with_storage(plan), shape, target, budgets)
    ):
        return "float16 storage, float32 compute (quantization: {weights: float16})"
    if plan.quantization != "int8" and _fits(_with_quant(plan, "suggestion"), shape, target, budgets):
        return "int8 weights (quantization: {weights: int8})"
    seq = plan.seq_len // 2
    while seq >= 256:
        if _fits(plan, shape, target, budgets, seq_len=seq):
            return f"a shorter context: --seq-len {seq} (generation.seq_len)"
        seq //= 2
    trials = [(plan, "")]
    if target.device != "cpu" and plan.embedder is None and "cpu" in budgets:
        trials.append((_embedder_on_cpu(plan, shape, target, "moves"), " and the embedder to the CPU"))
    for offload_to in ("cpu", "disk") if target.device != "cpu" else ("disk",):
        for trial, extra in trials:
            for offloaded in range(1, shape.num_hidden_layers + 1):
                if _fits(trial, shape, target, budgets, offloaded=offloaded, offload_device=offload_to):
                    setting = f"placement.offload: {offload_to}"
                    if extra:
                        setting += "; placement.device_map: {embedder: cpu, ...}"
                    count = f"{offloaded} of {shape.num_hidden_layers}"
                    return f"offload {count} layers to {offload_to}{extra} ({setting})"
    family = plan.family
    overrides = {name: setting.value for name, setting in plan.config.items()}  # the profile resizes them too
    shapes = {name: ModelShape.of_variant(name).with_overrides(overrides) for name, v in VARIANTS.items()}
    smaller = [
        name for name, v in VARIANTS.items() if v.family == family and shapes[name].parameters < shape.parameters
    ]
    for name in sorted(smaller, key=lambda n: -shapes[n].parameters):
        if _fits(plan, shapes[name], target, budgets):
            return f"a smaller variant: {name}"
    return (
        f"no single change fits (int8 or float16 weights, a shorter context, offload, the embedder on the CPU, "
        f"a smaller variant); {worst} lacks {format_bytes(short)} ({budgets[worst].note})"
    )
