"""gemma's norms, MLP middle, attention core and greedy argmax in native calls: see `gemma_profiles.engine.fused`.

Applies when the model runs on the CPU as a whole (as the ``kernels`` builtin) and the
native library builds and runs here (x86-64 with AVX-512 or AVX2 + FMA, and a C compiler).  Block it with
``GEMMA_PROFILE_DISABLE_PLUGINS=fused`` to run gemma's own layer forwards.

The third engine stage of `gemma_profile_weights_loaded` (``quantization`` -> ``kernels`` ->
``fused`` -> ``offload``, `gemma_profiles.plugin.hookspecs.WEIGHTS_LOADED_STAGES`): the layers'
projections are already in their final form (int8, packed) when their fused forwards are checked.
"""

from __future__ import annotations

from typing import Any

from gemma_profiles.log import logger
from gemma_profiles.planning.plan import Plan
from gemma_profiles.plugin.hookspecs import hookimpl


@hookimpl  # the engine's stages run in hookspecs.WEIGHTS_LOADED_STAGES' order
def gemma_profile_weights_loaded(model: Any, plan: Plan) -> None:
    from gemma_profiles.engine.devices import device_problem

    if not plan.runs_on_cpu(device_problem):
        return
    import torch

    from gemma_profiles.engine import fused

    reason = fused.unavailable()
    if reason:
        logger.info("[{}] gemma's own layer forwards: {}", plan.profile, reason)
        return
    config = getattr(model, "config", None)
    dtype = config.get_dtype() if config is not None and hasattr(config, "get_dtype") else None
    hidden_size = getattr(config, "hidden_size", None)
    if not isinstance(dtype, torch.dtype) or not isinstance(hidden_size, int):
        logger.info("[{}] gemma's own layer forwards: the model has no gemma config", plan.profile)
        return
    if dtype not in (torch.float32, torch.bfloat16):
        logger.info(
            "[{}] gemma's own layer forwards: the fused kernels compute in float32 or bfloat16, not {}",
            plan.profile,
            str(dtype).removeprefix("torch."),
        )
        return
    installed = fused.install(model, dtype, hidden_size)
    if installed:
        logger.info(
            "[{}] fused CPU layers: {}", plan.profile, ", ".join(f"{n} {kind}" for kind, n in installed.items())
        )
