"""int8 compute after loading: see `gemma_profiles.int8` for the kernels and why."""

from __future__ import annotations

from typing import Any

from loguru import logger

from gemma_profiles import hookimpl
from gemma_profiles.plan import Plan


@hookimpl
def gemma_profile_weights_loaded(model: Any, plan: Plan) -> None:
    import types

    from gemma_profiles.hooks.placement import runs_on_cpu

    from gemma_profiles.int8 import dequantize_embedder, fast_forward, keep_int8_embedder

    config = getattr(model, "config", None)
    if config is None or not getattr(config, "quant", False):
        return
    dtype = config.get_dtype()
    fast = 0
    embedder = "int8 (lookups and the sampler read it directly)"
    for name, module in list(model.named_modules()):
        if not getattr(module, "quant", False) or getattr(module, "weight", None) is None:
            continue
        if name in ("embedder", "text_token_embedder"):
            if not (runs_on_cpu(plan) and keep_int8_embedder(model, name, dtype)):
                dequantize_embedder(model, name, dtype)
                embedder = f"{str(dtype).removeprefix('torch.')} (computed once)"
        elif hasattr(module, "weight_scaler") and module.weight.dim() == 2 and type(module).__name__ == "Linear":
            module.forward = types.MethodType(fast_forward, module)
            fast += 1
    config.quant = False  # gemma's forward hands embedder.weight to the sampler as it is
    logger.info(
        "[{}] int8: {} linear layers read int8 weights directly; the tied embedder is {}",
        plan.profile,
        fast,
        embedder,
    )
