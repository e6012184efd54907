"""Stop construction before any weight is read when the plan cannot work here.

The planner already refuses an explicit bfloat16 on a GPU below compute
capability 8.0 (with the GPU's name); this checks the memory verdict, computed
against the detected hardware, and says by how much and what would fit.
"""

from __future__ import annotations

from gemma_profiles import hookimpl
from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.plan import FAMILY_NAMES, Plan


@hookimpl
def gemma_profile_preflight(plan: Plan) -> None:
    verdict = plan.verdict
    if verdict is None or verdict.fits:
        return
    fix = f"cheapest change that fits: {verdict.suggestion}" if verdict.suggestion else "no single change fits"
    model = plan.variant or FAMILY_NAMES.get(plan.family or "") or "this model"
    raise GemmaProfileError(
        f"{model} under profile '{plan.profile}' {verdict.message}",
        where=plan.profile_path,
        hint=f"{fix}; see 'gemma-profile plan {plan.profile} --variant {plan.variant or '...'}'",
    )
