"""Lean loading, on-the-fly int8 and the int8 kernels (issue 5), against real gemma or the stand-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from gemma_testing import build_tiny_model, cpu_profile

import gemma_profiles
from gemma_profiles.errors import GemmaProfileError

HERE = Path(__file__).parent


def logits(model: Any, tokens: list[int]) -> torch.Tensor:
    """One forward over ``tokens`` through gemma's own forward; the last position's logits."""
    config = model.config
    device = next(model.parameters()).device
    n = len(tokens)
    size = (1, n, config.num_key_value_heads, config.head_dim)
    caches = [
        (torch.zeros(size, dtype=config.get_dtype()), torch.zeros(size, dtype=config.get_dtype()))
        for _ in range(config.num_hidden_layers)
    ]
    mask = torch.triu(torch.full((1, 1, n, n), -2.3819763e38), diagonal=1)
    _, out = model(
        input_token_ids=torch.tensor([tokens], device=device),
        input_positions=torch.arange(n, device=device),
        kv_write_indices=None,
        kv_caches=caches,
        mask=mask,
        output_positions=torch.tensor([n - 1], device=device),
        temperatures=None,
        top_ps=torch.tensor([1.0]),
        top_ks=torch.tensor([1]),
        local_mask=mask if config.sliding_window_size else None,
    )
    return out.float().reshape(-1)


@pytest.fixture
def profile(write_profile: Callable[..., Path]) -> Callable[..., str]:
    return lambda dtype, weights="none": cpu_profile(write_profile, dtype, weights)


@pytest.fixture
def float_ckpt(gemma: Any, tokenizer_path: str, tmp_path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    from gemma_testing import write_random_checkpoint

    path = tmp_path / "float.ckpt"
    state = write_random_checkpoint(build_tiny_model(gemma, tokenizer_path), path, torch.float32, seed=3)
    return str(path), state


TOKENS = [2, 17, 33, 5, 60, 12]


@pytest.mark.parametrize("kernels", [False, True], ids=["gemma-forwards", "cpu-kernels"])
def test_lean_loader_equals_gemma_loader(
    gemma: Any, tokenizer_path: str, float_ckpt: Any, profile: Any, kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gemma_profiles.engine.kernels import is_packed

    if not kernels:
        monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "kernels,fused")
    path, _ = float_ckpt
    reference = build_tiny_model(gemma, tokenizer_path)
    reference.load_weights(path)
    with gemma_profiles.use(profile("float32")):
        lean = build_tiny_model(gemma, tokenizer_path)
        assert all(p.is_meta for name, p in lean.named_parameters() if name.endswith("proj.weight"))
        lean.load_weights(path)
        assert not any(p.is_meta for p in lean.parameters())
        assert any(is_packed(m) for m in lean.modules()) is kernels
        for (name, a), (_, b) in zip(reference.state_dict().items(), lean.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
        if kernels:  # the same products and layers, summed in another order
            torch.testing.assert_close(logits(lean, TOKENS), logits(reference, TOKENS), rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(logits(reference, TOKENS), logits(lean, TOKENS))
        expected = reference.generate("the cat sees", "cpu", output_len=5, temperature=None)
        assert lean.generate("the cat sees", "cpu", output_len=5, temperature=None) == expected


def test_sharded_and_safetensors_checkpoints(
    gemma: Any, tokenizer_path: str, float_ckpt: Any, profile: Any, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    _, state = float_ckpt
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, sharded / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    single = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(single))
    with gemma_profiles.use(profile("float32")):
        for source in (sharded, single):
            model = build_tiny_model(gemma, tokenizer_path)
            model.load_weights(str(source))
            for name, tensor in state.items():
                assert torch.equal(model.state_dict()[name], tensor), (source, name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_on_the_fly_int8_stays_close(
    gemma: Any, tokenizer_path: str, float_ckpt: Any, profile: Any, dtype: str, int8_kernel: str
) -> None:
    path, _ = float_ckpt
    with gemma_profiles.use(profile(dtype)):
        dense = build_tiny_model(gemma, tokenizer_path)
        dense.load_weights(path)
        expected = logits(dense, TOKENS)
    with gemma_profiles.use(profile(dtype, "int8")):
        model = build_tiny_model(gemma, tokenizer_path)
        model.load_weights(path)
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert qkv.weight.dtype == torch.int8 and qkv.weight_scaler.dtype == getattr(torch, dtype)
        assert type(qkv).forward is not gemma.model.Linear.forward, "the int8 kernel replaced gemma's forward"
        assert model.config.quant is False, "gemma's forward no longer rebuilds the embedder every step"
        embedder = model.embedder
        state = embedder.state_dict()
        if int8_kernel == "native" or dtype == "bfloat16":
            # kept int8, with row and column scales: lookups gather rows, the sampler reads int8
            # (test_kernels.py); state_dict() gives gemma's per-row format, rounded once more
            from gemma_profiles.engine.quantization import column_scaler, native_weights

            ids = torch.tensor([TOKENS])
            columns = column_scaler(embedder)
            packed = native_weights(embedder)
            q = packed[0].unpack() if packed else embedder.weight
            assert columns is not None and columns.shape == (q.shape[1],) and float(columns.max()) == 1.0
            exact = q.float() * embedder.weight_scaler.float().unsqueeze(-1) * columns
            ours = torch.nn.functional.embedding(ids, exact.to(getattr(torch, dtype)))
            assert torch.equal(embedder(ids), ours), "rows x row scales x column scales, rounded once"
            assert state["weight"].dtype == torch.int8 and set(state) == {"weight", "weight_scaler"}
            gemmas = state["weight"].float() * state["weight_scaler"].float().unsqueeze(-1)
            step = state["weight_scaler"].float().unsqueeze(-1)  # half a step, plus the scaler's own rounding
            assert bool(((gemmas - exact).abs() <= step).all()), "gemma's per-row format of the same weights"
        else:
            assert embedder.weight.dtype == torch.float32  # dequantized once
        got = logits(model, TOKENS)
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=0).item()
    assert cosine >= 0.99, cosine


def test_without_the_quantization_builtin_the_embedder_keeps_gemmas_per_row_format(
    gemma: Any, tokenizer_path: str, float_ckpt: Any, profile: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Column scales need the ``quantization`` builtin's lookup and sampler; while it is blocked,
    gemma's own int8 forward computes, and it only knows per-row scales."""
    from gemma_profiles.engine.loading import dequantize_rows, quantize_rows
    from gemma_profiles.engine.quantization import column_scaler

    path, state = float_ckpt
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "quantization")
    with gemma_profiles.use(profile("float32", "int8")):
        model = build_tiny_model(gemma, tokenizer_path)
        model.load_weights(path)
        assert column_scaler(model.embedder) is None and model.config.quant is True
        q, scaler = quantize_rows(state["embedder.weight"], torch.float32)
        assert torch.equal(model.embedder.weight, q) and torch.equal(model.embedder.weight_scaler, scaler)
        got = logits(model, TOKENS)
    monkeypatch.delenv("GEMMA_PROFILE_DISABLE_PLUGINS")
    with gemma_profiles.use(profile("float32")):
        dense = build_tiny_model(gemma, tokenizer_path)
        dense.load_weights(path)
        expected = logits(dense, TOKENS)
    assert torch.nn.functional.cosine_similarity(got, expected, dim=0).item() >= 0.99
    assert dequantize_rows(q, scaler, torch.float32).shape == state["embedder.weight"].shape


def test_official_int8_checkpoint_loads_into_int8_and_float_models(
    gemma: Any, tokenizer_path: str, profile: Any, tmp_path: Path, int8_kernel: str
) -> None:
    from gemma_testing import write_random_checkpoint

    int8_model = build_tiny_model(gemma, tokenizer_path, quant=True)  # gemma as-is: its own int8 layout
    path = tmp_path / "quant.ckpt"
    write_random_checkpoint(int8_model, path, torch.float32, seed=5)
    int8_model.load_weights(str(path))
    expected = logits(int8_model, TOKENS)
    with gemma_profiles.use(profile("float32", "int8")):
        model = build_tiny_model(gemma, tokenizer_path)
        model.load_weights(str(path))
        assert torch.allclose(logits(model, TOKENS), expected, rtol=1e-4, atol=1e-4)
    with gemma_profiles.use(profile("float32")):
        dense = build_tiny_model(gemma, tokenizer_path)
        dense.load_weights(str(path))  # dequantized while loading
        assert dense.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
        assert torch.allclose(logits(dense, TOKENS), expected, rtol=1e-4, atol=1e-4)


def test_missing_tensor_is_named(
    gemma: Any, tokenizer_path: str, float_ckpt: Any, profile: Any, tmp_path: Path
) -> None:
    _, state = float_ckpt
    partial = {k: v for k, v in state.items() if "layers.1.mlp" not in k}
    path = tmp_path / "partial.ckpt"
    torch.save({"model_state_dict": partial}, path)
    with gemma_profiles.use(profile("float32")):
        model = build_tiny_model(gemma, tokenizer_path)
        with pytest.raises(GemmaProfileError, match=r"checkpoint lacks 3 tensor\(s\).*layers\.1\.mlp"):
            model.load_weights(str(path))


def test_unloaded_lazy_model_behaves_like_gemma(gemma: Any, tokenizer_path: str, float_ckpt: Any, profile: Any) -> None:
    _, state = float_ckpt
    with gemma_profiles.use(profile("float32")):
        model = build_tiny_model(gemma, tokenizer_path)
        model.load_state_dict(state, strict=False)  # the user's own loading, not ours
        assert not any(p.is_meta for p in model.parameters())
        assert torch.equal(model.state_dict()["embedder.weight"], state["embedder.weight"])
        other = build_tiny_model(gemma, tokenizer_path)
    # It keeps its profile after the block (tests/test_model_lifetime.py): still waiting for the
    # loader, and the user's own loading materialises it first, as inside the block.
    other.load_state_dict(state, strict=False)
    assert not any(p.is_meta for p in other.parameters())
    assert torch.equal(other.state_dict()["embedder.weight"], state["embedder.weight"])


MEASURE = textwrap.dedent(
    """
    import json, sys
    import psutil, torch
    sys.path.insert(0, {tests!r})
    from gemma import config as gemma_config, model as gemma_model
    from gemma_testing import tiny_config
    config = tiny_config(gemma_config, "2b", {tokenizer!r}, dtype="float32")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 1024, 4096, 8
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 8, 1, 128
    baseline = psutil.Process().memory_info().rss
    torch.set_default_dtype(config.get_dtype())
    model = gemma_model.GemmaForCausalLM(config)
    model.load_weights({ckpt!r})
    # VmHWM, not ru_maxrss: ru_maxrss survives exec and starts at the parent's RSS.
    status = open("/proc/self/status").read()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    print(json.dumps({{"delta": peak - baseline}}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_lean_load_peak_rss_is_about_the_checkpoint(gemma: Any, tokenizer_path: str, tmp_path: Path) -> None:
    """Peak RSS while loading: <= 1.10x the checkpoint under a profile (gemma's loader: ~2x)."""
    from gemma_testing import write_medium_checkpoint

    ckpt = tmp_path / "medium.ckpt"
    write_medium_checkpoint(gemma, tokenizer_path, ckpt, layers=8)
    size = os.path.getsize(ckpt)
    profile = tmp_path / "f32.yaml"
    profile.write_text("description: t\nplacement: {device: cpu}\nconfig: {dtype: float32}\n")
    code = MEASURE.format(tests=str(HERE), tokenizer=tokenizer_path, ckpt=str(ckpt))
    ratios = {}
    for label, value in (("profile", str(profile)), ("gemma", "off")):
        env = {**os.environ, "GEMMA_PROFILE": value}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        ratios[label] = json.loads(done.stdout.strip().splitlines()[-1])["delta"] / size
    assert ratios["profile"] <= 1.10, ratios
    assert ratios["gemma"] >= 1.5, ratios


def test_bench_command(gemma: Any, tokenizer_path: str, tmp_path: Path, write_profile: Any) -> None:
    """``gemma-profile bench`` on gemma's 2b shrunk by the profile itself (any GemmaConfig field)."""
    from click.testing import CliRunner
    from gemma_testing import tiny_bench_profile

    from gemma_profiles.cli.main import cli

    ckpt = tmp_path / "tiny.ckpt"
    profile = tiny_bench_profile(gemma, write_profile, tokenizer_path, ckpt)
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            str(profile),
            "--variant",
            "2b",
            "--ckpt",
            str(ckpt),
            "--tokens",
            "4",
            "--prompt",
            "the cat",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["dtypes"] == ["bfloat16"] and data["decode_steps"] == 3
    assert data["tokens_per_s"] > 0 and data["peak_memory"] > 0
    missing = CliRunner().invoke(cli, ["bench", str(profile), "--variant", "2b", "--ckpt", str(tmp_path / "nope.ckpt")])
    assert missing.exit_code == 2 and "checkpoint not found" in missing.stderr


def test_to_before_load_weights_defers_to_the_loader(
    gemma: Any, tokenizer_path: str, float_ckpt: Any, profile: Any
) -> None:
    """``model.to(device)`` before ``load_weights`` does not build the whole model first."""
    path, state = float_ckpt
    with gemma_profiles.use(profile("float32")):
        model = build_tiny_model(gemma, tokenizer_path)
        assert model.to("cpu") is model
        assert any(p.is_meta for p in model.parameters()), "still lazy: nothing allocated yet"
        model.load_weights(path)
        assert not any(p.is_meta for p in model.parameters())
        assert torch.equal(model.state_dict()["embedder.weight"], state["embedder.weight"])


# (checkpoint dtype, file format, profile dtype, quantization, loading.mmap)
CONVERSIONS = {
    "float32 mapped as it is": ("float32", "ckpt", "float32", "none", True),
    "float32 copied (mmap: false)": ("float32", "ckpt", "float32", "none", False),
    "float32 to bfloat16": ("float32", "ckpt", "bfloat16", "none", True),
    "float32 to float16": ("float32", "ckpt", "float16", "none", True),
    "bfloat16 to float32": ("bfloat16", "ckpt", "float32", "none", True),
    "bfloat16 mapped as it is": ("bfloat16", "ckpt", "bfloat16", "none", True),
    "safetensors float32": ("float32", "safetensors", "float32", "none", True),
    "safetensors float32 to bfloat16": ("float32", "safetensors", "bfloat16", "none", True),
    "sharded float32 to float16": ("float32", "sharded", "float16", "none", True),
    "float32 quantized to int8": ("float32", "ckpt", "float32", "int8", True),
    "bfloat16 quantized to int8": ("bfloat16", "ckpt", "bfloat16", "int8", True),
    "int8 kept int8": ("int8", "ckpt", "float32", "int8", True),
    "int8 dequantized to bfloat16": ("int8", "ckpt", "bfloat16", "none", True),
}


def _write(state: dict[str, torch.Tensor], kind: str, folder: Path) -> str:
    from safetensors.torch import save_file

    if kind == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        return str(folder / "model.safetensors")
    if kind == "sharded":
        names = sorted(state)
        shards = {"shard-1.bin": names[::2], "shard-2.bin": names[1::2]}
        for shard, keys in shards.items():
            torch.save({k: state[k] for k in keys}, folder / shard)
        weight_map = {k: shard for shard, keys in shards.items() for k in keys}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return str(folder)
    torch.save({"model_state_dict": state}, folder / "model.ckpt")
    return str(folder / "model.ckpt")


@pytest.mark.parametrize(
    ("conversion", "variant"),
    # float16 compute is refused for Gemma 2 (it overflows): that conversion on Gemma 1 only
    [(c, v) for c in CONVERSIONS for v in ("2b", "2b-v2") if not (v == "2b-v2" and CONVERSIONS[c][2] == "float16")],
)
def test_loaded_weights_equal_the_checkpoints(
    gemma: Any,
    tokenizer_path: str,
    write_profile: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    conversion: str,
    variant: str,
) -> None:
    """Every parameter the loader fills is the checkpoint's tensor after the same conversion.

    A loader that negated, scaled or swapped what it converts passed every other test
    (issue 13's mutation audit); this compares each parameter with its source, on each
    conversion path.  The kernels, fused layers and int8 forwards are off: the parameters
    are what the loader left."""
    from gemma_testing import write_random_checkpoint

    from gemma_profiles.engine.loading import quantize_rows

    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "kernels,fused,quantization")
    source_dtype, kind, dtype, weights, mmap = CONVERSIONS[conversion]
    shapes = build_tiny_model(gemma, tokenizer_path, variant, quant=source_dtype == "int8")
    write_dtype = torch.float32 if source_dtype == "int8" else getattr(torch, source_dtype)
    state = write_random_checkpoint(shapes, tmp_path / "random.ckpt", write_dtype, seed=11)
    path = _write(state, kind, tmp_path)
    profile = write_profile(
        "values",
        f"description: t\nplacement: {{device: cpu}}\nconfig: {{dtype: {dtype}}}\n"
        f"quantization: {{weights: {weights}}}\nloading: {{mmap: {str(mmap).lower()}}}\n",
    )
    want = getattr(torch, dtype)
    with gemma_profiles.use(str(profile)):
        model = build_tiny_model(gemma, tokenizer_path, variant)
        model.load_weights(path)
        loaded = dict(model.named_parameters())
    int8 = {name for name, tensor in state.items() if tensor.dtype == torch.int8}
    made = {name + "_scaler" for name in state if name in loaded and loaded[name].dtype == torch.int8} - set(state)
    used = {name + "_scaler" for name in int8 if loaded[name].is_floating_point()}  # dequantized with
    assert set(loaded) == (set(state) - used) | made, set(loaded) ^ ((set(state) - used) | made)
    checked = 0
    for name, got in loaded.items():
        source = state.get(name, got)
        if name in made:  # the scale of a weight quantized here
            _, expected = quantize_rows(state[name.removesuffix("_scaler")], got.dtype)
            assert torch.equal(got, expected), name
        elif got.dtype == torch.int8 and source.dtype == torch.int8:
            assert torch.equal(got, source), name  # an int8 checkpoint into an int8 model: as it is
        elif got.dtype == torch.int8:  # quantized here: within half a step of each row's scale
            scaler = loaded[name + "_scaler"].to(torch.float64)
            error = (got.to(torch.float64) * scaler.unsqueeze(1) - source.to(torch.float64)).abs().amax(dim=1)
            rounding = torch.finfo(loaded[name + "_scaler"].dtype).eps  # the scale is stored in the model's dtype
            assert bool((error <= scaler * (0.5 + 127 * rounding) + 1e-12).all()), name
            expected, _ = quantize_rows(source, loaded[name + "_scaler"].dtype)
            assert torch.equal(got, expected), name
        elif source.dtype == torch.int8:  # an int8 checkpoint dequantized into a float model
            expected = (source.to(torch.float32) * state[name + "_scaler"].to(torch.float32).unsqueeze(1)).to(want)
            assert torch.equal(got, expected), name
        else:
            assert got.dtype == want, name
            assert torch.equal(got, source.to(want)), name
        checked += 1
    assert checked == len(state) - len(used) + len(made)


@pytest.mark.parametrize("weights", ["none", "int8"])
@pytest.mark.parametrize("embedder_at", ["cpu", "disk"])
def test_an_embedder_the_plan_keeps_on_the_cpu_is_loaded_there(
    gemma: Any,
    tokenizer_path: str,
    float_ckpt: Any,
    write_profile: Any,
    profile: Any,
    monkeypatch: pytest.MonkeyPatch,
    weights: str,
    embedder_at: str,
) -> None:
    """A GPU plan with ``device_map: {embedder: cpu|disk}``: the loader reads the embedder into host
    memory (int8: quantized and later dequantized there), never onto the GPU.  Before: it went to
    the GPU with the resident weights and the offload step moved it afterwards - on a 5-6 GB card
    that moment alone did not fit.  No GPU here: the execution device ``cuda:0`` stands as ``meta``."""
    import dataclasses

    from gemma_profiles.hooks.loading import load_options
    from gemma_profiles.hooks.offload import decide_layout

    import gemma_profiles.engine.devices as devices
    from gemma_profiles.engine import loading
    from gemma_profiles.engine.quantization import column_scaler
    from gemma_profiles.planning.plan import make_plan
    from gemma_profiles.spec.profile import load_profile

    path, state = float_ckpt
    gpu = write_profile(
        f"gpu-{weights}-{embedder_at}",
        "description: t\nhardware: {device: cuda, compute_capability: '6.1', memory: 5GiB, host_memory: 12GiB}\n"
        f"placement: {{device: cuda, device_map: {{embedder: {embedder_at}, '1': cpu}}}}\n"
        f"config: {{dtype: float32}}\nquantization: {{weights: {weights}}}\n",
    )
    plan = make_plan(load_profile(str(gpu)))
    assert plan.device is not None and plan.device.value == "cuda"
    monkeypatch.setattr(devices, "device_problem", lambda device: None)
    planned = load_options(plan)
    assert planned.device.startswith("cuda") and planned.embedder == "cpu", planned
    as_meta = {i: "meta" if d.startswith("cuda") else d for i, d in planned.layers.items()}
    planned = dataclasses.replace(planned, device="meta", layers=as_meta)
    with gemma_profiles.use(profile("float32", weights)):  # preflight refuses cuda here: built for the CPU
        model = build_tiny_model(gemma, tokenizer_path)
        assert model.embedder.weight.is_meta, "built lazily"
        loading.lean_load(model, path, planned)
    embedder = model.embedder
    on_host = {name: t.device.type for name, t in [*embedder.named_parameters(), *embedder.named_buffers()]}
    assert set(on_host.values()) == {"cpu"}, on_host
    if weights == "int8":
        assert embedder.weight.dtype == torch.int8 and {"weight", "weight_scaler"} <= set(on_host)
        assert column_scaler(embedder) is not None and column_scaler(embedder).device.type == "cpu"
    else:
        assert torch.equal(embedder.weight, state["embedder.weight"])
    layers = model.model.layers
    assert all(p.is_meta for p in layers[0].parameters()), "a resident layer: the execution device"
    assert all(p.is_meta for p in model.model.norm.parameters())
    # What runs after loading copes with an embedder already on the CPU: int8 dequantizes it there,
    # and the offload step finds it where the layout wants it.
    if weights == "int8":
        from hooks.quantization import gemma_profile_weights_loaded

        gemma_profile_weights_loaded(model, plan)
        assert embedder.weight.device.type == "cpu" and embedder.weight.dtype == torch.float32
        assert column_scaler(embedder) is None and not hasattr(embedder, "weight_scaler")
        error = (embedder.weight - state["embedder.weight"]).abs().max().item()
        assert error <= state["embedder.weight"].abs().max().item() / 127, error
    layout = decide_layout(model, plan, "cuda:0")
    assert layout.embedder == embedder_at and layout.offloaded == {1: "cpu"}


def test_a_cpu_plan_or_an_embedder_on_the_gpu_loads_it_with_the_rest() -> None:
    from gemma_profiles.hooks.loading import planned_embedder_device

    from gemma_profiles.planning.plan import Plan
    from gemma_profiles.spec.schema import Placement

    def plan(device_map: Any) -> Plan:
        return Plan("p", "p.yaml", None, None, {}, None, Placement(device_map=device_map), "none")

    assert planned_embedder_device(plan({"embedder": "cpu"}), "cuda:0") == "cpu"
    assert planned_embedder_device(plan({"text_token_embedder": "disk"}), "cuda:0") == "cpu"
    assert planned_embedder_device(plan({"embedder": "cpu"}), "cpu") is None
    assert planned_embedder_device(plan({"embedder": "cuda"}), "cuda:0") is None
    assert planned_embedder_device(plan({"0-3": "cpu"}), "cuda:0") is None
    assert planned_embedder_device(plan(None), "cuda:0") is None


def test_the_engine_loads_from_plain_values_without_a_profile(gemma: Any, tokenizer_path: str, float_ckpt: Any) -> None:
    """The engine alone: no profile, no Plan, no plugin manager - a model built lazily with the
    engine's own meta mode and a `LoadOptions` of plain values.  Memory-mapped where the dtype
    matches; ``mmap=False`` copies."""
    from gemma_profiles.engine.lazy import MetaParameters, is_lazy, set_lazy
    from gemma_profiles.engine.loading import LoadOptions, lean_load
    from gemma_profiles.engine.pages import memory_mapped

    path, state = float_ckpt
    for keep_mapped in (True, False):
        with MetaParameters():
            model = build_tiny_model(gemma, tokenizer_path)
        set_lazy(model, True)
        assert model.embedder.weight.is_meta
        lean_load(model, path, LoadOptions(label=f"plain-{keep_mapped}", mmap=keep_mapped))
        assert not is_lazy(model)
        loaded = model.state_dict()
        for name, tensor in state.items():
            assert torch.equal(loaded[name], tensor), name
        assert memory_mapped(model.embedder.weight) is keep_mapped
        assert logits(model, TOKENS).isfinite().all()
