"""Where the model runs: the profile's device wins over the script's.

Policy (README "Device policy"):

- parameters are built on the CPU, as gemma does, in the profile's dtype;
- right after construction the model moves to ``placement.device`` when that
  device exists here;
- ``model.to(x)`` and ``model.generate(..., device=x)`` use the profile's
  device instead of ``x`` (logged once per call kind and device); ``generate``
  first moves the model there if it is elsewhere;
- a profile without ``placement.device`` leaves every device choice to the script;
- a profile device this machine lacks is an error at the first move, naming
  the profile and the device.
"""

from __future__ import annotations

from typing import Any

from loguru import logger

from gemma_profiles import hookimpl
from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.plan import Plan

_announced: set[tuple[str, str, str, str]] = set()


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot be used here, or None when it can."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            return f"this torch ({torch.__version__}) sees no CUDA device"
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            return f"this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return "MPS is not available here"
    return None


def require_device(plan: Plan) -> str:
    assert plan.device is not None
    device = str(plan.device.value)
    problem = device_problem(device)
    if problem:
        raise GemmaProfileError(
            f"profile '{plan.profile}' runs the model on '{device}', but {problem}",
            where=plan.device.origin,
            hint="pick a profile for this machine ('gemma-profile list') or set GEMMA_PROFILE=off",
        )
    return device


@hookimpl
def gemma_profile_preflight(plan: Plan) -> None:
    placement = plan.placement
    if placement.offload != "none" or isinstance(placement.device_map, dict) or placement.device_map == "auto":
        raise GemmaProfileError(
            f"profile '{plan.profile}' asks for a device map / {placement.offload} offload, "
            "which no installed plugin provides yet",
            where=plan.profile_path,
            hint="use a variant that fits on one device, or int8 weights",
        )


@hookimpl
def gemma_profile_model_built(model: Any, plan: Plan) -> None:
    if plan.device is None:
        return
    device = str(plan.device.value)
    if device_problem(device) is None:
        if device != "cpu":
            logger.info("[{}] model placed on {} ({})", plan.profile, device, plan.device.origin)
            model.to(device)
    else:
        logger.warning(
            "[{}] profile device {} is not available here; the model stays on the CPU until moved", plan.profile, device
        )


@hookimpl
def gemma_profile_resolve_device(requested: Any, plan: Plan, call: str) -> str | None:
    if plan.device is None:
        return None
    device = require_device(plan)
    key = (plan.profile, call, str(requested), device)
    if str(requested) != device and key not in _announced:
        _announced.add(key)
        logger.info(
            "[{}] {}(device={}) -> {} (the profile's device wins; {})",
            plan.profile,
            call,
            requested,
            device,
            plan.device.origin,
        )
    return device
