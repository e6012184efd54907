"""Hardware facts (faked), dtype rules, the memory estimator, the planner, preflight, detect/plan CLI."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from click.testing import CliRunner

import gemma_profiles
from gemma_profiles.auto import auto_profile, best_match
from gemma_profiles.cli import cli
from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.hardware import CpuInfo, GpuInfo, Hardware
from gemma_profiles.memory import ModelShape, estimate_memory
from gemma_profiles.plan import Target, make_plan
from gemma_profiles.registry import default_registry

GiB = 2**30
AVX2 = ("avx2",)


def machine(gpu: tuple[str, tuple[int, int], float] | None = None, ram_gib: float = 32) -> Hardware:
    cpu = CpuInfo(8, int(ram_gib * GiB), int(ram_gib * GiB * 0.9), AVX2, "Test CPU")
    gpus = () if gpu is None else (GpuInfo(0, gpu[0], gpu[1], int(gpu[2] * GiB), int(gpu[2] * GiB)),)
    return Hardware(cpu, gpus, False, "2.13.0", "12.4" if gpus else None)


MACHINES = {
    "p2200": machine(("Quadro P2200", (6, 1), 5), 16),
    "t4": machine(("Tesla T4", (7, 5), 15), 12),
    "v100": machine(("Tesla V100-PCIE-16GB", (7, 0), 16), 32),
    "a100": machine(("NVIDIA A100-SXM4-40GB", (8, 0), 40), 64),
    "cpu32": machine(None, 31.3),
    "cpu8": machine(None, 7.7),
}
VARIANTS = ("2b", "7b", "2b-v2", "9b", "1b")
FLOAT16_UNSAFE = {"7b", "2b-v2", "9b", "1b"}


@pytest.mark.parametrize("name", MACHINES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_auto_dtype_rules(name: str, variant: str) -> None:
    hardware = MACHINES[name]
    plan = make_plan(auto_profile(hardware), variant, target=Target.of_hardware(hardware))
    gpu = hardware.gpus[0] if hardware.gpus else None
    if gpu is not None and gpu.compute_capability < (8, 0):
        assert plan.dtype != "bfloat16"
    if gpu is not None and gpu.compute_capability >= (8, 0):
        assert plan.dtype == "bfloat16"
    if gpu is None:
        assert plan.dtype == "bfloat16", "CPU: bf16 measured 2.3x faster than float32"
    if variant in FLOAT16_UNSAFE:
        assert plan.dtype != "float16"
    assert plan.config["dtype"].origin.startswith("auto: ")
    assert plan.verdict is not None and plan.memory is not None


def test_pascal_gets_float16_for_gemma1_2b_and_int8_because_float16_does_not_fit() -> None:
    hardware = MACHINES["p2200"]
    plan = make_plan(auto_profile(hardware), "2b", target=Target.of_hardware(hardware))
    assert plan.dtype == "float16"
    assert plan.quantization == "int8" and plan.config["quant"].origin.startswith("auto: the weights do not fit")
    assert plan.verdict is not None and plan.verdict.fits


def test_explicit_bfloat16_on_old_gpu_fails_with_gpu_name(write_profile: Any) -> None:
    path = write_profile("bf16", "description: x\nplacement: {device: cuda}\nconfig: {dtype: bfloat16}\n")
    profile = gemma_profiles.load_profile(str(path))
    with pytest.raises(GemmaProfileError, match=r"Quadro P2200 \(compute capability 6\.1\).*float16") as info:
        make_plan(profile, "2b", target=Target.of_hardware(MACHINES["p2200"]))
    assert "bf16.yaml:3" in str(info.value)


def test_explicit_values_win_over_automatic(write_profile: Any) -> None:
    path = write_profile("f32", "description: x\nplacement: {device: cuda}\nconfig: {dtype: float32}\n")
    plan = make_plan(gemma_profiles.load_profile(str(path)), "2b", target=Target.of_hardware(MACHINES["a100"]))
    assert plan.dtype == "float32"


def test_bundled_plans_from_the_issue() -> None:
    registry = default_registry()
    pascal = make_plan(registry.load("pascal-5gb"), "2b")
    assert pascal.verdict is not None and pascal.verdict.fits
    cuda = next(b for b in pascal.budgets if b.device == "cuda:0")
    assert pascal.quantization == "int8" and cuda.available <= 5 * GiB
    assert make_plan(registry.load("t4"), "9b").dtype != "float16"
    assert make_plan(registry.load("cpu-32gb"), "7b").dtype != "float32"


def test_not_fitting_reports_shortfall_and_cheapest_change() -> None:
    plan = make_plan(default_registry().load("cpu-16gb"), "9b", seq_len=1024)
    assert plan.verdict is not None and plan.verdict.fits  # int8 from the profile
    hardware = machine(("Tesla T4", (7, 5), 15), 12)
    big = make_plan(auto_profile(hardware), "27b", target=Target.of_hardware(hardware))
    assert big.verdict is not None and not big.verdict.fits
    assert big.verdict.shortfall > 0 and "short by" in big.verdict.message
    assert big.verdict.suggestion and (
        "offload" in big.verdict.suggestion or "smaller variant" in big.verdict.suggestion
    )


def test_memory_estimator_matches_design_figures() -> None:
    assert ModelShape.of_variant("2b").parameters == pytest.approx(2.51e9, rel=0.01)
    assert ModelShape.of_variant("7b").parameters == pytest.approx(8.54e9, rel=0.01)
    assert ModelShape.of_variant("9b").parameters == pytest.approx(9.24e9, rel=0.01)
    shape = ModelShape.of_variant("2b")
    assert shape.weight_bytes("bfloat16", False) == pytest.approx(5.01e9, rel=0.01), "a 2b bf16 checkpoint is 5.01 GB"
    assert shape.weight_bytes("float32", True) < shape.weight_bytes("float32", False) / 3
    twelve = estimate_memory(ModelShape.of_variant("12b"), dtype="bfloat16", int8=False, seq_len=512)
    rope = next(i for i in twelve.items if i.component == "rope tables")
    assert rope.bytes == pytest.approx(0.54e9, rel=0.02), "Gemma 3 with 131072 positions: ~0.5 GB of rope tables"
    kv = next(
        i
        for i in estimate_memory(shape, dtype="float16", int8=False, seq_len=100, batch=2).items
        if i.component == "KV cache"
    )
    assert kv.bytes == 18 * 2 * 100 * 1 * 256 * 2 * 2


def test_gemma_loader_peak_is_twice_the_checkpoint_on_cpu() -> None:
    estimate = estimate_memory(ModelShape.of_variant("2b"), dtype="bfloat16", int8=False, seq_len=64, engine="gemma")
    weights = ModelShape.of_variant("2b").weight_bytes("bfloat16", False)
    assert estimate.peak["cpu"] == pytest.approx(2.0 * weights, rel=0.02)
    assert estimate.required["cpu"] < 1.1 * weights
    lean = estimate_memory(ModelShape.of_variant("2b"), dtype="bfloat16", int8=False, seq_len=64)
    assert lean.peak["cpu"] == pytest.approx(weights, rel=0.03), "the lean loader assigns the mapped tensors"


def test_profiles_int8_keeps_the_embedder_and_drops_the_workspace() -> None:
    shape = ModelShape.of_variant("2b")
    gemma_int8 = estimate_memory(shape, dtype="bfloat16", int8=True, seq_len=64, engine="gemma")
    ours = estimate_memory(shape, dtype="bfloat16", int8=True, seq_len=64)
    assert any(i.component == "dequantization workspace" for i in gemma_int8.items)
    assert not any("workspace" in i.component or "scratch" in i.component for i in ours.items)
    assert ours.required["cpu"] < gemma_int8.required["cpu"] - 1.4 * 2**30


def test_a_long_prompt_on_the_native_int8_kernel_counts_one_dequantized_weight() -> None:
    from gemma_profiles.hardware import DEQUANTIZE_ROWS

    shape = ModelShape.of_variant("2b")

    def workspace(prompt: int, native: bool) -> int:
        estimate = estimate_memory(
            shape, dtype="bfloat16", int8=True, seq_len=2048, prefill_tokens=prompt, cpu_int8_kernel=native
        )
        return sum(i.bytes for i in estimate.items if i.component == "int8 prompt workspace")

    assert workspace(DEQUANTIZE_ROWS - 1, True) == 0
    assert workspace(DEQUANTIZE_ROWS, True) == shape.intermediate_size * shape.hidden_size * 2  # gate/up, bf16
    assert workspace(1000, False) == 0, "torch's int8 kernel never dequantizes"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("p2200", "pascal-5gb"),
        ("t4", "t4"),
        ("v100", "v100-16gb"),
        ("a100", "a100-40gb"),
        ("cpu32", "cpu-32gb"),
        ("cpu8", "cpu-8gb"),
    ],
)
def test_best_match(name: str, expected: str) -> None:
    match = best_match(MACHINES[name], default_registry())
    assert match is not None and match.name == expected, match


def test_detect_and_plan_cli(fake_hardware: Any) -> None:
    fake_hardware(MACHINES["t4"])
    runner = CliRunner()
    detected = runner.invoke(cli, ["detect", "--json"])
    assert detected.exit_code == 0, detected.output
    data = json.loads(detected.stdout)
    assert data["best_profile"]["name"] == "t4"
    assert data["hardware"]["gpus"][0]["compute_capability"] == [7, 5]
    fits = runner.invoke(cli, ["plan", "pascal-5gb", "--variant", "2b", "--json"])
    assert fits.exit_code == 0, fits.output
    plan = json.loads(fits.stdout)
    assert plan["verdict"]["fits"] and plan["quantization"] == "int8"
    too_big = runner.invoke(cli, ["plan", "cpu-8gb", "--variant", "9b"])
    assert too_big.exit_code == 1
    assert "does not fit" in too_big.stdout and "short by" in too_big.stdout
    auto = runner.invoke(cli, ["plan", "auto", "--variant", "9b", "--json"])
    assert json.loads(auto.stdout)["dtype"] == "float32", "T4: no bf16, and Gemma 2 overflows in float16"
    assert "transparent huge pages" not in runner.invoke(cli, ["detect"]).stdout  # unknown: not shown
    cpu = dataclasses.replace(MACHINES["cpu8"].cpu, huge_pages="never")
    fake_hardware(dataclasses.replace(MACHINES["cpu8"], cpu=cpu))
    assert "; transparent huge pages: never" in runner.invoke(cli, ["detect"]).stdout
    assert json.loads(runner.invoke(cli, ["detect", "--json"]).stdout)["hardware"]["cpu"]["huge_pages"] == "never"


def test_preflight_stops_construction_before_weights(
    gemma: Any, tokenizer_path: str, write_profile: Any, fake_hardware: Any
) -> None:
    from gemma_testing import tiny_config

    fake_hardware(machine(None, 0.0001))  # ~100 KiB of RAM
    path = write_profile("tiny-ram", "description: x\nplacement: {device: cpu}\nconfig: {dtype: float32}\n")
    with gemma_profiles.use(str(path)), pytest.raises(GemmaProfileError, match=r"does not fit: cpu needs .* short by"):
        gemma.model.GemmaForCausalLM(tiny_config(gemma.config, "2b", tokenizer_path))


def test_gemma_profile_auto_builds_from_detected_hardware(gemma: Any, tokenizer_path: str, fake_hardware: Any) -> None:
    import torch
    from gemma_testing import tiny_config

    fake_hardware(MACHINES["cpu32"])
    with gemma_profiles.use("auto"):
        model = gemma.model.GemmaForCausalLM(tiny_config(gemma.config, "2b", tokenizer_path, dtype="float32"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
