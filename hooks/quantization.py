"""int8 compute after loading: see `gemma_profiles.int8` for the kernels and why."""

from __future__ import annotations

from typing import Any

from loguru import logger

from gemma_profiles import hookimpl
from gemma_profiles.plan import Plan


@hookimpl
def gemma_profile_weights_loaded(model: Any, plan: Plan) -> None:
    import types

    from gemma_profiles.int8 import dequantize_embedder, fast_forward

    config = getattr(model, "config", None)
    if config is None or not getattr(config, "quant", False):
        return
    dtype = config.get_dtype()
    fast = 0
    for name, module in model.named_modules():
        if not getattr(module, "quant", False) or getattr(module, "weight", None) is None:
            continue
        if name in ("embedder", "text_token_embedder"):
            dequantize_embedder(model, name, dtype)
        elif hasattr(module, "weight_scaler") and module.weight.dim() == 2 and type(module).__name__ == "Linear":
            module.forward = types.MethodType(fast_forward, module)
            fast += 1
    config.quant = False  # the sampler now reads a plain embedder weight
    logger.info(
        "[{}] int8: {} linear layers read int8 weights directly; the tied embedder is {} (computed once)",
        plan.profile,
        fast,
        str(dtype).removeprefix("torch."),
    )
