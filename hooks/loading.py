"""Checkpoint loading while a profile is active: the lean loader in `gemma_profiles.engine.loading`.

The checkpoint is checked against the model first (every name, shape and dtype;
docs/loading.md), then loaded memory-mapped, tensor by tensor, assigned instead
of copied, int8 on the fly, with NaN/Inf weights refused.  A model that was
materialised before loading (``.to()`` or ``load_state_dict`` first) goes
through gemma's own ``load_weights`` after the same checks.  Runs last, so a
plugin's ``gemma_profile_load_weights`` can replace it.

This builtin decides where each tensor goes (`load_options`: the plan's device when this
machine has it, the plan's layer map, the embedder the plan keeps on the CPU) and hands
the engine those plain values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gemma_profiles.log import logger
from gemma_profiles.planning.plan import EMBEDDER_KEYS, OFFLOAD_TARGETS, Plan, expand_layers, normalize_device
from gemma_profiles.plugin.hookspecs import hookimpl

if TYPE_CHECKING:
    from gemma_profiles.engine.loading import LoadOptions


def execution_devices(plan: Plan, pending: str | None = None) -> tuple[str, dict[int, str]]:
    """The device resident tensors go to, and per-layer devices from the plan's layer map.

    :param pending: a device the script asked for with ``.to()`` before loading.
    """
    from gemma_profiles.engine.devices import device_problem

    device = "cpu"
    wanted = str(plan.device.value) if plan.device is not None else pending
    if wanted is not None:
        device = wanted if device_problem(wanted) is None else "cpu"
    layers = {index: _layer_device(where, device) for index, where in expand_layers(plan.layers).items()}
    return device, layers


def _layer_device(where: str, device: str) -> str:
    """Where a decoder layer's weights are loaded: offloaded layers wait on the CPU; a layer another
    GPU computes (a pipeline stage) goes straight there; else the execution device."""
    from gemma_profiles.engine.devices import device_problem

    if where in OFFLOAD_TARGETS or device == "cpu":
        return "cpu"
    if where.startswith("cuda:") and device.startswith("cuda") and device_problem(where) is None:
        return where
    return device


def planned_embedder_device(plan: Plan, device: str) -> str | None:
    """``cpu`` when the plan keeps the tied embedder off the execution ``device``
    (``placement.device_map``'s ``embedder: cpu|disk``; the offload step packs a ``disk``
    embedder from host memory), else None: it goes to ``device`` with the other resident weights.

    Loading it there first would hold it on a small GPU - with int8, beside its dequantized
    copy - before the offload step moved it: more than a 5-6 GB card has room for.
    """
    device_map = plan.placement.device_map
    if device == "cpu" or not isinstance(device_map, dict):
        return None
    named = next((str(device_map[key]) for key in EMBEDDER_KEYS if key in device_map), None)
    return "cpu" if named is not None and normalize_device(named) in OFFLOAD_TARGETS else None


def load_options(plan: Plan, pending: str | None = None) -> LoadOptions:
    """What the engine's loader needs from ``plan``, as plain values.

    :param pending: a device the script asked for with ``.to()`` before loading.
    """
    from gemma_profiles.engine.loading import LoadOptions
    from gemma_profiles.plugin.manager import blocked_from_env

    device, layers = execution_devices(plan, pending)
    # Only the quantization builtin computes with float16 storage and the embedder's column scales.
    quantization = "quantization" not in blocked_from_env()
    float16 = plan.weight_storage == "float16"
    if float16 and not quantization:
        logger.warning(
            "[{}] quantization.weights: float16 needs the quantization builtin (blocked by "
            "GEMMA_PROFILE_DISABLE_PLUGINS): weights stay float32",
            plan.profile,
        )
    return LoadOptions(
        device=device,
        layers=layers,
        embedder=planned_embedder_device(plan, device),
        label=plan.profile,
        mmap=plan.loading.mmap,
        float16_storage=float16 and quantization,
        column_scales=quantization,
        int8_group=int8_group(plan) if quantization else 0,
    )


def int8_group(plan: Plan) -> int:
    """Columns per int8 scale group for the decoder's weights: `INT8_GROUP_COLUMNS` where the
    native kernel's AVX2 path computes them (an int8 plan; the loader groups only weights that stay
    on the CPU), else 0 (gemma's per-row format: the VNNI path, torch's kernels and CUDA compute per
    row).  Under tensor parallel each rank groups its own slice: the same groups as one process
    wherever a slice boundary falls on a multiple of 64 columns."""
    from gemma_profiles.engine import native
    from gemma_profiles.engine.loading import INT8_GROUP_COLUMNS

    # (float16 compute is CUDA's, or torch's kernels on a CPU: per row)
    if plan.quantization != "int8" or str(plan.dtype) not in ("float32", "bfloat16") or not native.grouped_path():
        return 0
    return INT8_GROUP_COLUMNS


@hookimpl(trylast=True)
def gemma_profile_load_weights(model: Any, path: str, plan: Plan, gemma_loader: Callable[[str], Any]) -> bool:
    from gemma_profiles.engine.lazy import is_lazy, materialize, pending_device
    from gemma_profiles.engine.loading import check_checkpoint, check_finite, check_for_gemma, lean_load

    check_checkpoint(path)
    if is_lazy(model):
        lean_load(model, path, load_options(plan, pending_device(model)))
    else:
        # Built eagerly (materialised by an earlier .to() or load_state_dict): gemma's own loader.
        materialize(model)
        check_for_gemma(model, path, plan.profile)
        gemma_loader(path)
        check_finite(model, path)
    return True
