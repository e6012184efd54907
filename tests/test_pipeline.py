"""Decoder layers split over several GPUs in one process (a pipeline; docs/parallel.md).

On this CPU machine: the planner's per-device memory, its automatic split over the GPUs that
``max_memory`` names, the refusals (a GPU the machine lacks, a device layers cannot run on), where
the loader puts each layer, and the engine's hooks (`Pipeline`) on a CPU model.  Moving
activations and KV caches between real devices is in tests/test_pipeline_gpu.py
(``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gemma_profiles.engine import offload
from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.planning.hardware import CpuInfo, GpuInfo, Hardware
from gemma_profiles.planning.plan import Plan, make_plan
from gemma_profiles.spec.profile import load_profile

GIB = 2**30
HARDWARE = """hardware:
  device: cuda
  gpu: ["Tesla T4"]
  compute_capability: "7.5"
  memory: 15GiB
  host_memory: 29GiB
"""


@pytest.fixture
def plan_of(write_profile: Callable[..., Path]) -> Callable[..., Plan]:
    """``plan_of(placement, variant)``: the plan of a two-T4 profile with that placement."""
    names = iter(range(100))

    def make(placement: str, variant: str = "7b", config: str = "{dtype: float32}") -> Plan:
        name = f"pipe-{next(names)}"
        path = write_profile(
            name, f"name: {name}\ndescription: t\n{HARDWARE}config: {config}\nplacement: {placement}\n"
        )
        return make_plan(load_profile(path), variant)

    return make


def rows(plan: Plan, device: str) -> dict[str, int]:
    assert plan.memory is not None
    return {item.component: item.bytes for item in plan.memory.items if item.device == device}


# -- planning --------------------------------------------------------------------------------


def test_a_device_map_over_two_gpus_sizes_each_gpu(plan_of: Callable[..., Plan]) -> None:
    one = plan_of("{device: cuda:0}", config="{dtype: float16}", variant="2b")
    two = plan_of(
        "{device: cuda:0, device_map: {'0-8': cuda:0, '9-17': cuda:1}}", config="{dtype: float16}", variant="2b"
    )
    assert two.layers == {"0-8": "cuda:0", "9-17": "cuda:1"}
    first, second = rows(two, "cuda:0"), rows(two, "cuda:1")
    layer = rows(one, "cuda:0")["decoder layers x18"] // 18
    assert first["decoder layers x9"] == second["decoder layers x9"] == 9 * layer
    # The second GPU holds its layers' half of the KV cache; the first holds all of it until the
    # first step moves each layer's share (gemma's generate allocates them on one device).
    assert second["KV cache"] * 2 == first["KV cache"] == rows(one, "cuda:0")["KV cache"]
    assert second["activation peak"] == first["activation peak"]
    assert "CUDA context" in second and "embedder (tied output)" not in second
    assert two.memory is not None and set(two.memory.required) >= {"cuda:0", "cuda:1"}
    assert two.memory.required["cuda:0"] < one.memory.required["cuda:0"]  # type: ignore[union-attr]
    assert two.verdict is not None and two.verdict.fits
    assert "split over 2 GPUs (a pipeline: 0-8 on cuda:0, 9-17 on cuda:1)" in two.verdict.message


def test_the_planner_splits_layers_over_the_gpus_max_memory_names(plan_of: Callable[..., Plan]) -> None:
    # 7b in float16 storage: 17 GB of weights, more than one T4; two hold it.
    plan = plan_of(
        "{device: cuda:0, max_memory: {cuda:0: 14GiB, cuda:1: 14GiB}}",
        config="{dtype: float32}\nquantization: {weights: float16}",
    )
    assert plan.verdict is not None and plan.verdict.fits, plan.verdict
    assert plan.quantization == "float16"  # not int8: two GPUs hold float16 storage
    devices = list(plan.layers.values())
    assert devices == ["cuda:0", "cuda:1"], plan.layers
    assert plan.placement.device_map == plan.layers  # what hooks/offload.py places from
    assert plan.memory is not None
    for device in ("cuda:0", "cuda:1"):
        assert plan.memory.required[device] <= 14 * GIB
    # cuda:0 keeps as many layers as fit beside the embedder: one more would not.
    first = int(next(iter(plan.layers)).split("-")[1]) + 1
    assert 0 < first < 28
    assert plan.memory.required["cuda:0"] > 14 * GIB - rows(plan, "cuda:0")[f"decoder layers x{first}"] // first


def test_a_model_that_fits_one_gpu_stays_on_it(plan_of: Callable[..., Plan]) -> None:
    plan = plan_of(
        "{device: cuda:0, max_memory: {cuda:0: 14GiB, cuda:1: 14GiB}}", variant="2b", config="{dtype: float16}"
    )
    assert plan.layers == {"0-17": "cuda:0"}
    assert plan.placement.device_map is None and plan.memory is not None and "cuda:1" not in plan.memory.required


def test_a_split_that_still_does_not_fit_says_which_gpu_is_short(plan_of: Callable[..., Plan]) -> None:
    plan = plan_of("{device: cuda:0, max_memory: {cuda:0: 6GiB, cuda:1: 6GiB}}", variant="27b")
    assert plan.verdict is not None and not plan.verdict.fits
    assert "cuda:1 needs" in plan.verdict.message or "cuda:0 needs" in plan.verdict.message


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ("{device: cuda:0, device_map: {'3': mps}}", r"'mps' is not a device layers can run on"),
        ("{device: cuda:0, device_map: {'3': gpu1}}", r"'gpu1' is not a device layers can run on"),
        ("{device: cpu, device_map: {'3': cuda:1}}", r"layers on cuda:1 need the model to run on a CUDA device"),
    ],
)
def test_a_device_layers_cannot_run_on_is_refused_by_the_planner(
    plan_of: Callable[..., Plan], placement: str, message: str
) -> None:
    with pytest.raises(GemmaProfileError, match=message) as caught:
        plan_of(placement)
    assert "placement.device_map" in str(caught.value) and "\n" not in str(caught.value)


def hardware(gpus: int) -> Hardware:
    cpu = CpuInfo(cores=8, total_memory=32 * GIB, available_memory=30 * GIB)
    return Hardware(cpu, tuple(GpuInfo(i, "Tesla T4", (7, 5), 15 * GIB) for i in range(gpus)), False, "2.13.0", "12.4")


def test_the_preflight_refuses_a_gpu_this_machine_lacks_in_one_line(plan_of: Callable[..., Plan]) -> None:
    from gemma_profiles.hooks.preflight import check_stages

    plan = plan_of("{device: cuda:0, device_map: {'0-13': cuda:0, '14-27': cuda:1}}")
    check_stages(plan, hardware(2))
    with pytest.raises(GemmaProfileError) as caught:
        check_stages(plan, hardware(1))
    message = str(caught.value)
    assert "computes decoder layers 14-27 on 'cuda:1', but this machine has 1 CUDA device(s): cuda:0..cuda:0" in message
    assert "\n" not in message


def test_the_loader_puts_a_stage_layer_straight_on_its_gpu(
    plan_of: Callable[..., Plan], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gemma_profiles.hooks.loading import execution_devices

    from gemma_profiles.engine import devices

    plan = plan_of("{device: cuda:0, offload: cpu, device_map: {'0-9': cuda:0, '10-19': cuda:1, '20-27': cpu}}")
    monkeypatch.setattr(devices, "device_problem", lambda device: None)  # as on a machine with two GPUs
    device, layers = execution_devices(plan)
    assert device == "cuda:0"
    assert {layers[i] for i in range(10)} == {"cuda:0"}
    assert {layers[i] for i in range(10, 20)} == {"cuda:1"}
    assert {layers[i] for i in range(20, 28)} == {"cpu"}  # offloaded: waits in host memory


def test_the_offload_builtin_makes_stages_of_layers_on_other_gpus(
    plan_of: Callable[..., Plan], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gemma_profiles.hooks.offload import decide_layout

    from gemma_profiles.engine import devices

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(28))
    plan = plan_of("{device: cuda:0, offload: cpu, device_map: {'0-9': cuda:0, '10-19': cuda:1, '20-27': cpu}}")
    monkeypatch.setattr(devices, "device_problem", lambda device: None)
    layout = decide_layout(model, plan, "cuda:0")
    assert layout.stages == dict.fromkeys(range(10, 20), "cuda:1")
    assert layout.offloaded == dict.fromkeys(range(20, 28), "cpu")
    assert layout.layer_map == "0-9 -> cuda:0, 10-19 -> cuda:1, 20-27 -> cpu"
    monkeypatch.setattr(devices, "device_problem", lambda device: "this machine has 1 CUDA device(s): cuda:0..cuda:0")
    with pytest.raises(GemmaProfileError, match=r"computes decoder layer 10 on cuda:1, but this machine has 1 CUDA"):
        decide_layout(model, plan, "cuda:0")


# -- the engine on a CPU model -------------------------------------------------------------------


def test_a_moved_input_is_moved_once_per_step() -> None:
    pipeline = offload.Pipeline(torch.device("cpu"), [torch.device("cpu")])
    mask = torch.zeros(2, 2)
    first = pipeline.shared(mask, torch.device("meta"))
    assert first.device.type == "meta" and pipeline.shared(mask, torch.device("meta")) is first
    assert pipeline.shared((mask, 3), torch.device("meta"))[0] is first
    assert pipeline.shared(mask, torch.device("cpu")) is mask  # already there
    pipeline.new_step(torch.nn.Identity(), (), {})
    assert pipeline.shared(mask, torch.device("meta")) is not first


def test_a_kv_cache_moves_in_place_or_not_at_all() -> None:
    cache = torch.arange(6.0)
    pair = (cache, torch.zeros(1))
    offload.relocate(cache, torch.device("cpu"))
    assert pair[0] is cache and torch.equal(cache, torch.arange(6.0))
    # A device whose tensors cannot swap data with these (meta here) is one clear error, nothing moved.
    with pytest.raises(GemmaProfileError, match=r"KV cache on cpu cannot be moved in place to meta"):
        offload.relocate(cache, torch.device("meta"))
    assert cache.device.type == "cpu"


def test_pipeline_hooks_on_a_cpu_model_change_nothing(gemma: Any, tokenizer_path: str, tmp_path: Path) -> None:
    """Layers 1-2 as a stage on ``cpu:0`` (the CPU, named apart from the execution device ``cpu``):
    the hooks run on every boundary and the final norm, and the tokens and logits stay the plain
    model's exactly."""
    from gemma_testing import build_tiny_model, greedy, write_random_checkpoint

    model = build_tiny_model(gemma, tokenizer_path, "2b", num_hidden_layers=4, quant=False)
    write_random_checkpoint(model, str(tmp_path / "m.ckpt"), torch.float32, seed=3)
    model.load_weights(str(tmp_path / "m.ckpt"))
    model.eval()

    def run() -> tuple[str, list[torch.Tensor]]:
        return greedy(model, "cpu", "the cat sees", 4)

    plain_text, plain_logits = run()
    calls: list[int] = []
    layers = model.model.layers
    for index in range(4):
        layers[index].register_forward_pre_hook(lambda m, a, k, i=index: calls.append(i), with_kwargs=True)
    layout = offload.Layout("cpu", {}, reason="test", stages={1: "cpu:0", 2: "cpu:0"})
    state = offload.apply_offload(model, layout, "test")
    hooked = [i for i in range(4) if any(h.__name__ == "to_layer" for h in layers[i]._forward_pre_hooks.values())]
    assert hooked == [1, 2, 3], "a stage's layers, and the first layer back on the execution device"
    text, logits = run()
    assert text == plain_text and all(torch.equal(a, b) for a, b in zip(logits, plain_logits, strict=True))
    assert calls.count(1) == 4  # every step ran through the stage
    model.to("cpu")  # a stage layer keeps its placement across model.to()
    assert type(layers[1]).__name__.startswith("Offloaded")
    offload.remove_offload(model)
    assert state.handles and all(len(layers[i]._forward_pre_hooks) == 1 for i in range(4))


# -- detect -------------------------------------------------------------------------------------


def test_detect_picks_the_two_gpu_profile_only_where_there_are_two_gpus() -> None:
    from gemma_profiles.planning.auto import best_match
    from gemma_profiles.spec.registry import default_registry

    one = best_match(hardware(1), default_registry())
    two = best_match(hardware(2), default_registry())
    assert one is not None and one.name == "t4"
    assert two is not None and two.name == "kaggle-2xt4-notebook" and "uses 2 of them" in two.reason


def test_tensor_parallel_and_a_pipeline_do_not_mix(plan_of: Callable[..., Plan]) -> None:
    with pytest.raises(GemmaProfileError, match=r"asks for tensor parallel: each rank computes on one GPU"):
        plan_of("{device: cuda:0, tensor_parallel: 2, device_map: {'14-27': cuda:1}}")
    # max_memory naming both GPUs under tensor parallel sizes each rank, not a split
    plan = plan_of("{device: cuda:0, tensor_parallel: 2, max_memory: {cuda:0: 14GiB, cuda:1: 14GiB}}")
    assert set(plan.layers.values()) == {"cuda:0"} and plan.placement.device_map is None
