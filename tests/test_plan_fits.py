"""Bundled profiles plan what they promise: the embedder off a small GPU, float16 storage, the
cheapest change named whenever a plan does not fit, and where the target's facts come from."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner
from gemma_profiles.hooks.sources import bundled_dir

from gemma_profiles.cli.main import cli
from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.planning import memory
from gemma_profiles.planning.memory import DTYPE_BYTES, SAMPLER_CHUNK_ROWS, ModelShape, estimate_memory
from gemma_profiles.planning.plan import Plan, make_plan, split_device_map
from gemma_profiles.spec.registry import default_registry
from gemma_profiles.spec.variants import VARIANTS

GiB = 2**30


def _concrete() -> list[str]:
    registry = default_registry()
    names = [p.stem for p in sorted(bundled_dir().glob("*.yaml"))]
    return [name for name in names if not registry.load(name).model.abstract]


#: (profile, variant) a profile names in its ``variants:`` section: what it promises to run.
PROMISED = [
    (name, variant)
    for name in _concrete()
    for variant in default_registry().load(name).model.variants
    if variant in VARIANTS
]
#: Promised, they fit only because the loader reads a CPU-placed embedder into host memory
#: directly: loaded onto the GPU first (and, with int8, dequantized there) it alone did not
#: fit a 5-6 GB card (memory.EMBEDDER_LOADED_ON_DEVICE, now False).
LOADER_PLACED = [("gtx1060-6gb", "27b"), ("pascal-5gb", "9b"), ("pascal-5gb", "27b")]


def plan_of(name: str, variant: str) -> Plan:
    return make_plan(default_registry().load(name), variant)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize(("name", "variant"), PROMISED, ids=[f"{n}-{v}" for n, v in PROMISED])
def test_every_promised_variant_fits_its_profile(name: str, variant: str) -> None:
    # Before: pascal-5gb 7b/9b/27b, t4 12b/27b/27b_v3, v100-16gb 12b, rtx3060-12gb 27b/27b_v3 did not fit.
    plan = plan_of(name, variant)
    assert plan.verdict is not None and plan.verdict.fits, (plan.verdict, plan.verdict and plan.verdict.suggestion)


@pytest.mark.parametrize(("name", "variant"), LOADER_PLACED)
def test_the_embedder_placed_by_the_loader_makes_them_fit(name: str, variant: str) -> None:
    # Before: pascal-5gb 9b "does not fit: cuda:0 needs 5.35 GiB but has 4.50 GiB", 27b 7.77 GiB.
    assert memory.EMBEDDER_LOADED_ON_DEVICE is False
    plan = plan_of(name, variant)
    assert plan.verdict is not None and plan.verdict.fits, plan.verdict
    assert plan.embedder is not None and plan.embedder.value == "cpu"
    assert plan.layers[next(iter(plan.layers))] == "cuda:0", "some layers stay on the GPU"
    assert plan.memory is not None
    assert "embedder while loading" not in {item.component for item in plan.memory.items}


@pytest.mark.parametrize(("name", "variant"), [("pascal-5gb", "9b"), ("pascal-5gb", "27b")])
def test_an_embedder_loaded_on_the_gpu_first_would_not_fit(monkeypatch: Any, name: str, variant: str) -> None:
    # What the plan would be for a loader that puts the embedder on the GPU and moves it afterwards.
    monkeypatch.setattr(memory, "EMBEDDER_LOADED_ON_DEVICE", True)
    plan = plan_of(name, variant)
    assert plan.verdict is not None and not plan.verdict.fits, plan.verdict


def test_pascal_7b_keeps_the_embedder_on_the_cpu() -> None:
    # Before: "does not fit: cuda:0 needs 5.42 GiB" - a 2.93 GiB float32 embedder on a 5 GB card
    # while every layer was offloaded, and no suggestion.
    plan = plan_of("pascal-5gb", "7b")
    assert plan.verdict is not None and plan.verdict.fits, plan.verdict
    assert plan.embedder is not None and plan.embedder.value == "cpu"
    assert plan.embedder.origin.startswith("auto: the tied embedder (2.93 GiB in float32)")
    assert plan.memory is not None
    rows = {item.component: item for item in plan.memory.items}
    assert rows["embedder (tied output)"].device == "cpu"
    # the loader reads it into host memory and dequantizes it there: the GPU never holds it
    assert "embedder while loading" not in rows
    assert plan.memory.required["cuda:0"] == plan.memory.peak["cuda:0"] < 4.5 * GiB
    assert plan.layers["0-6"] == "cuda:0", "7 layers on the GPU (1 while the embedder was loaded there first)"
    # hooks/offload.py reads the embedder's place from placement.device_map
    assert isinstance(plan.placement.device_map, dict)
    layers, embedder = split_device_map(plan.placement.device_map, 28)
    assert embedder == "cpu"
    assert layers == {index: device for index, device in _expand(plan.layers).items()}
    assert "the embedder on cpu" in plan.verdict.message


def _expand(ranges: dict[str, str]) -> dict[int, str]:
    out = {}
    for span, device in ranges.items():
        first, _, last = span.partition("-")
        out.update({i: device for i in range(int(first), int(last) + 1)})
    return out


def test_the_embedder_stays_on_the_gpu_when_it_fits_there() -> None:
    # offloading layers is enough on a T4: the sampler keeps running on the GPU
    plan = plan_of("t4", "12b")
    assert plan.verdict is not None and plan.verdict.fits and plan.embedder is None
    assert "cpu" in plan.layers.values() and plan.placement.device_map is None


def test_an_explicit_embedder_on_the_cpu_is_sized(write_profile: Any) -> None:
    # Before: the estimate left a device_map's embedder on the GPU.
    path = write_profile(
        "mapped",
        """
        description: x
        hardware: {device: cuda, compute_capability: "7.5", memory: 16GiB, host_memory: 32GiB}
        placement: {device: cuda, device_map: {embedder: cpu, "20-27": cpu}}
        config: {dtype: float32}
        quantization: {weights: int8}
        """,
    )
    from gemma_profiles.spec.profile import load_profile

    plan = make_plan(load_profile(path), "7b")
    assert plan.embedder is not None and plan.embedder.value == "cpu" and plan.embedder.origin.endswith(":3")
    assert plan.memory is not None
    rows = {item.component: item for item in plan.memory.items}
    assert rows["embedder (tied output)"].device == "cpu"
    assert rows["offloaded layers x8"].device == "cpu"


@pytest.mark.parametrize("name", _concrete())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_plan_that_does_not_fit_names_the_cheapest_change(name: str, variant: str) -> None:
    # Before: pascal-5gb 7b/9b said "does not fit" and nothing else.
    plan = plan_of(name, variant)
    assert plan.verdict is not None
    if not plan.verdict.fits:
        assert plan.verdict.suggestion, plan.verdict


def test_the_cli_prints_the_cheapest_change_for_pascal_9b(monkeypatch: Any) -> None:
    # pascal-5gb 9b fits; with an embedder loaded onto the GPU first it would not, and nothing single helps
    monkeypatch.setattr(memory, "EMBEDDER_LOADED_ON_DEVICE", True)
    result = invoke("plan", "pascal-5gb", "--variant", "9b")
    assert result.exit_code == 1
    assert "\ncheapest change that fits: " in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("cheapest change that fits: no single change fits") and "cuda:0 lacks" in last


def test_offload_to_disk_is_suggested_when_host_memory_is_short(write_profile: Any) -> None:
    path = write_profile(
        "small-host",
        """
        description: x
        hardware: {device: cuda, compute_capability: "8.6", memory: 12GiB, host_memory: 16GiB}
        placement: {device: cuda, offload: cpu}
        config: {dtype: bfloat16}
        quantization: {weights: int8}
        """,
    )
    from gemma_profiles.spec.profile import load_profile

    plan = make_plan(load_profile(path), "27b")
    assert plan.verdict is not None and not plan.verdict.fits
    assert plan.verdict.suggestion is not None and "to disk (placement.offload: disk)" in plan.verdict.suggestion


# -- where the target's facts come from ---------------------------------------------------------


def test_plan_header_and_budget_say_where_the_facts_come_from() -> None:
    # Before: "(profile t4 hardware:)" in the header and "reserve (profile t4 hardware:)" in the budget.
    result = invoke("plan", "t4", "--variant", "2b")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].endswith("(described by t4's hardware: section)")
    assert "budget 14.50 GiB (15.00 GiB from t4's hardware: section, less a 512.00 MiB reserve)" in result.output
    assert "hardware:)" not in result.output and "(profile t4" not in result.output


def test_detected_budget_says_detected(fake_hardware: Any) -> None:
    from gemma_profiles.planning.hardware import CpuInfo, Hardware

    fake_hardware(Hardware(CpuInfo(8, 32 * GiB, 30 * GiB, ("avx2",), "Test CPU")))
    result = invoke("plan", "cpu-8gb", "--variant", "2b", "--here")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].endswith("(detected on this machine)")
    assert "(32.00 GiB detected, less a 655.36 MiB reserve)" in result.output


# -- float16 storage, float32 compute -----------------------------------------------------------


def storage_profile(write_profile: Any, extra: str = "", gpu: str = "7.5", memory_size: str = "16GiB") -> Any:
    from gemma_profiles.spec.profile import load_profile

    path = write_profile(
        "f16",
        f"""
        description: x
        hardware: {{device: cuda, compute_capability: "{gpu}", memory: {memory_size}, host_memory: 32GiB}}
        placement: {{device: cuda}}
        quantization: {{weights: float16}}
        {extra}
        """,
    )
    return load_profile(path)


def test_float16_storage_computes_in_float32(write_profile: Any) -> None:
    plan = make_plan(storage_profile(write_profile), "4b")
    assert plan.weight_storage == "float16" and plan.quantization == "float16"
    assert plan.dtype == "float32" and plan.config["dtype"].origin.startswith("auto: float16 storage")
    assert plan.config["quant"].value is False
    assert plan.verdict is not None and plan.verdict.fits
    assert "float16 weights, float32 compute" in plan.verdict.message
    assert plan.as_dict()["weight_storage"] == "float16"


@pytest.mark.parametrize(
    ("dtype", "said"),
    [("float16", "float16 storage with float16 compute is plain float16"), ("bfloat16", "with bfloat16 compute")],
)
def test_float16_storage_refuses_16_bit_compute(write_profile: Any, dtype: str, said: str) -> None:
    profile = storage_profile(write_profile, f"config: {{dtype: {dtype}}}", gpu="8.6")
    with pytest.raises(GemmaProfileError) as caught:
        make_plan(profile, "2b")
    assert said in caught.value.message and "float32" in (caught.value.hint or "")
    assert str(caught.value.where).endswith(":5")  # the dtype line


def test_float16_storage_with_float16_compute_is_one_cli_line(write_profile: Any, tmp_path: Any) -> None:
    storage_profile(write_profile, "config: {dtype: float16}")
    result = invoke("plan", str(tmp_path / "f16.yaml"), "--variant", "2b")
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "float16 storage with float16 compute" in lines[0], result.output


def test_float16_storage_memory(write_profile: Any) -> None:
    shape = ModelShape.of_variant("4b")
    stored = estimate_memory(shape, dtype="float32", int8=False, device="cuda:0", weight_storage="float16")
    plain = estimate_memory(shape, dtype="float32", int8=False, device="cuda:0")
    rows = {item.component: item for item in stored.items}
    plain_rows = {item.component: item for item in plain.items}
    assert rows["embedder (tied output)"].bytes == shape.embedding_weights * 2
    assert (
        rows[f"decoder layers x{shape.num_hidden_layers}"].bytes * 2
        == plain_rows[f"decoder layers x{shape.num_hidden_layers}"].bytes
    )
    scratch = rows["float32 scratch buffer"]
    expected = max(shape.largest_linear_weights, SAMPLER_CHUNK_ROWS * shape.hidden_size) * DTYPE_BYTES["float32"]
    assert scratch.bytes == expected
    # KV cache and activations stay float32
    assert rows["KV cache"].bytes == plain_rows["KV cache"].bytes
    assert stored.required["cuda:0"] < plain.required["cuda:0"] * 0.6


@pytest.mark.parametrize(
    ("name", "variant"), [("t4", "4b"), ("v100-16gb", "4b"), ("pascal-5gb", "1b"), ("pascal-5gb", "2b-v2")]
)
def test_pre_ampere_profiles_store_gemma_2_and_3_in_float16_where_it_fits(name: str, variant: str) -> None:
    # Before: int8 (t4/v100 4b, pascal 1b), or no fit at all (pascal 2b-v2).
    plan = plan_of(name, variant)
    assert plan.weight_storage == "float16" and plan.dtype == "float32"
    assert plan.verdict is not None and plan.verdict.fits, plan.verdict


def test_float16_storage_is_the_cheapest_change_for_float32_on_an_older_gpu(write_profile: Any) -> None:
    # float32's answers at half the memory come before int8's, which loses some
    from gemma_profiles.spec.profile import load_profile

    path = write_profile(
        "t4-f32",
        """
        description: x
        hardware: {device: cuda, compute_capability: "7.5", memory: 15GiB, host_memory: 12GiB}
        placement: {device: cuda}
        config: {dtype: float32}
        quantization: {weights: none}
        """,
    )
    plan = make_plan(load_profile(path), "4b")
    assert plan.verdict is not None and not plan.verdict.fits
    assert plan.verdict.suggestion == "float16 storage, float32 compute (quantization: {weights: float16})"


def test_the_offload_step_reads_the_planned_embedder_placement(
    gemma: Any, tokenizer_path: str, write_profile: Any
) -> None:
    """What hooks/offload.py decides for a model planned with the embedder on the CPU (no GPU needed:
    the layout is decided before anything moves)."""
    import dataclasses

    import torch
    from gemma_profiles.hooks import offload
    from gemma_testing import tiny_config

    from gemma_profiles.spec.profile import load_profile

    config = tiny_config(gemma.config, "2b", tokenizer_path, dtype="float32")
    config.vocab_size = 256000  # a real Gemma's vocabulary on a tiny model: the embedder dominates
    with torch.device("meta"):
        model = gemma.model.GemmaForCausalLM(config)
    shape = dataclasses.replace(ModelShape.of_config(config), max_position_embeddings=1024)
    config.max_position_embeddings = 1024

    def need(embedder_device: str | None) -> int:
        estimate = estimate_memory(
            shape,
            dtype="float32",
            int8=False,
            device="cuda:0",
            seq_len=1024,
            offloaded_layers=shape.num_hidden_layers,
            embedder_device=embedder_device,
        )
        return estimate.required["cuda:0"]

    on_gpu, on_cpu = need(None), need("cpu")
    assert on_cpu < on_gpu
    path = write_profile(
        "tiny-gpu",
        f"""
        description: x
        hardware: {{device: cuda, compute_capability: "6.1", memory: 5GiB, host_memory: 16GiB}}
        placement: {{device: cuda, offload: cpu, max_memory: {{"cuda:0": {(on_cpu + on_gpu) // 2}, cpu: 8GiB}}}}
        config: {{dtype: float32}}
        generation: {{seq_len: 1024}}
        """,
    )
    plan = make_plan(load_profile(path), "2b", shape=shape)
    assert plan.verdict is not None and plan.verdict.fits, plan.verdict
    assert plan.embedder is not None and plan.embedder.value == "cpu"
    layout = offload.decide_layout(model, plan, "cuda:0")
    assert layout.embedder == "cpu"
    # the layers the planner keeps off the GPU (here none: with the embedder gone both fit)
    assert layout.offloaded == {i: d for i, d in _expand(plan.layers).items() if d == "cpu"}
    assert plan.layers == {"0-1": "cuda:0"}
