"""Out of memory while loading: the plan's numbers and a way out, instead of an allocator's traceback.

Wraps every ``gemma_profile_load_weights`` (and ``gemma_profile_weights_loaded``)
implementation, gemma's own loader included.  ``torch.OutOfMemoryError``, a
``RuntimeError`` saying "out of memory" / "can't allocate memory", ``MemoryError``
and ``ENOMEM`` become one `GemmaProfileError` with what the plan expected on
each device against its budget, the allocator's own first line, and the
planner's cheapest change (or int8 / a smaller variant / ``gemma-profile plan``).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from gemma_profiles.errors import GemmaProfileError, is_out_of_memory
from gemma_profiles.planning.plan import Plan
from gemma_profiles.plugin.hookspecs import hookimpl
from gemma_profiles.units import format_bytes


def plan_numbers(plan: Plan) -> str:
    """``cuda:0 3.94 GiB of 4.50 GiB (placement.max_memory), cpu ...`` - or why there are none."""
    if plan.memory is None:
        return "the plan has no memory estimate for this model (unknown variant)"
    budgets = {budget.device: budget for budget in plan.budgets}
    parts = []
    for device, need in plan.memory.required.items():
        budget = budgets.get(device)
        limit = f" of {format_bytes(budget.available)} ({budget.note})" if budget else " (no budget known)"
        parts.append(f"{device} {format_bytes(need)}{limit}")
    return "the plan needs " + ", ".join(parts)


def out_of_memory_error(exc: BaseException, plan: Plan, doing: str, where: str) -> GemmaProfileError:
    model = plan.variant or (f"a {plan.family} model" if plan.family else "the model")
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if len(first_line) > 200:
        first_line = first_line[:197] + "..."
    verdict = plan.verdict
    if verdict is not None and not verdict.fits and verdict.suggestion:
        fix = f"cheapest change that fits: {verdict.suggestion}"
    else:
        fix = "try int8 weights (quantization: {weights: int8}), a smaller variant, or free memory other processes use"
    check = f"gemma-profile plan {plan.profile} --variant {plan.variant or '...'} --here"
    return GemmaProfileError(
        f"out of memory {doing} {model} under profile '{plan.profile}' "
        f"({type(exc).__name__}: {first_line}); {plan_numbers(plan)}",
        where=where,
        hint=f"{fix}; see '{check}'",
    )


@hookimpl(wrapper=True)
def gemma_profile_load_weights(
    model: Any, path: str, plan: Plan, gemma_loader: Callable[[str], Any]
) -> Generator[None, bool | None, bool | None]:
    try:
        return (yield)
    except Exception as exc:  # MemoryError is an Exception; anything else passes through untouched
        if is_out_of_memory(exc):
            raise out_of_memory_error(exc, plan, "while loading weights into", path) from exc
        raise


@hookimpl(wrapper=True)
def gemma_profile_weights_loaded(model: Any, plan: Plan) -> Generator[None, list[None], list[None]]:
    try:
        return (yield)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise out_of_memory_error(exc, plan, "after loading weights into", plan.profile_path) from exc
        raise
