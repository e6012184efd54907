"""Stop construction before any weight is read when the plan cannot work here.

Checked in order, each a one-line `GemmaProfileError` raised from gemma's constructor:

1. the devices: a profile whose ``placement.device`` is ``cuda``/``cuda:N``/``mps`` on a
   machine without it (no CUDA device, a CPU-only torch, fewer GPUs) names the profile, the
   device, what this machine has and the best profile here (``gemma-profile detect``); so does
   a layer map that computes layers on a GPU this machine lacks (a pipeline's ``cuda:1``);
2. the kernels: torch's build targets (``torch.cuda.get_arch_list()``) against the GPU's
   compute capability (`gemma_profiles.planning.hardware.torch_kernel_support`) - PyPI's default torch
   has no kernels for Maxwell/Pascal/Volta, which would fail mid-run with "no kernel image is
   available"; the fix (the cu126 build) is in the error;
3. the memory verdict, computed against the detected hardware when the profile's device is
   present: by how much it does not fit and the cheapest change that would.

The planner itself already refuses an explicit bfloat16 on a GPU below compute capability 8.0.
Hardware comes from `detect_hardware` (the ``gemma_profile_detect_hardware`` hook, so a plugin
or a test can supply it).
"""

from __future__ import annotations

from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.planning.hardware import Hardware
from gemma_profiles.planning.plan import FAMILY_NAMES, Plan, normalize_device
from gemma_profiles.plugin.hookspecs import hookimpl
from gemma_profiles.plugin.manager import detect_hardware

CUDA_BUILDS = "https://pytorch.org/get-started/locally/"


@hookimpl
def gemma_profile_preflight(plan: Plan) -> None:
    check_device(plan)
    check_stages(plan)
    check_memory(plan)


def check_stages(plan: Plan, hardware: Hardware | None = None) -> None:
    """Every other GPU the plan computes layers on (a pipeline: the layer map's ``cuda:N``) is here."""
    home = normalize_device(str(plan.device.value)) if plan.device is not None else None
    stages = sorted({d for d in plan.layers.values() if d.startswith("cuda:") and d != home})
    if not stages:
        return
    hardware = hardware or detect_hardware()
    for stage in stages:
        if hardware.gpu(stage) is None:
            spans = ", ".join(span for span, d in plan.layers.items() if d == stage)
            raise GemmaProfileError(
                f"profile '{plan.profile}' computes decoder layers {spans} on '{stage}', but {_cuda_here(hardware)}",
                where=plan.profile_path,
                hint="map those layers to a GPU this machine has, offload them (cpu or disk), "
                "or drop the other GPUs from placement.max_memory",
            )


def check_device(plan: Plan, hardware: Hardware | None = None) -> None:
    """The profile's device is on this machine, and this torch has kernels for it."""
    if plan.device is None:
        return  # the script chooses the device
    device = str(plan.device.value)
    kind = device.partition(":")[0]
    if kind not in ("cuda", "mps"):
        return
    hardware = hardware or detect_hardware()
    if kind == "mps":
        if not hardware.mps:
            _refuse(plan, device, "MPS is not available here", hardware)
        return
    gpu = hardware.gpu(normalize_device(device))
    if gpu is None:
        _refuse(plan, device, _cuda_here(hardware), hardware)
        return
    support = hardware.kernel_support(gpu)
    if support is not None and not support.ok:
        raise GemmaProfileError(
            f"profile '{plan.profile}' runs the model on '{device}' ({gpu.name}), but {support.reason}",
            where=plan.device.origin,
            hint=support.fix,
        )


def _cuda_here(hardware: Hardware) -> str:
    if hardware.gpus:
        count = len(hardware.gpus)
        return f"this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
    if hardware.torch_version is not None and hardware.cuda_version is None:
        return f"this torch ({hardware.torch_version}) is a CPU-only build and sees no CUDA device"
    return "this machine has no CUDA device"


def _refuse(plan: Plan, device: str, problem: str, hardware: Hardware) -> None:
    assert plan.device is not None
    hint = f"run 'gemma-profile detect': {_best_here(hardware)}; or set GEMMA_PROFILE=off"
    if device.startswith("cuda") and not hardware.gpus and hardware.cuda_version is None:
        from gemma_profiles.planning.auto import nvidia_gpus_visible

        if nvidia_gpus_visible():  # a GPU the driver shows, but this torch has no CUDA
            hint = (
                f"install a CUDA build of torch ({CUDA_BUILDS}; for Maxwell/Pascal/Volta: "
                "pip install torch --index-url https://download.pytorch.org/whl/cu126); " + hint
            )
    raise GemmaProfileError(
        f"profile '{plan.profile}' runs the model on '{device}', but {problem}",
        where=plan.device.origin,
        hint=hint,
    )


def _best_here(hardware: Hardware) -> str:
    """``the best profile here is 'cpu-8gb'``, from the same match ``detect`` makes."""
    from gemma_profiles.planning.auto import best_match
    from gemma_profiles.spec.registry import default_registry

    try:
        match = best_match(hardware, default_registry())
    except GemmaProfileError:
        match = None
    if match is None:
        return "no bundled profile matches this machine; GEMMA_PROFILE=auto builds one from it"
    return f"the best profile here is '{match.name}' (or auto)"


def check_memory(plan: Plan) -> None:
    """The memory verdict: by how much it does not fit, and the cheapest change that would."""
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
