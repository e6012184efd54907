"""The active profile applied to Hugging Face transformers' Gemma (docs/transformers.md).

transformers is never imported here: the plugin names ``transformers.modeling_utils`` in
``gemma_profile_watched_modules``, and when the program imports it (``from transformers import
AutoModelForCausalLM`` does, on first use) with a profile active, ``PreTrainedModel.from_pretrained``
- the path ``AutoModelForCausalLM``, ``GemmaForCausalLM``, ``Gemma2ForCausalLM`` and
``Gemma3ForCausalLM`` all take - is wrapped.  For Gemma text models (``model_type`` gemma, gemma2,
gemma3_text, gemma3) the wrapper:

1. reads the config (the ``config=`` argument, or ``AutoConfig`` with the call's own download
   arguments), plans it with our planner (`gemma_profiles.planning.hf`) and runs the preflight;
2. sets ``dtype`` (``torch_dtype`` before transformers 4.56), ``device_map``, ``max_memory`` and
   ``attn_implementation`` (eager for Gemma 2's soft-capped attention) - an argument the script
   passes wins, with a log line, except a dtype the hardware or the model cannot compute
   (bfloat16 below compute capability 8.0, float16 for Gemma 2/3): that is refused, with the same
   message as for gemma_pytorch; with int8 weights (``quantization.weights: int8``) and a model going to
   CUDA, ``quantization_config`` for bitsandbytes' LLM.int8() (`int8_arguments`: compute capability 7.5+;
   its ``Linear8bitLt`` layers are bounded for their float16 steps after loading, `bound_bitsandbytes`);
3. after loading: float16 storage (``quantization.weights: float16``: loaded in float16, each linear
   layer and the embedding computed in float32 by `gemma_profiles.engine.half`, on any device); when
   the whole model is on the CPU, int8 weights (``quantization.weights: int8``) on our int8 kernels,
   else the linear layers on our packed CPU kernels (`gemma_profiles.engine.kernels`).

Every change is logged before -> after.  Other models pass through untouched.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import logging
import os
import types
from collections.abc import Callable
from typing import Any

from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.log import logger
from gemma_profiles.planning import hf
from gemma_profiles.planning.plan import Plan, Setting, Target, check_dtype, check_float16, make_plan, normalize_device
from gemma_profiles.plugin.hookspecs import hookimpl
from gemma_profiles.units import format_bytes, parse_memory

#: The module holding ``PreTrainedModel``.
WATCHED = "transformers.modeling_utils"
_ORIGINAL = "_gemma_profile_original"
#: ``from_pretrained`` arguments that say where the config comes from (passed on to ``AutoConfig``).
_DOWNLOAD_ARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "revision",
    "subfolder",
    "gguf_file",
    "proxies",
    "trust_remote_code",
)


@hookimpl
def gemma_profile_watched_modules() -> list[str]:
    return [WATCHED]


@hookimpl
def gemma_profile_module_imported(module: types.ModuleType) -> None:
    if module.__name__ == WATCHED:
        install(module.PreTrainedModel)


def install(base: type) -> None:
    """Wrap ``base.from_pretrained`` (a classmethod) once; inert while no profile is active."""
    current = base.__dict__["from_pretrained"]
    function = current.__func__
    if getattr(function, _ORIGINAL, None) is not None:
        return

    @functools.wraps(function)
    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        return profiled_from_pretrained(function, cls, args, kwargs)

    setattr(from_pretrained, _ORIGINAL, function)
    base.from_pretrained = classmethod(from_pretrained)  # type: ignore[attr-defined]


def uninstall(base: type) -> None:
    """Put transformers' own ``from_pretrained`` back."""
    original = getattr(base.__dict__["from_pretrained"].__func__, _ORIGINAL, None)
    if original is not None:
        base.from_pretrained = classmethod(original)  # type: ignore[attr-defined]


def profiled_from_pretrained(
    original: Callable[..., Any], cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    from gemma_profiles.runtime import session as sessions

    session = sessions.session_for_model()
    if session is None:
        return original(cls, *args, **kwargs)
    config = _read_config(args, kwargs)
    if config is None or hf.family_of(config) is None:
        return original(cls, *args, **kwargs)
    plan = plan_for(session.profile(), config)
    for warning in plan.warnings:
        logger.warning("[{}] {}", plan.profile, warning)
    scripts = frozenset(name for name, value in kwargs.items() if value is not None)
    kwargs = dict(kwargs)
    dtype = arguments(plan, config, kwargs)
    int8 = int8_arguments(plan, config, kwargs, dtype, scripts)
    from gemma_profiles.plugin.manager import get_plugin_manager

    get_plugin_manager().preflight(plan)
    model = original(cls, *args, **kwargs)
    after_loading(model, plan, dtype, int8)
    return model


def _read_config(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The config ``from_pretrained`` will build from, or None when it cannot be had (transformers then
    reports the problem itself, in the script's own call)."""
    from transformers import AutoConfig, PretrainedConfig

    given = kwargs.get("config")
    if isinstance(given, PretrainedConfig):
        return given
    reference = given if isinstance(given, str | os.PathLike) else (args[0] if args else None)
    reference = reference if reference is not None else kwargs.get("pretrained_model_name_or_path")
    if reference is None:
        return None
    passed = {name: kwargs[name] for name in _DOWNLOAD_ARGS if name in kwargs}
    try:
        return AutoConfig.from_pretrained(reference, **passed)
    except Exception as exc:  # any failure is transformers' to report, in the real call
        logger.debug("transformers: no config read for {!r} ({}); loading it as it is", reference, exc)
        return None


def plan_for(profile: Any, config: Any) -> Plan:
    """The plan for a transformers Gemma config, sized against this machine when the profile's device is here."""
    from gemma_profiles.plugin.manager import detect_hardware

    shape = hf.shape_of(config)
    variant = hf.variant_of(shape)
    plan = make_plan(profile, variant, shape.family, shape=shape)
    hardware = detect_hardware()
    device = str(plan.device.value) if plan.device is not None else ("cuda:0" if hardware.gpus else "cpu")
    if device.startswith("cuda") and hardware.gpu(normalize_device(device)) is None:
        return plan  # the device is missing here: the preflight says so
    if device == "mps":
        return plan
    target = Target.of_hardware(hardware, device)
    return make_plan(profile, variant, shape.family, target=target, shape=shape)


# -- before the call: from_pretrained's arguments --------------------------------------------------------


def dtype_key() -> str:
    """``dtype`` (transformers >= 4.56) or ``torch_dtype`` (older)."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _dtype_name(value: Any) -> str:
    return str(value).removeprefix("torch.")


def _log(plan: Plan, name: str, before: Any, after: Any, reason: str) -> None:
    logger.info("[{}] from_pretrained {}: {!r} -> {!r} ({})", plan.profile, name, before, after, reason)


def arguments(plan: Plan, config: Any, kwargs: dict[str, Any]) -> Any:
    """Set ``kwargs`` from the plan, the script's own arguments winning; returns the compute dtype (torch)."""
    import torch

    shape = hf.shape_of(config)
    name = f"{hf.describe(config)} under profile '{plan.profile}'"
    logger.info("[{}] transformers: {}", plan.profile, name)
    for field in sorted(set(plan.config) - {"dtype", "quant"}):
        logger.info(
            "[{}] config.{} is for gemma_pytorch's GemmaConfig; transformers' models keep their own ({})",
            plan.profile,
            field,
            plan.config[field].origin,
        )
    # dtype
    key = next((k for k in ("dtype", "torch_dtype") if kwargs.get(k) not in (None, "auto")), None)
    chosen: Any
    if key is not None:
        chosen = kwargs[key]
        if isinstance(chosen, str):
            chosen = getattr(torch, chosen, chosen)
        _check_scripts_dtype(plan, shape.family, key, chosen)
        if plan.dtype is not None and _dtype_name(chosen) != plan.dtype:
            logger.info(
                "[{}] from_pretrained {}: the script's {} wins over the profile's {} ({})",
                plan.profile,
                key,
                _dtype_name(chosen),
                plan.dtype,
                plan.config["dtype"].origin,
            )
        if plan.weight_storage == "float16":
            logger.info(
                "[{}] float16 storage: the script's {}={} wins; weights stay {}",
                plan.profile,
                key,
                _dtype_name(chosen),
                _dtype_name(chosen),
            )
    elif plan.dtype is not None:
        target_key = dtype_key()
        before = kwargs.get("dtype", kwargs.get("torch_dtype", "auto"))
        kwargs.pop("torch_dtype" if target_key == "dtype" else "dtype", None)
        chosen = getattr(torch, plan.dtype)
        if stores_float16(plan):
            # loaded as float16 (placed and read at half float32's size), computed in float32 after loading
            kwargs[target_key] = torch.float16
            _log(
                plan,
                target_key,
                before,
                "float16",
                f"float16 storage, {plan.dtype} compute: quantization.weights: float16; {plan.config['dtype'].origin}",
            )
        else:
            kwargs[target_key] = chosen
            _log(plan, target_key, before, plan.dtype, plan.config["dtype"].origin)
    else:
        chosen = None
    # placement
    device_map = _device_map(plan)
    if "device_map" in kwargs and kwargs["device_map"] is not None:
        if device_map is not None and kwargs["device_map"] != device_map:
            logger.info(
                "[{}] from_pretrained device_map: the script's {!r} wins over the profile's {!r}",
                plan.profile,
                kwargs["device_map"],
                device_map,
            )
    elif device_map is not None:
        kwargs["device_map"] = device_map
        origin = plan.device.origin if plan.device is not None else "placement"
        _log(plan, "device_map", None, device_map, origin if device_map != "auto" else "the profile offloads layers")
    max_memory = _max_memory(plan)
    if max_memory and kwargs.get("device_map") == "auto":
        if kwargs.get("max_memory") is not None:
            logger.info("[{}] from_pretrained max_memory: the script's {!r} wins", plan.profile, kwargs["max_memory"])
        else:
            kwargs["max_memory"] = max_memory
            _log(plan, "max_memory", None, max_memory, "placement.max_memory")
    # attention
    text = hf.text_config(config)
    softcap = getattr(text, "attn_logit_softcapping", None)
    if shape.family == "gemma2" and softcap:
        reason = f"Gemma 2 soft-caps attention scores at {softcap}; only eager attention computes the cap"
        given = kwargs.get("attn_implementation")
        if given is None and kwargs.get("config") is config:
            # AutoModel* folds the script's attn_implementation into the config it passes on
            given = getattr(text, "_attn_implementation_internal", None) or getattr(
                config, "_attn_implementation_internal", None
            )
        if given is None:
            kwargs["attn_implementation"] = "eager"
            _log(plan, "attn_implementation", given, "eager", reason)
        elif given != "eager":
            logger.info(
                "[{}] from_pretrained attn_implementation: the script's {!r} wins ({})", plan.profile, given, reason
            )
    return chosen


def stores_float16(plan: Plan) -> bool:
    """Whether the model loads in float16 to be computed in the plan's (float32) dtype after loading: the
    profile's ``quantization.weights: float16``, unless the quantization builtin is blocked (as for gemma_pytorch)."""
    if plan.weight_storage != "float16" or plan.dtype in (None, "float16"):
        return False
    if _blocked("quantization"):
        logger.warning(
            "[{}] quantization.weights: float16 needs the quantization builtin (blocked by "
            "GEMMA_PROFILE_DISABLE_PLUGINS): weights stay {}",
            plan.profile,
            plan.dtype,
        )
        return False
    return True


def _check_scripts_dtype(plan: Plan, family: str, key: str, dtype: Any) -> None:
    """The rules the profile's own dtype meets, for the script's: gemma_pytorch's message, naming the call."""
    name = _dtype_name(dtype)
    origin = f"from_pretrained({key}=torch.{name})"
    allowed = False
    profile_name = plan.profile
    try:
        check_dtype(Setting(name, origin), plan.target, profile_name)
        check_float16(Setting(name, origin), plan.variant, family, plan.target, profile_name, allowed)
    except GemmaProfileError as exc:
        message = exc.message.replace(f"profile '{profile_name}' asks for", f"the script's {origin} asks for")
        raise GemmaProfileError(f"{message} (profile '{profile_name}')", where=exc.where, hint=exc.hint) from None


def _device_map(plan: Plan) -> str | None:
    """``"auto"`` when the profile offloads (accelerate places layers within ``max_memory``), else its device."""
    if plan.offloads or len(set(plan.layers.values())) > 1:
        return "auto"
    if plan.device is None:
        return None
    device = normalize_device(str(plan.device.value))
    return None if device == "cpu" else device  # the CPU is where transformers loads anyway


def _max_memory(plan: Plan) -> dict[int | str, int]:
    limits = plan.placement.max_memory or {}
    result: dict[int | str, int] = {}
    for device, amount in limits.items():
        name = normalize_device(str(device))
        key: int | str = int(name.split(":")[1]) if name.startswith("cuda:") else name
        result[key] = parse_memory(amount) if isinstance(amount, str) else int(amount)
    return result


# -- int8 on CUDA: bitsandbytes' LLM.int8() (docs/transformers.md) ----------------------------------------

#: `int8_arguments`' routes: our int8 kernels after loading (the whole model on the CPU), or bitsandbytes'
#: ``Linear8bitLt`` layers made by transformers while loading onto CUDA.  Any other route is "" (no int8).
CPU = "cpu"
BITSANDBYTES = "bitsandbytes"
#: LLM.int8()'s int8 products need compute capability 7.5 (Turing) or newer: bitsandbytes' installation
#: guide, https://huggingface.co/docs/bitsandbytes/main/en/installation ("LLM.int8() | 7.5+").
BITSANDBYTES_CAPABILITY = (7, 5)
#: LLM.int8()'s outlier threshold (transformers' ``llm_int8_threshold`` default, the paper's 6.0): an input
#: column holding a value this large is multiplied in the model's dtype, the rest in int8.
BITSANDBYTES_THRESHOLD = 6.0
FLOAT16_MAX = 65504.0
#: The largest value the int8 part of a product may reach (half of float16's range): on CUDA bitsandbytes
#: dequantizes it through a float16 tensor (`bound_bitsandbytes`).
FLOAT16_BOUND = FLOAT16_MAX / 2
#: accelerate's placement strategies a ``device_map`` argument may name (each may offload layers).
_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_BNB_INSTALL = "pip install 'gemma-profiles[cuda-int8]' (or pip install bitsandbytes)"


def int8_arguments(plan: Plan, config: Any, kwargs: dict[str, Any], dtype: Any, scripts: frozenset[str]) -> str:
    """The route of the plan's int8 weights for this call, setting ``kwargs`` for it.

    ``"cpu"`` (`CPU`): nothing before the call; after it, our int8 kernels when the whole model is on the
    CPU.  ``"bitsandbytes"`` (`BITSANDBYTES`): the model goes to CUDA, whose compute capability runs
    bitsandbytes' LLM.int8(): ``quantization_config=BitsAndBytesConfig(load_in_8bit=True, ...)`` is set,
    transformers makes each linear layer a ``Linear8bitLt`` while loading, and `bound_bitsandbytes` checks
    them after it.  ``""``: no int8 weights for this call (the script's own ``quantization_config`` wins,
    the checkpoint is quantized already, or CUDA without LLM.int8(): one line says why, weights stay in
    the dtype).  ``scripts``: the arguments the script itself passed."""
    if plan.quantization != "int8":
        return ""
    origin = plan.config["quant"].origin if "quant" in plan.config else "quantization.weights"
    given = kwargs.get("quantization_config")
    if given is not None:
        logger.info(
            "[{}] from_pretrained quantization_config: the script's {} wins over the profile's int8 weights ({})",
            plan.profile,
            type(given).__name__,
            origin,
        )
        _check_scripts_int8(plan, given, dtype)
        return ""
    text = hf.text_config(config)
    existing = getattr(config, "quantization_config", None) or getattr(text, "quantization_config", None)
    if existing is not None:
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", "")
        logger.info(
            "[{}] int8 weights: the checkpoint is quantized already ({}); it loads as it is",
            plan.profile,
            str(getattr(method, "value", method)) or "its quantization_config",
        )
        return ""
    route = int8_route(plan, kwargs)
    if route == BITSANDBYTES and _blocked("quantization"):
        logger.info(
            "[{}] int8 weights: the quantization builtin is blocked; weights stay {}", plan.profile, _dtype_name(dtype)
        )
        return ""
    if route == BITSANDBYTES:
        problem = bitsandbytes_problem()
        if problem is not None:
            route = f"{problem}; {_BNB_INSTALL}"
    if route in (CPU, BITSANDBYTES):
        if route == BITSANDBYTES:
            _bitsandbytes_config(plan, kwargs, origin)
        return route
    logger.warning("[{}] int8 weights on CUDA: {}; weights stay {}", plan.profile, route, _dtype_name(dtype))
    limits = _max_memory(plan)
    if "device_map" not in scripts and limits and kwargs.get("device_map") != "auto":
        # the memory verdict counted int8 layers: let accelerate place the larger ones within the profile's limits
        _log(plan, "device_map", kwargs.get("device_map"), "auto", "no int8 weights: the layers may not fit")
        kwargs["device_map"] = "auto"
        if "max_memory" not in scripts:
            kwargs["max_memory"] = limits
            _log(plan, "max_memory", None, limits, "placement.max_memory")
    return ""


def int8_route(plan: Plan, kwargs: dict[str, Any]) -> str:
    """Where the call puts the model, as an int8 route: `CPU` when no layer goes to CUDA (transformers loads on
    the CPU without a ``device_map``), `BITSANDBYTES` on CUDA with compute capability 7.5 or newer (or not
    known), else why not (a sentence naming the GPU)."""
    if not any(device.startswith("cuda") for device in _mapped_devices(plan, kwargs.get("device_map"))):
        return CPU
    target = plan.target
    capability = target.compute_capability if target is not None and target.device.startswith("cuda") else None
    if capability is not None and tuple(capability) < BITSANDBYTES_CAPABILITY:
        wanted = ".".join(map(str, BITSANDBYTES_CAPABILITY))
        return (
            f"bitsandbytes' LLM.int8() needs compute capability {wanted} or newer (Turing), "
            f"{target.name or target.device} has {'.'.join(map(str, capability))}"  # type: ignore[union-attr]
        )
    return BITSANDBYTES


def _mapped_devices(plan: Plan, device_map: Any) -> set[str]:
    """The devices a ``device_map`` argument puts layers on (``auto`` and accelerate's other strategies: the
    plan's device, or this machine's first GPU when it has one)."""
    if device_map is None:
        return {"cpu"}
    if isinstance(device_map, dict):
        return set().union(*(_mapped_devices(plan, value) for value in device_map.values())) or {"cpu"}
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return {f"cuda:{device_map}"}
    name = str(device_map)
    if name in _STRATEGIES:
        if plan.device is not None:
            return {normalize_device(str(plan.device.value))}
        from gemma_profiles.plugin.manager import detect_hardware

        return {"cuda:0"} if detect_hardware().gpus else {"cpu"}
    return {normalize_device(name)}


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot serve transformers here (not installed, too old for transformers, no CUDA
    library), or None."""
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        return "bitsandbytes is not installed"
    except Exception as exc:  # a broken install: one line, not its traceback
        return f"bitsandbytes does not import ({type(exc).__name__}: {exc})"
    from transformers.utils import import_utils

    wanted = getattr(import_utils, "BITSANDBYTES_MIN_VERSION", "0")
    if not import_utils.is_bitsandbytes_available():
        return f"transformers needs bitsandbytes {wanted} or newer, this is {getattr(bnb, '__version__', '?')}"
    import torch

    extension = getattr(bnb, "cextension", None)
    mock = getattr(extension, "ErrorHandlerMockBNBNativeLibrary", None)
    if torch.cuda.is_available() and mock is not None and isinstance(getattr(extension, "lib", None), mock):
        return "bitsandbytes found no CUDA library for this machine (python -m bitsandbytes says why)"
    return None


def _bitsandbytes_config(plan: Plan, kwargs: dict[str, Any], origin: str) -> None:
    """``quantization_config`` for LLM.int8(); with a device map that may offload, the layers accelerate puts
    on the CPU or disk stay unquantized (transformers refuses such a map without
    ``llm_int8_enable_fp32_cpu_offload``)."""
    from transformers import BitsAndBytesConfig

    device_map = kwargs.get("device_map")
    offload = device_map in _STRATEGIES or (
        isinstance(device_map, dict) and bool({"cpu", "disk"} & {str(v) for v in device_map.values()})
    )
    settings = {"load_in_8bit": True, "llm_int8_threshold": BITSANDBYTES_THRESHOLD}
    if offload:
        settings["llm_int8_enable_fp32_cpu_offload"] = True
    kwargs["quantization_config"] = BitsAndBytesConfig(**settings)  # type: ignore[no-untyped-call]
    shown = ", ".join(f"{name}={value}" for name, value in settings.items())
    _log(plan, "quantization_config", None, f"BitsAndBytesConfig({shown})", f"int8 weights on CUDA; {origin}")
    if offload:
        logger.info(
            "[{}] int8 weights: layers accelerate offloads to the CPU or disk stay in {} (bitsandbytes "
            "quantizes the GPU's only)",
            plan.profile,
            plan.dtype or "the load dtype",
        )


def _check_scripts_int8(plan: Plan, given: Any, dtype: Any) -> None:
    """A warning when the script's own LLM.int8() config has no outlier threshold and the model computes
    beyond float16: bitsandbytes then casts every input to float16, where a value above 65504 is inf."""

    def field(name: str) -> Any:
        return given.get(name) if isinstance(given, dict) else getattr(given, name, None)

    if not field("load_in_8bit") or _dtype_name(dtype) == "float16":
        return
    threshold = field("llm_int8_threshold")
    if threshold is not None and threshold <= 0:
        logger.warning(
            "[{}] the script's BitsAndBytesConfig has llm_int8_threshold={}: bitsandbytes casts each int8 "
            "layer's input to float16, and without the outlier threshold an activation above 65504 becomes "
            "inf (NaN logits); leave it at its default 6.0, or drop quantization_config (the profile's int8 keeps it)",
            plan.profile,
            threshold,
        )


# -- after the call: our CPU engine on its layers ---------------------------------------------------------


def _blocked(name: str) -> bool:
    from gemma_profiles.plugin.manager import get_plugin_manager

    return get_plugin_manager().pm.is_blocked(name)


def after_loading(model: Any, plan: Plan, requested: Any, int8: str = CPU) -> None:
    """After transformers' call: the int8 weights (``int8``: `int8_arguments`' route), float16 storage, or the
    CPU kernels."""
    import torch

    devices = {p.device.type for p in model.parameters()}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    logger.info(
        "[{}] transformers: {} loaded on {} in {}",
        plan.profile,
        type(model).__name__,
        ", ".join(sorted(devices)),
        _dtype_name(dtype),
    )
    if int8 == BITSANDBYTES:
        bound_bitsandbytes(model, plan, requested)
        return
    if plan.quantization == "int8" and int8 == CPU:
        if devices != {"cpu"}:
            logger.warning(
                "[{}] int8 weights: not done for transformers' models on {} without CUDA (our int8 kernels "
                "need the whole model on the CPU); weights stay {}",
                plan.profile,
                ", ".join(sorted(devices)),
                _dtype_name(dtype),
            )
        elif _blocked("quantization"):
            logger.info("[{}] int8 weights: the quantization builtin is blocked; weights stay {}", plan.profile, dtype)
        else:
            quantize(model, plan, dtype or torch.float32)
            fuse(model, plan, dtype)
            return
    if plan.weight_storage == "float16" and dtype == torch.float16 and requested not in (None, torch.float16):
        store_float16(model, plan, requested)
        return
    if devices == {"cpu"}:
        if not _blocked("kernels"):
            pack(model, plan)
        fuse(model, plan, dtype)


def fuse(model: Any, plan: Plan, dtype: Any) -> None:
    """The norms and the MLP's ``gelu(gate) * up`` of a model on the CPU in the fused kernels' single
    calls (`gemma_profiles.engine.fused`: transformers' Gemma norms and MLPs compute what gemma's do),
    each kind checked against transformers' own forward first, as the ``fused`` builtin does for gemma."""
    import torch

    from gemma_profiles.engine import fused

    if _blocked("fused") or dtype not in (torch.float32, torch.bfloat16):
        return
    reason = fused.unavailable()
    if reason:
        logger.info("[{}] transformers' own norm and MLP forwards: {}", plan.profile, reason)
        return
    hidden = model.config.get_text_config().hidden_size
    installed = fused.install(model, dtype, hidden, owner="transformers'")
    if installed:
        logger.info(
            "[{}] fused CPU layers: {}", plan.profile, ", ".join(f"{n} {kind}" for kind, n in installed.items())
        )


def _plain_linears(model: Any) -> list[tuple[str, Any]]:
    from torch import nn

    return [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and module.bias is None
        and isinstance(module._parameters.get("weight"), nn.Parameter)
        and module.weight.dim() == 2
        and module.weight.device.type == "cpu"
        and not module.weight.is_meta
    ]


def pack(model: Any, plan: Plan) -> None:
    """Each plain CPU ``nn.Linear`` on `gemma_profiles.engine.kernels`' packed weights (the tied output
    projection gets a packed copy; the embedding keeps its weight for lookups)."""
    from gemma_profiles.engine import kernels

    layers = [(name, m) for name, m in _plain_linears(model) if m.weight.dtype in kernels.PACKED_DTYPES]
    dtypes = {m.weight.dtype for _, m in layers}
    reasons = {dtype: kernels.available(dtype) for dtype in dtypes}
    for dtype, reason in reasons.items():
        if reason:
            logger.info("[{}] plain CPU matmuls for {} weights: {}", plan.profile, _dtype_name(dtype), reason)
    count = 0
    packed_dtype = None
    for _, module in layers:
        if reasons[module.weight.dtype] is None:
            packed_dtype = module.weight.dtype
            kernels.pack_module(module)
            count += 1
    if packed_dtype is not None:
        kernels.pin_to_cpu(model, "this model", packed_dtype)
    if count:
        logger.info(
            "[{}] CPU kernels: {} of transformers' linear layers use {}",
            plan.profile,
            count,
            " and ".join(sorted({kernels.kernel_name(d) for d, r in reasons.items() if r is None})),
        )


def quantize(model: Any, plan: Plan, dtype: Any) -> None:
    """int8 weights for the CPU model's plain linear layers and its tied embedder.

    Where the native int8 kernel runs (`gemma_profiles.engine.native`) and the compute dtype is
    float32 or bfloat16, each layer is quantized with a scale per `INT8_GROUP_COLUMNS` columns
    on the kernel's AVX2 path where the width takes them (`native.groups_fit`), else one per row,
    packed in place and computed by the kernel (`gemma_profiles.engine.quantization.native_linear`:
    ``state_dict()`` in gemma's per-row format, pinned to the CPU).  Elsewhere (no kernel, float16)
    one scale per row (`gemma_profiles.engine.loading.quantize_rows`) and
    `gemma_profiles.engine.quantization.int8_linear`.  A tied embedder gets row and column scales
    and one int8 weight shared by the lookup (the gathered rows only) and the output projection
    (`_tie_native` or `_int8_classes`)."""
    import torch

    from gemma_profiles.engine import native, surgery
    from gemma_profiles.engine.loading import COLUMN_SCALER, INT8_GROUP_COLUMNS, column_scales, quantize_rows
    from gemma_profiles.engine.quantization import direct_linear

    on_native = native.unavailable() is None and dtype in (torch.float32, torch.bfloat16)
    path = native.int8_path() if on_native else None
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    tied = output is not None and embedding is not None and output.weight is embedding.weight
    kernels: dict[str, int] = {}
    for _, module in _plain_linears(model):
        if tied and module is output:
            continue
        if on_native:
            k = module.weight.shape[1]
            group = INT8_GROUP_COLUMNS if native.grouped_path() and native.groups_fit(k, INT8_GROUP_COLUMNS) else 0
            _native_int8(module, dtype, group)
            kernel = f"the native int8 kernel ({path}, a scale per {f'{group} columns' if group else 'row'})"
        else:
            q, scale = quantize_rows(module.weight.detach(), dtype)
            _to_int8(module, q, scale)
            direct_linear(module)
            pack_mm = dtype == torch.bfloat16 and q.shape[0] % 4 == 0
            kernel = f"{'_weight_int8pack_mm' if pack_mm else 'a scratch-buffer matmul'} (a scale per row)"
        kernels[kernel] = kernels.get(kernel, 0) + 1
    embedder = "kept"
    if tied:
        # Row and column scales, as gemma_pytorch's loader gives the tied embedder: its massive hidden
        # dimensions would otherwise spend every row's int8 range (docs/engine.md).
        weight = embedding.weight.detach()
        columns = column_scales(weight)
        q, scale = quantize_rows(weight, dtype, columns=columns)
        if on_native:
            _tie_native(embedding, output, q, scale, columns)
            embedder = f"int8 with row and column scales on the native int8 kernel ({path}), shared by"
        else:
            for module in (embedding, output):
                _to_int8(module, q, scale)
                module.register_buffer(COLUMN_SCALER, columns)
            surgery.swap(embedding, _int8_classes()[0])
            surgery.swap(output, _int8_classes()[1])
            embedder = "int8 with row and column scales, shared by"
        embedder += " the lookup (gathered rows only) and the output projection"
    if on_native:
        from gemma_profiles.engine.kernels import pin_to_cpu

        pin_to_cpu(model, "this model", torch.int8)
    else:
        why = native.unavailable() or f"it computes in float32 or bfloat16, not {_dtype_name(dtype)}"
        logger.info("[{}] int8: not on the native int8 kernel: {}", plan.profile, why)
    layers = "; ".join(f"{count} on {kernel}" for kernel, count in kernels.items()) or "none"
    logger.info(
        "[{}] int8: transformers' linear layers: {}, computed in {}; the tied embedder: {}",
        plan.profile,
        layers,
        _dtype_name(dtype),
        embedder,
    )


def _native_int8(module: Any, dtype: Any, group: int) -> None:
    """A plain linear layer quantized (a scale per ``group`` columns; 0: per row) and computed on the
    native kernel (`gemma_profiles.engine.quantization.native_linear` packs the int8 weight in place)."""
    from torch import nn

    from gemma_profiles.engine.loading import GROUP_SCALER, quantize_groups, quantize_rows
    from gemma_profiles.engine.quantization import native_linear

    weight = module.weight.detach()
    if group:
        q, groups = quantize_groups(weight, group)
        scale = groups.amax(dim=1).to(dtype)  # the shape gemma's per-row format has; the kernel reads the groups
        module.register_buffer(GROUP_SCALER, groups, persistent=False)
    else:
        q, scale = quantize_rows(weight, dtype)
    module._parameters["weight"] = nn.Parameter(q, requires_grad=False)
    module._parameters["weight_scaler"] = nn.Parameter(scale, requires_grad=False)
    native_linear(module)


def _tie_native(embedding: Any, output: Any, q: Any, scale: Any, columns: Any) -> None:
    """The tied embedder on the native kernel: one packed int8 weight (``q``: per-row ``scale`` on the
    weight divided by ``columns``) for the lookup, ``rows(ids) * scale * columns``, and the output
    projection, ``(x * columns) @ (q * scale).T``; no per-call dequantization."""
    from torch import nn

    from gemma_profiles.engine import surgery
    from gemma_profiles.engine.loading import COLUMN_SCALER
    from gemma_profiles.engine.quantization import _NATIVE, _install_native

    lookup, projection = _native_classes()
    scaler = nn.Parameter(scale, requires_grad=False)
    embedding._parameters["weight"] = nn.Parameter(q, requires_grad=False)
    embedding._parameters["weight_scaler"] = scaler
    for module in (embedding, output):
        module.register_buffer(COLUMN_SCALER, columns, persistent=False)
    packed = _install_native(embedding, lookup)  # in place: q's memory becomes the kernel's layout
    del output._parameters["weight"]  # the float weight, tied
    output.register_buffer("weight", packed.data)
    output._parameters["weight_scaler"] = scaler
    object.__setattr__(output, _NATIVE, packed)
    surgery.swap(output, projection)


def _to_int8(module: Any, q: Any, scale: Any) -> None:
    module._parameters.pop("weight", None)
    module.register_buffer("weight", q)
    module.register_buffer("weight_scaler", scale)


_classes: tuple[type, type] | None = None
_natives: tuple[type, type] | None = None


def _int8_classes() -> tuple[type, type]:
    """The surgeries for a tied embedder in int8 with row and column scales: transformers' scaled word
    embedding (``embedding(ids) * embed_scale``) on the gathered rows, and the output projection
    (``(x * columns) @ (q * rows).T``).  Made on first use: this module never imports torch when it loads."""
    global _classes
    if _classes is None:
        import torch

        from gemma_profiles.engine import surgery
        from gemma_profiles.engine.quantization import column_scaler, int8_linear, int8_lookup

        class ScaledInt8Lookup(surgery.Surgery):
            prefix = "Int8"

            def forward(self, input_ids: Any) -> Any:
                return _embed_scaled(self, int8_lookup(self, input_ids))

        class ColumnScaledInt8Linear(surgery.Surgery):
            prefix = "Int8"

            def forward(self, x: Any) -> Any:
                columns = column_scaler(self)
                if columns is not None:
                    x = (x.to(torch.float32) * columns).to(x.dtype)
                return int8_linear(x, self.weight, self.weight_scaler)  # type: ignore[arg-type]

        _classes = (ScaledInt8Lookup, ColumnScaledInt8Linear)
    return _classes


def _native_classes() -> tuple[type, type]:
    """`_int8_classes` on the native kernel: the lookup gathers rows of the packed weight
    (`gemma_profiles.engine.quantization.NativeInt8Lookup`) and the output projection multiplies the
    column-scaled input by it; ``state_dict()`` gives gemma's per-row format (`NativeInt8`)."""
    global _natives
    if _natives is None:
        import torch

        from gemma_profiles.engine.quantization import (
            _NATIVE,
            NativeInt8,
            NativeInt8Lookup,
            _columns_applied,
            column_scaler,
        )

        class ScaledNativeInt8Lookup(NativeInt8Lookup):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                rows: torch.Tensor = _embed_scaled(self, super().forward(x))
                return rows

        class ColumnScaledNativeInt8Linear(NativeInt8):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                compute = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
                scaled = _columns_applied(x, column_scaler(self), compute)
                out: torch.Tensor = self.__dict__[_NATIVE].matmul(scaled)
                return out.to(x.dtype)

        _natives = (ScaledNativeInt8Lookup, ColumnScaledNativeInt8Linear)
    return _natives


def _embed_scaled(module: Any, rows: Any) -> Any:
    """transformers' scaled word embedding's ``* embed_scale`` (Gemma 2/3; Gemma scales in its model)."""
    scale = getattr(module, "embed_scale", None)
    return rows if scale is None else rows * scale.to(rows.dtype)


# -- float16 storage, float32 compute ------------------------------------------------------------------------

#: Instance attribute of a float16-stored embedding: the dtype its lookups return.
_COMPUTE = "_gemma_profile_compute"


def store_float16(model: Any, plan: Plan, compute: Any) -> None:
    """The model was loaded in float16; each linear layer and the embedding now compute in ``compute``
    (float32) on a float32 copy of a block of their weight (`gemma_profiles.engine.half.half_linear`), on
    whatever device they are - CPU, CUDA, or offloaded by accelerate.  The norms keep their float16 weights:
    transformers' Gemma norms compute in float32 (``x.float()``, ``1.0 + weight.float()``)."""
    from gemma_profiles.engine import surgery
    from gemma_profiles.engine.half import Float16StoredMatmul

    embedding = model.get_input_embeddings()
    stored = count = 0
    seen: set[int] = set()
    for _, module in model.named_modules():
        weight = module._parameters.get("weight")
        if module is embedding:
            object.__setattr__(module, _COMPUTE, compute)
            surgery.swap(module, _float16_lookup())
        elif _is_float16_linear(module):
            surgery.swap(module, Float16StoredMatmul)
            count += 1
        else:
            continue
        _rebind_accelerate(module)
        if weight is not None and id(weight) not in seen:
            seen.add(id(weight))
            stored += weight.numel() * weight.element_size()
    logger.info(
        "[{}] float16 storage: {} of transformers' linear layers and the embedding ({} of weights) "
        "stored in float16, computed in {}",
        plan.profile,
        count,
        format_bytes(stored),
        _dtype_name(compute),
    )


def _is_float16_linear(module: Any) -> bool:
    import torch
    from torch import nn

    weight = module._parameters.get("weight")
    return (
        type(module) is nn.Linear
        and module.bias is None
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and weight.dtype == torch.float16
    )


def _rebind_accelerate(module: Any) -> None:
    """accelerate's hooks (``device_map="auto"``) call the forward the module had when they were attached
    (``_old_forward``, a bound method of transformers' class): bind it to the swapped class's."""
    if "_old_forward" in module.__dict__:
        module._old_forward = types.MethodType(type(module).forward, module)


_lookup: type | None = None


def _float16_lookup() -> type:
    """transformers' scaled word embedding (``embedding(ids) * embed_scale``) on a float16 weight, returning
    the compute dtype: the gathered rows are converted, then scaled by the exact ``hidden_size ** 0.5``
    (``scalar_embed_scale``; the ``embed_scale`` buffer was made in float16 while loading).  Made on first
    use: this module never imports torch when it loads."""
    global _lookup
    if _lookup is None:
        import torch.nn.functional as F

        from gemma_profiles.engine import surgery

        class Float16StoredLookup(surgery.Surgery):
            prefix = "Float16Stored"

            def forward(self, input_ids: Any) -> Any:
                compute = self.__dict__[_COMPUTE]
                rows = F.embedding(input_ids, self.weight, self.padding_idx).to(compute)  # type: ignore[arg-type]
                scale = getattr(self, "scalar_embed_scale", None)
                if scale is None:
                    buffer = getattr(self, "embed_scale", None)
                    return rows if buffer is None else rows * buffer.to(compute)
                return rows * scale

        _lookup = Float16StoredLookup
    return _lookup


# -- bitsandbytes' int8 layers, after the call -----------------------------------------------------------------

#: Instance attribute of a `bound_bitsandbytes` layer: the power of two its output is multiplied by (its
#: scales were divided by it), or absent.
_OUTPUT_SCALE = "_gemma_profile_output_scale"
#: Set while one of our ``Linear8bitLt`` layers computes: `_CastNotice` drops bitsandbytes' per-call notice.
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("gemma_profiles_bitsandbytes_quiet", default=False)
#: bitsandbytes' logger that says, on every call, that a layer's input is cast to float16.
_BNB_LOGGER = "bitsandbytes.autograd._functions"
_CAST_NOTICE = "MatMul8bitLt: inputs will be cast"


class _CastNotice(logging.Filter):
    """Drops bitsandbytes' "inputs will be cast ... to float16" notice - logged on every product, hundreds of
    lines per token - while one of our layers computes; `bound_bitsandbytes` says it once.  Everyone else's
    bitsandbytes layers keep it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_QUIET.get() and str(record.msg).startswith(_CAST_NOTICE))


def bound_bitsandbytes(model: Any, plan: Plan, compute: Any) -> None:
    """transformers made the model's linear layers bitsandbytes ``Linear8bitLt`` (LLM.int8()) while loading.

    Each product (bitsandbytes 0.50, ``MatMul8bitLt``): the input is cast to float16; columns holding a
    value of at least the outlier threshold (6.0) are multiplied in the input's own dtype on the dequantized
    weight columns - so an input above 65504, inf in float16, is one of those and stays exact -; the rest is
    quantized per row to int8 and multiplied in int32, and on CUDA that int32 result is dequantized into a
    float16 tensor (the kernel writes float16 only) before it is cast to the input's dtype.  That part
    is at most ``threshold * sum(|row of the weight|)`` in magnitude; where this bound passes `FLOAT16_BOUND`
    (a model computing in float32 or bfloat16 - Gemma 2/3 - may hold such weights) the layer's scales are
    divided by a power of two that brings it below, and its output multiplied back in its own dtype
    (``ProfiledLinear8bitLt``; ``state_dict()`` writes the scales as bitsandbytes made them).  Every layer
    gets the class, which also keeps bitsandbytes' per-call float16 notice quiet (`_CastNotice`)."""
    import torch

    from gemma_profiles.engine import surgery

    bnb = importlib.import_module("bitsandbytes")
    mixin = _bounded_class()
    layers = [m for _, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    beyond_float16 = compute is not None and compute != torch.float16
    scaled = unbounded = 0
    thresholds = set()
    for module in layers:
        threshold = float(module.state.threshold)
        thresholds.add(threshold)
        scale = _output_scale(module, threshold) if beyond_float16 else 1
        if scale is None:
            unbounded += 1
        elif scale != 1:
            object.__setattr__(module, _OUTPUT_SCALE, scale)
            scaled += 1
        surgery.swap(module, mixin)
        _rebind_accelerate(module)
    log = logging.getLogger(_BNB_LOGGER)
    if not any(isinstance(f, _CastNotice) for f in log.filters):
        log.addFilter(_CastNotice())
    compute_name = _dtype_name(compute) if compute is not None else "the load dtype"
    if beyond_float16:
        bound = (
            f"each product's int8 part bounded below {FLOAT16_BOUND:g} for its float16 dequantization on CUDA "
            f"({scaled} layer(s) scaled by a power of two to stay there)"
        )
    else:
        bound = "the model computes in float16 itself"
    logger.info(
        "[{}] int8 weights: {} of transformers' linear layers on bitsandbytes' LLM.int8() (Linear8bitLt, outlier "
        "threshold {}): inputs cast to float16, columns with a value at or above the threshold multiplied in {}; "
        "{}; the embedder, the tied output projection and the norms stay {}",
        plan.profile,
        len(layers),
        ", ".join(f"{t:g}" for t in sorted(thresholds)) or "-",
        compute_name,
        bound,
        compute_name,
    )
    if unbounded:
        logger.warning(
            "[{}] int8 weights: {} bitsandbytes layer(s) cannot be bounded (no outlier threshold, or a bias): "
            "on CUDA their float16 steps may overflow (an input or an int8 product above 65504 becomes inf)",
            plan.profile,
            unbounded,
        )


def _output_scale(module: Any, threshold: float) -> float | None:
    """The power of two `bound_bitsandbytes` divides ``module``'s scales by (1: none needed); None when the
    int8 part cannot be bounded (no outlier threshold, or no int8 weight here)."""
    import math

    import torch

    weight = module.weight
    scales = [t for t in (getattr(weight, "SCB", None), module.state.SCB) if t is not None]
    if threshold <= 0 or not scales or weight.dtype != torch.int8:
        return None
    row_scale = scales[0].float() / 127  # bitsandbytes: weight ~ CB * SCB / 127, per row
    rows = max(1, (1 << 24) // max(1, weight.shape[1]))
    largest = 0.0
    for start in range(0, weight.shape[0], rows):
        block = weight.data[start : start + rows].to(torch.int16).abs().sum(dim=1, dtype=torch.float32)
        largest = max(largest, float((block * row_scale[start : start + rows]).max()))
    bound = threshold * largest
    if bound <= FLOAT16_BOUND:
        return 1
    if module.bias is not None:
        return None  # bitsandbytes adds the bias inside the float16 dequantization: it would need the scale too
    scale = float(2 ** math.ceil(math.log2(bound / FLOAT16_BOUND)))
    for tensor in {id(t): t for t in scales}.values():
        tensor.div_(scale)
    return scale


_bounded: type | None = None


def _bounded_class() -> type:
    """The ``Linear8bitLt`` mixin of `bound_bitsandbytes` (made on first use: this module never imports torch
    when it loads)."""
    global _bounded
    if _bounded is None:
        from gemma_profiles.engine import surgery

        class Profiled(surgery.Surgery):
            prefix = "Profiled"

            def forward(self, x: Any) -> Any:
                token = _QUIET.set(True)
                try:
                    out = super().forward(x)
                finally:
                    _QUIET.reset(token)
                scale = self.__dict__.get(_OUTPUT_SCALE)
                return out if scale is None else out * scale

            def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
                super()._save_to_state_dict(destination, prefix, keep_vars)
                scale = self.__dict__.get(_OUTPUT_SCALE)
                key = prefix + "SCB"
                if scale is not None and key in destination:
                    destination[key] = destination[key] * scale

        _bounded = Profiled
    return _bounded
