"""Packed CPU matmul weights after loading: see `gemma_profiles.engine.kernels` for the kernel and why.

Applies when the model runs on the CPU as a whole: the plan's device is ``cpu``
(or, without one, the machine has no CUDA/MPS device the script could move it
to) and no layer is offloaded or mapped elsewhere.  Block it with
``GEMMA_PROFILE_DISABLE_PLUGINS=kernels`` to compute with gemma's plain
``F.linear``.

The second engine stage of `gemma_profile_weights_loaded` (``quantization`` -> ``kernels`` ->
``fused`` -> ``offload``, `gemma_profiles.plugin.hookspecs.WEIGHTS_LOADED_STAGES`): it packs the
full-precision ``Linear`` layers ``quantization`` left as they were.
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

    from gemma_profiles.engine import hugepages, kernels

    dtypes = {m.weight.dtype for m in model.modules() if kernels.packable(m)}
    if not dtypes:
        return
    reasons = {dtype: kernels.available(dtype) for dtype in dtypes}
    for dtype, reason in reasons.items():
        if reason:
            logger.info("[{}] plain CPU matmuls for {} weights: {}", plan.profile, dtype, reason)
    if reasons.get(torch.bfloat16, "") is None and not kernels.native_bf16():
        from gemma_profiles.engine import native

        why = native.bf16_unavailable()
        logger.info("[{}] bfloat16 weights on oneDNN: no native bfloat16 kernel ({})", plan.profile, why)
    if all(reasons.values()):
        return
    count = 0
    for module in list(model.modules()):
        if kernels.packable(module) and reasons[module.weight.dtype] is None:
            kernels.pack_module(module)
            count += 1
    from gemma_profiles.engine.tied import install_packed

    kernels.pin_to_cpu(model, "this model", next(iter(dtypes)))

    sampler = install_packed(model, plan.profile)
    stored = [*kernels.stored_weights(model), *(w for w in sampler or () if not w.is_mkldnn)]
    logger.info(
        "[{}] CPU kernels: {} linear layers{} use {}{}",
        plan.profile,
        count,
        " and the sampler's tied embedder" if sampler is not None else "",
        " and ".join(sorted({kernels.kernel_name(dtype) for dtype, reason in reasons.items() if reason is None})),
        hugepages.describe(stored),
    )
