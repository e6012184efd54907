"""Where the model runs: the profile's device wins over the script's.

Policy (README "Device policy"):

- parameters are built lazily (meta) in the profile's dtype, and the loader puts
  each weight on ``placement.device`` when that device exists here (a model built
  eagerly - materialised before loading - is moved there right after construction);
- ``model.to(x)`` and ``model.generate(..., device=x)`` use the profile's
  device instead of ``x`` (logged once per call kind and device); ``generate``
  first moves the model there if it is elsewhere;
- a profile without ``placement.device`` leaves every device choice to the script
  (unless it offloads: then ``hooks/offload.py`` picks the execution device);
- a profile that offloads or maps modules is placed after loading, by ``hooks/offload.py``;
- a profile device this machine lacks stops construction (``hooks/preflight.py``); should
  the model get here anyway (the preflight builtin disabled), it is an error at the first
  move, naming the profile and the device.
"""

from __future__ import annotations

from typing import Any

from gemma_profiles.engine.devices import device_problem
from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.log import logger
from gemma_profiles.planning.plan import Plan
from gemma_profiles.plugin.hookspecs import hookimpl

_announced: set[tuple[str, str, str, str]] = set()


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
def gemma_profile_model_built(model: Any, plan: Plan) -> None:
    if plan.device is None:
        return
    if plan.offloads:
        # Moving everything now would put offloaded layers on the device too; the
        # offload plugin places each module once the weights are loaded.
        logger.debug("[{}] offload: modules are placed after loading", plan.profile)
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
