"""Hardware facts (faked), dtype rules, the memory estimator, the planner, preflight, detect/plan CLI."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from click.testing import CliRunner

import gemma_profiles
from gemma_profiles.cli.main import cli
from gemma_profiles.errors import GemmaProfileError
from gemma_profiles.planning.auto import auto_profile, best_match
from gemma_profiles.planning.hardware import CpuInfo, GpuInfo, Hardware
from gemma_profiles.planning.memory import ModelShape, estimate_memory
from gemma_profiles.planning.plan import Target, make_plan
from gemma_profiles.spec.registry import default_registry

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
    from gemma_profiles.settings import DEQUANTIZE_ROWS

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


# -- dtype rules at their edges ----------------------------------------------------------------

#: compute capability -> (auto dtype for Gemma 1 2b, auto dtype for Gemma 2/3 and 7b, explicit bfloat16 accepted)
EDGES = {
    (6, 1): ("float16", "float32", False),
    (7, 0): ("float16", "float32", False),
    (7, 5): ("float16", "float32", False),
    (8, 0): ("bfloat16", "bfloat16", True),
    (8, 6): ("bfloat16", "bfloat16", True),
}
EDGE_VARIANTS = ("2b", "7b", "9b", "2b-v2", "1b", "27b_v3")


def gpu_machine(cc: tuple[int, int]) -> Hardware:
    return machine((f"GPU cc {cc[0]}.{cc[1]}", cc, 80), 256)


@pytest.mark.parametrize("cc", EDGES, ids=lambda cc: f"cc{cc[0]}.{cc[1]}")
@pytest.mark.parametrize("variant", EDGE_VARIANTS)
def test_auto_dtype_at_each_compute_capability(cc: tuple[int, int], variant: str) -> None:
    hardware = gpu_machine(cc)
    plan = make_plan(auto_profile(hardware), variant, target=Target.of_hardware(hardware))
    safe16, unsafe16, _ = EDGES[cc]
    assert plan.dtype == (safe16 if variant == "2b" else unsafe16), plan.config["dtype"]


def cuda_profile(write_profile: Any, cc: tuple[int, int], dtype: str, extra: str = "") -> Any:
    path = write_profile(
        f"cc{cc[0]}{cc[1]}-{dtype}",
        f"description: x\nhardware: {{device: cuda, gpu: [Test GPU], compute_capability: '{cc[0]}.{cc[1]}', "
        f"memory: 80GiB, host_memory: 256GiB}}\nplacement: {{device: cuda}}\nconfig: {{dtype: {dtype}}}\n{extra}",
    )
    return path, gemma_profiles.load_profile(str(path))


@pytest.mark.parametrize("cc", EDGES, ids=lambda cc: f"cc{cc[0]}.{cc[1]}")
@pytest.mark.parametrize("variant", EDGE_VARIANTS)
def test_explicit_bfloat16_at_each_compute_capability(write_profile: Any, cc: tuple[int, int], variant: str) -> None:
    _, profile = cuda_profile(write_profile, cc, "bfloat16")
    if EDGES[cc][2]:
        assert make_plan(profile, variant).dtype == "bfloat16"
        return
    with pytest.raises(GemmaProfileError, match=rf"Test GPU \(compute capability {cc[0]}\.{cc[1]}\) has no native bf"):
        make_plan(profile, variant)


@pytest.mark.parametrize("cc", EDGES, ids=lambda cc: f"cc{cc[0]}.{cc[1]}")
@pytest.mark.parametrize("variant", EDGE_VARIANTS)
def test_explicit_float16_at_each_compute_capability(write_profile: Any, cc: tuple[int, int], variant: str) -> None:
    path, profile = cuda_profile(write_profile, cc, "float16")
    if variant == "2b":
        assert make_plan(profile, variant).dtype == "float16"
        return
    with pytest.raises(GemmaProfileError, match="float16 compute overflows") as caught:
        make_plan(profile, variant)
    message = str(caught.value)
    assert f"{path}:4:" in message
    if EDGES[cc][2]:
        assert "bfloat16 (native on this GPU) or float32" in message
    else:
        assert "float32, or int8 weights with float32 compute" in message
        assert f"(this GPU: {cc[0]}.{cc[1]})" in message
    _, allowed = cuda_profile(write_profile, cc, "float16", "compute: {allow_float16_overflow: true}\n")
    plan = make_plan(allowed, variant)
    assert plan.dtype == "float16" and plan.warnings


@pytest.mark.parametrize("cc", EDGES, ids=lambda cc: f"cc{cc[0]}.{cc[1]}")
@pytest.mark.parametrize("variant", EDGE_VARIANTS)
def test_explicit_float32_is_accepted_everywhere(write_profile: Any, cc: tuple[int, int], variant: str) -> None:
    _, profile = cuda_profile(write_profile, cc, "float32")
    plan = make_plan(profile, variant)
    assert plan.dtype == "float32" and plan.warnings == ()


@pytest.mark.parametrize("name", ["pascal-5gb", "gtx1060-6gb", "t4", "v100-16gb"])
@pytest.mark.parametrize("variant", ["2b-v2", "9b", "27b", "1b", "4b", "12b", "27b_v3", "7b"])
def test_old_gpu_profiles_never_compute_gemma2_or_3_in_float16(name: str, variant: str) -> None:
    plan = make_plan(default_registry().load(name), variant)
    assert plan.dtype == "float32", plan.config["dtype"]
    # float16 *storage* is fine: every layer still computes in float32
    assert plan.quantization in ("none", "int8", "float16") and not plan.warnings
    assert plan.weight_storage == ("float16" if plan.quantization == "float16" else None)


def test_every_bundled_profile_passes_the_planner_checks() -> None:
    from gemma_profiles.planning.plan import plan_problems

    registry = default_registry()
    for name in registry.names():
        assert plan_problems(registry.load(name)) == [], name


# -- the model gemma will build: the profile's config overrides ------------------------------------


def cpu_box(write_profile: Any, name: str, config: str, ram: str = "8GiB") -> Any:
    path = write_profile(
        name,
        f"description: x\nhardware: {{device: cpu, host_memory: {ram}}}\nplacement: {{device: cpu}}\n"
        f"config:\n  dtype: bfloat16\n{config}",
    )
    return path, gemma_profiles.load_profile(str(path))


def test_plan_sizes_the_model_with_the_profiles_layer_count(write_profile: Any) -> None:
    path, profile = cpu_box(write_profile, "deep", "  num_hidden_layers: 200\n")
    plan = make_plan(profile, "2b")
    assert plan.memory is not None and plan.verdict is not None
    rows = {item.component: item for item in plan.memory.items}
    assert "decoder layers x200" in rows
    assert not plan.verdict.fits
    assert f"num_hidden_layers: 200 ({path}:6)" in plan.verdict.message
    assert plan.verdict.suggestion == f"2b's own sizes: drop the profile's num_hidden_layers: 200 ({path}:6)"
    _, plain = cpu_box(write_profile, "plain", "")
    assert make_plan(plain, "2b").verdict.fits  # type: ignore[union-attr]


def test_plan_sizes_rope_tables_and_context_with_the_profiles_positions(write_profile: Any) -> None:
    _, profile = cpu_box(write_profile, "long", "  max_position_embeddings: 1048576\n", ram="64GiB")
    plan = make_plan(profile, "2b", seq_len=200_000)
    assert plan.memory is not None and plan.seq_len == 200_000  # past 2b's own 8192 positions
    rope = next(item for item in plan.memory.items if item.component == "rope tables")
    assert rope.bytes == 2 * 1048576 * 128 * 8
    assert plan.verdict is not None and not plan.verdict.fits  # 200 000^2 float32 masks


def test_plan_uses_the_family_of_an_architecture_override(write_profile: Any) -> None:
    _, profile = cpu_box(write_profile, "arch3", "  architecture: GEMMA_3\n")
    plan = make_plan(profile, "2b")
    assert plan.family == "gemma3"
    assert plan.memory is not None
    rope = next(item for item in plan.memory.items if item.component == "rope tables")
    assert rope.note.startswith("2 x complex64")  # Gemma 3 has a local and a global table


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (
            "  num_key_value_heads: 3\n",
            "config.num_attention_heads 8 is not a multiple of config.num_key_value_heads 3",
        ),
        ("  hidden_size: 2050\n", "config.hidden_size 2050 is not a multiple of config.num_attention_heads 8"),
    ],
)
def test_plan_refuses_a_shape_gemma_would_assert_on(write_profile: Any, config: str, needle: str) -> None:
    path, profile = cpu_box(write_profile, "odd", config)
    with pytest.raises(GemmaProfileError) as caught:
        make_plan(profile, "2b")
    assert str(caught.value).startswith(f"{path}:6: {needle} for 2b"), caught.value


def test_plan_refuses_a_model_no_process_can_address(write_profile: Any) -> None:
    sizes = "  num_hidden_layers: 1024\n  hidden_size: 65536\n  intermediate_size: 524288\n"
    path, profile = cpu_box(write_profile, "huge", sizes)
    with pytest.raises(GemmaProfileError, match=r"more than a process can address \(128\.00 TiB\)") as caught:
        make_plan(profile, "2b")
    message = str(caught.value)
    # the field furthest past the variant's own value (1024 / 18 layers) is blamed; all are listed
    assert message.startswith(f"{path}:6: 2b with config.num_hidden_layers: 1,024 needs 192.59 TiB "), message
    assert f"intermediate_size: 524,288 ({path}:8)" in message


def test_preflight_sees_the_profiles_config_before_gemma_allocates(
    gemma: Any, tokenizer_path: str, write_profile: Any, fake_hardware: Any
) -> None:
    """Construction stops in the preflight, naming the field, before gemma builds a single layer."""
    from gemma_testing import tiny_config

    from gemma_profiles.runtime import session

    fake_hardware(machine(None, 4))
    config = tiny_config(gemma.config, "2b", tokenizer_path, dtype="float32")
    path = write_profile(
        "grown",
        "description: x\nplacement: {device: cpu}\nconfig:\n  dtype: float32\n"
        "  num_hidden_layers: 1000\n  intermediate_size: 300000\n",
    )
    plan = session.Session(str(path)).plan_for(config)
    assert plan.memory is not None and plan.verdict is not None and not plan.verdict.fits
    assert "decoder layers x1000" in {item.component for item in plan.memory.items}
    with gemma_profiles.use(str(path)), pytest.raises(GemmaProfileError) as caught:
        gemma.model.GemmaForCausalLM(config)
    message = str(caught.value)
    assert "Gemma 1 under profile 'grown' does not fit" in message  # a shape no variant has: named by family
    assert f"num_hidden_layers: 1,000 ({path}:5)" in message
    assert f"intermediate_size: 300,000 ({path}:6)" in message


# -- validate runs the planner's checks -----------------------------------------------------------


def test_validate_refuses_what_plan_refuses(write_profile: Any) -> None:
    runner = CliRunner()
    bf16, _ = cuda_profile(write_profile, (7, 5), "bfloat16")
    result = runner.invoke(cli, ["validate", str(bf16)])
    assert result.exit_code == 1
    assert f"{bf16}:4: Test GPU (compute capability 7.5) has no native bfloat16" in result.stderr
    f16, _ = cuda_profile(write_profile, (8, 0), "float16")
    result = runner.invoke(cli, ["validate", str(f16), "--json"])
    assert result.exit_code == 1
    problems = json.loads(result.stdout)[0]["problems"]
    assert [p["where"] for p in problems] == [f"{f16}:4", f"{f16}:4"], problems  # Gemma 1 7b, then Gemma 2/3
    assert "overflows for Gemma 1 7b" in problems[0]["message"]
    assert "overflows for Gemma 2" in problems[1]["message"] and "[also for 9b, 27b, 1b," in problems[1]["message"]
    fixed = write_profile(
        "fixed",
        f16.read_text() + "variants:\n  gemma2: {config: {dtype: bfloat16}}\n  gemma3: {config: {dtype: bfloat16}}\n"
        "  7b: {config: {dtype: float32}}\n",
    )
    assert runner.invoke(cli, ["validate", str(fixed)]).exit_code == 0


def test_validate_passes_every_bundled_profile() -> None:
    from gemma_profiles.hooks.sources import bundled_dir

    result = CliRunner().invoke(cli, ["validate", str(bundled_dir())])
    assert result.exit_code == 0, result.output


def test_validate_refuses_a_profile_that_fits_no_variant_on_its_own_hardware(write_profile: Any) -> None:
    path, _ = cpu_box(write_profile, "layers-900", "  num_hidden_layers: 900\n")
    result = CliRunner().invoke(cli, ["validate", str(path), "--json"])
    assert result.exit_code == 1
    [problem] = json.loads(result.stdout)[0]["problems"]
    assert problem["where"] == f"{path}:2"  # the hardware: line
    assert problem["message"].startswith("fits no gemma variant on its own hardware; the closest, 1b, does not fit")
    assert f"num_hidden_layers: 900 ({path}:6)" in problem["message"]
    fitting, _ = cpu_box(write_profile, "layers-30", "  num_hidden_layers: 30\n")
    assert CliRunner().invoke(cli, ["validate", str(fitting)]).exit_code == 0


def test_validate_refuses_an_absolute_tokenizer_path_that_is_no_file_here(write_profile: Any, tmp_path: Any) -> None:
    runner = CliRunner()
    missing, _ = cpu_box(write_profile, "tok-missing", f"  tokenizer: {tmp_path}/nowhere/tokenizer.model\n")
    result = runner.invoke(cli, ["validate", str(missing)])
    assert result.exit_code == 1
    assert (
        f"{missing}:6: config.tokenizer: no file '{tmp_path}/nowhere/tokenizer.model' on this machine" in result.stderr
    )
    folder, _ = cpu_box(write_profile, "tok-folder", f"  tokenizer: {tmp_path}\n")
    assert runner.invoke(cli, ["validate", str(folder)]).exit_code == 1
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    present, _ = cpu_box(write_profile, "tok-present", f"  tokenizer: {tmp_path}/tokenizer.model\n")
    relative, _ = cpu_box(write_profile, "tok-relative", "  tokenizer: tokenizer/tokenizer.model\n")
    assert runner.invoke(cli, ["validate", str(present), str(relative)]).exit_code == 0
