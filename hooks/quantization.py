"""int8 compute after loading (`gemma_profiles.engine.quantization` has the kernels and why), and float16 storage
with float32 compute (`gemma_profiles.engine.half`).

The first engine stage of `gemma_profile_weights_loaded` (``quantization`` -> ``kernels`` ->
``fused`` -> ``offload``, `gemma_profiles.plugin.hookspecs.WEIGHTS_LOADED_STAGES`): the weights
get their final format before anything packs, fuses or offloads them.
"""

from __future__ import annotations

from typing import Any

from gemma_profiles.log import logger
from gemma_profiles.planning.plan import EMBEDDER_KEYS, Plan
from gemma_profiles.plugin.hookspecs import hookimpl


@hookimpl
def gemma_profile_weights_loaded(model: Any, plan: Plan) -> None:
    import torch

    from gemma_profiles.engine import native
    from gemma_profiles.engine.devices import device_problem
    from gemma_profiles.engine.quantization import (
        column_scaler,
        dequantize_embedder,
        direct_linear,
        keep_int8_embedder,
        native_group,
        native_kernel,
        native_linear,
        to_per_row,
    )

    config = getattr(model, "config", None)
    if plan.weight_storage == "float16" and config is not None:
        _float16_storage(model, plan, config.get_dtype())
        return
    if config is None or not getattr(config, "quant", False):
        return
    dtype = config.get_dtype()
    on_cpu = plan.runs_on_cpu(device_problem)
    kernels: dict[str, int] = {}
    embedder = "int8 (lookups and the sampler read it directly)"
    for name, module in list(model.named_modules()):
        if not getattr(module, "quant", False) or getattr(module, "weight", None) is None:
            continue
        if name in EMBEDDER_KEYS:
            if column_scaler(module) is not None:
                embedder = "int8 with row and column scales (lookups and the sampler read it directly)"
            if not (on_cpu and keep_int8_embedder(model, name, dtype)):
                dequantize_embedder(model, name, dtype)
                embedder = f"{str(dtype).removeprefix('torch.')} (computed once)"
        elif hasattr(module, "weight_scaler") and module.weight.dim() == 2 and type(module).__name__ == "Linear":
            if on_cpu and native_kernel(module, dtype):
                group = native_group(module)
                native_linear(module)
                scales = f", a scale per {group} columns" if group else ", a scale per row"
                kernel = f"native int8 kernel ({native.int8_path()}{scales})"
            else:
                to_per_row(module)  # scales per group of columns are the native AVX2 path's only
                direct_linear(module)
                kernel = "_weight_int8pack_mm" if on_cpu and dtype == torch.bfloat16 else "scratch-buffer kernel"
            kernels[kernel] = kernels.get(kernel, 0) + 1
    config.quant = False  # gemma's forward hands embedder.weight to the sampler as it is
    pages = ""
    on_native = any(kernel.startswith("native int8 kernel") for kernel in kernels)
    if on_native:
        from gemma_profiles.engine import hugepages
        from gemma_profiles.engine.kernels import pin_to_cpu
        from gemma_profiles.engine.quantization import native_weights

        pin_to_cpu(model, "this model", torch.int8)
        pages = hugepages.describe([packed.data for packed in native_weights(model)])
    why_not = native.unavailable() if on_cpu and not on_native else None
    if why_not:
        logger.info("[{}] int8: no native kernel here: {}", plan.profile, why_not)
    logger.info(
        "[{}] int8: linear layers read int8 weights directly ({}); the tied embedder is {}{}",
        plan.profile,
        ", ".join(f"{count} on the {kernel}" for kernel, count in kernels.items()) or "none",
        embedder,
        pages,
    )


def _float16_storage(model: Any, plan: Plan, dtype: Any) -> None:
    from gemma_profiles.engine.half import install

    layers, stored = install(model, dtype)
    logger.info(
        "[{}] float16 storage: {} linear layers and the tied embedder ({:.2f} GiB of weights) stored in float16, "
        "computed in {}",
        plan.profile,
        layers,
        stored / 2**30,
        str(dtype).removeprefix("torch."),
    )
