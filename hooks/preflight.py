"""Numerics checks before construction: no bfloat16 compute below compute capability 8.0.

DESIGN.md: native bf16 needs Ampere (8.0+); ``torch.cuda.is_bf16_supported()``
also counts emulation, so the capability is read directly.
"""

from __future__ import annotations

from gemma_profiles import hookimpl
from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.plan import Plan

NATIVE_BF16_CAPABILITY = (8, 0)


@hookimpl
def gemma_profile_preflight(plan: Plan) -> None:
    if plan.dtype != "bfloat16" or plan.device is None or not str(plan.device.value).startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        return  # placement reports the missing device when the model is moved
    index = torch.device(str(plan.device.value)).index or 0
    if index >= torch.cuda.device_count():
        return
    capability = torch.cuda.get_device_capability(index)
    if capability < NATIVE_BF16_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        raise GemmaProfileError(
            f"{name} (compute capability {capability[0]}.{capability[1]}) has no native bfloat16; "
            f"profile '{plan.profile}' asks for it",
            where=plan.config["dtype"].origin,
            hint="use dtype float16 for Gemma 1 2b, float32 for Gemma 2/3 and 7b",
        )
