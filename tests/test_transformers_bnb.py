"""int8 weights for transformers' Gemma on CUDA through bitsandbytes' LLM.int8() (hooks/transformers.py; issue 17).

On a CUDA device with compute capability 7.5 or newer, a profile with ``quantization.weights: int8`` passes
``quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)`` to ``from_pretrained``
and transformers makes each linear layer a ``Linear8bitLt``.  bitsandbytes' CPU backend runs the same
layers, so these tests load for real on the CPU: the one function that decides the route
(``int8_route``) is made to answer "bitsandbytes", everything after it is the real path.  What only CUDA
does - the int8 product dequantized through a float16 tensor - is emulated on the CPU by registering
that kernel's float16 output for bitsandbytes' ``int8_mm_dequant`` op (`cuda_dequantization`);
benchmarks/gpu_transformers_int8.py checks it on a GPU, with the same helpers.

Without bitsandbytes the tests that load skip (``.ci/run`` installs it: the ``cuda-int8`` extra).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")

import torch  # noqa: E402
from gemma_profiles.hooks import transformers as hook  # noqa: E402

import gemma_profiles  # noqa: E402
from gemma_profiles.planning import hf  # noqa: E402
from gemma_profiles.planning.plan import make_plan  # noqa: E402
from gemma_profiles.spec.registry import default_registry  # noqa: E402

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (the cuda-int8 extra)")
LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head is tied to the embedding and stays float


def _benchmark() -> Any:
    """benchmarks/gpu_transformers_int8.py: the model builders and comparisons the GPU run uses too."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_transformers_int8.py"
    spec = importlib.util.spec_from_file_location("gpu_transformers_int8", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _benchmark()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random Gemma 3 and Gemma 2 (transformers' config classes, ``save_pretrained``): ``gemma3``/``gemma2``
    strengthened; ``*-large``: MLP inputs ~2000 and ``down_proj``'s above 65504; ``queries``: Gemma 3 whose
    ``q_proj`` products pass 65504 (its ``q_norm`` keeps the model's own logits finite)."""
    root = tmp_path_factory.mktemp("hf-bnb")
    made = {}
    for kind in ("gemma3", "gemma2"):
        made[kind] = bench.strengthen(bench.build(kind), kind)
        made[f"{kind}-large"] = bench.strengthen(bench.build(kind), kind, feedforward_norm=2000.0)
    made["queries"] = bench.scale_queries(bench.strengthen(bench.build("gemma3"), "gemma3"), bench.QUERY_SCALE)
    folders = {}
    for name, model in made.items():
        model.save_pretrained(root / name)
        folders[name] = root / name
    return folders


@pytest.fixture(scope="module")
def float32(models: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """transformers as it is, float32, no profile."""
    return {
        name: bench.answers(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
        for name, path in models.items()
    }


@pytest.fixture
def on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The route decided as for a CUDA device with LLM.int8(); the model itself stays on the CPU."""
    monkeypatch.setattr(hook, "int8_route", lambda plan, kwargs: hook.BITSANDBYTES)


@pytest.fixture
def cuda_dequantization() -> Iterator[None]:
    """bitsandbytes' CUDA ``int8_mm_dequant`` on the CPU: the int32 product dequantized into a float16 tensor
    (its kernel writes float16 only), then cast to the requested dtype."""
    lib = torch.library.Library("bitsandbytes", "FRAGMENT")

    def float16_dequant(a: Any, row_stats: Any, col_stats: Any, dtype: Any = None, bias: Any = None) -> Any:
        out = (a.float() * (row_stats.reshape(-1, 1) * col_stats.reshape(1, -1)) * 6.200124e-05).half()
        if bias is not None:
            out = out + bias
        return out.to(dtype or torch.float16)

    torch.library.register_kernel("bitsandbytes::int8_mm_dequant", "cpu", float16_dequant, lib=lib)
    try:
        yield
    finally:
        lib._destroy()


def load(folder: Path, profile: str | None = "cpu-8gb", **kwargs: Any) -> Any:
    if profile is None:
        return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    with gemma_profiles.use(profile):
        return transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def _logged(messages: list[str], text: str) -> bool:
    return any(text in message for message in messages)


def _int8(model: Any) -> list[Any]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]


# -- the route -------------------------------------------------------------------------------------------------


def _plan(profile: str, folder: Path) -> Any:
    config = transformers.AutoConfig.from_pretrained(folder)
    shape = hf.shape_of(config)
    return make_plan(default_registry().load(profile), hf.variant_of(shape), shape.family, shape=shape)


def test_the_route_follows_the_device_map_and_the_compute_capability(models: dict[str, Path]) -> None:
    t4 = _plan("t4", models["gemma3"])  # (the route asks only the device map and the GPU's compute capability)
    assert hook.int8_route(t4, {"device_map": "cuda:0"}) == hook.BITSANDBYTES  # Tesla T4: 7.5
    assert hook.int8_route(t4, {"device_map": {"": 0}}) == hook.BITSANDBYTES
    assert hook.int8_route(t4, {"device_map": "auto"}) == hook.BITSANDBYTES  # t4's device is CUDA
    assert hook.int8_route(t4, {}) == hook.CPU  # no device_map: transformers loads on the CPU
    assert hook.int8_route(t4, {"device_map": "cpu"}) == hook.CPU
    pascal = hook.int8_route(_plan("pascal-5gb", models["gemma3"]), {"device_map": "cuda:0"})
    assert pascal == (
        "bitsandbytes' LLM.int8() needs compute capability 7.5 or newer (Turing), Quadro P2200, Quadro P2000 has 6.1"
    )


@needs_bnb
def test_pascal_keeps_its_dtype_with_one_line_and_lets_accelerate_place_it(
    models: dict[str, Path], log_messages: list[str]
) -> None:
    """Compute capability 6.1: no LLM.int8(); the weights stay in the dtype, and since the memory verdict
    counted int8 layers, accelerate places them within the profile's max_memory."""
    plan = _plan("pascal-5gb", models["gemma3"])
    plan = type(plan)(**{**plan.__dict__, "quantization": "int8"})  # (pascal-5gb's Gemma 3 stores float16)
    config = transformers.AutoConfig.from_pretrained(models["gemma3"])
    kwargs: dict[str, Any] = {"device_map": "cuda:0"}
    assert hook.int8_arguments(plan, config, kwargs, torch.float16, frozenset()) == ""
    assert "quantization_config" not in kwargs
    assert kwargs["device_map"] == "auto" and kwargs["max_memory"] == {0: int(4.5 * 2**30), "cpu": 12 * 2**30}
    assert _logged(
        log_messages, "[pascal-5gb] int8 weights on CUDA: bitsandbytes' LLM.int8() needs compute capability 7.5"
    )
    assert _logged(log_messages, "has 6.1; weights stay float16")
    assert _logged(log_messages, "from_pretrained device_map: 'cuda:0' -> 'auto' (no int8 weights")
    # the script's own device_map stays
    kwargs = {"device_map": "cuda:0"}
    hook.int8_arguments(plan, config, kwargs, torch.float16, frozenset({"device_map"}))
    assert kwargs == {"device_map": "cuda:0"}


@needs_bnb
def test_offloading_maps_keep_their_cpu_layers_unquantized(
    models: dict[str, Path], on_cuda: None, log_messages: list[str]
) -> None:
    plan = _plan("t4", models["gemma3"])
    plan = type(plan)(**{**plan.__dict__, "quantization": "int8"})
    config = transformers.AutoConfig.from_pretrained(models["gemma3"])
    kwargs: dict[str, Any] = {"device_map": "auto"}
    assert hook.int8_arguments(plan, config, kwargs, torch.float32, frozenset()) == hook.BITSANDBYTES
    given = kwargs["quantization_config"]
    assert given.load_in_8bit and given.llm_int8_threshold == 6.0 and given.llm_int8_enable_fp32_cpu_offload
    assert _logged(log_messages, "llm_int8_enable_fp32_cpu_offload=True)' (int8 weights on CUDA;")
    assert _logged(log_messages, "layers accelerate offloads to the CPU or disk stay in float32")
    kwargs = {"device_map": "cuda:0"}
    hook.int8_arguments(plan, config, kwargs, torch.float32, frozenset())
    assert not kwargs["quantization_config"].llm_int8_enable_fp32_cpu_offload


# -- loading through bitsandbytes ---------------------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_int8_on_cuda_loads_linear8bitlt_layers(
    kind: str, models: dict[str, Path], float32: dict[str, Any], on_cuda: None, log_messages: list[str]
) -> None:
    import bitsandbytes as bnb

    model = load(models[kind])
    layers = _int8(model)
    assert len(layers) == LINEARS
    assert all(type(m).__name__ == "ProfiledLinear8bitLt" and m.state.threshold == 6.0 for m in layers)
    assert type(model.get_output_embeddings()) is torch.nn.Linear  # tied to the embedding: transformers keeps it
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert _logged(
        log_messages,
        "from_pretrained quantization_config: None -> 'BitsAndBytesConfig(load_in_8bit=True, "
        "llm_int8_threshold=6.0)' (int8 weights on CUDA; /",
    ), log_messages
    assert _logged(
        log_messages,
        f"int8 weights: {LINEARS} of transformers' linear layers on bitsandbytes' LLM.int8() (Linear8bitLt, "
        "outlier threshold 6): inputs cast to float16, columns with a value at or above the threshold "
        "multiplied in float32; each product's int8 part bounded below 32752 for its float16 dequantization "
        "on CUDA (0 layer(s) scaled",
    ), log_messages
    assert not _logged(log_messages, "CPU kernels:")  # nothing of ours on top
    got = bench.answers(model)
    divergence = bench.kl(float32[kind]["logits"], got["logits"])
    assert divergence < 0.02, divergence
    assert bench.agreement(float32[kind]["tokens"], got["tokens"]) >= 0.75, (float32[kind]["tokens"], got["tokens"])
    assert isinstance(layers[0], bnb.nn.Linear8bitLt)


@needs_bnb
def test_bitsandbytes_per_call_notice_is_quiet_for_our_layers_only(
    models: dict[str, Path], on_cuda: None, caplog: pytest.LogCaptureFixture
) -> None:
    """bitsandbytes logs "inputs will be cast ... to float16" on every product: ours say it once instead."""
    ids = torch.tensor(bench.PROMPT)
    with caplog.at_level("WARNING", logger=hook._BNB_LOGGER):
        with torch.no_grad():
            load(models["gemma3"])(ids)
        assert not [r for r in caplog.records if r.getMessage().startswith(hook._CAST_NOTICE)]
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
        with torch.no_grad():
            load(models["gemma3"], None, quantization_config=config, dtype=torch.float32)(ids)
        assert len([r for r in caplog.records if r.getMessage().startswith(hook._CAST_NOTICE)]) == LINEARS


@needs_bnb
def test_the_scripts_quantization_config_wins(models: dict[str, Path], on_cuda: None, log_messages: list[str]) -> None:
    config = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=4.0)
    model = load(models["gemma3"], quantization_config=config)
    assert {type(m).__name__ for m in _int8(model)} == {"Linear8bitLt"}  # transformers' own, untouched
    assert {m.state.threshold for m in _int8(model)} == {4.0}
    assert _logged(
        log_messages,
        "[cpu-8gb] from_pretrained quantization_config: the script's BitsAndBytesConfig wins over the profile's "
        "int8 weights",
    )
    assert not _logged(log_messages, "of transformers' linear layers on bitsandbytes")


@needs_bnb
def test_without_bitsandbytes_one_warning_and_a_float_model(
    models: dict[str, Path], float32: dict[str, Any], on_cuda: None, log_messages: list[str], monkeypatch: Any
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    model = load(models["gemma3"])
    warnings = [m.strip() for m in log_messages if m.startswith("WARNING") and "int8" in m]
    assert warnings == [
        "WARNING | [cpu-8gb] int8 weights on CUDA: bitsandbytes is not installed; pip install "
        "'gemma-profiles[cuda-int8]' (or pip install bitsandbytes); weights stay float32"
    ], log_messages
    assert model.dtype == torch.float32
    assert not any("Linear8bit" in type(m).__name__ for m in model.modules())
    got = bench.answers(model)
    assert bench.kl(float32["gemma3"]["logits"], got["logits"]) < 1e-6
    assert got["tokens"] == float32["gemma3"]["tokens"]


@needs_bnb
def test_the_blocked_quantization_builtin_keeps_the_dtype(
    models: dict[str, Path], on_cuda: None, log_messages: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "quantization")  # as for gemma_pytorch
    model = load(models["gemma3"])
    assert not _int8(model) and model.dtype == torch.float32
    assert _logged(log_messages, "[cpu-8gb] int8 weights: the quantization builtin is blocked; weights stay float32")


# -- float16 inside LLM.int8() ----------------------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_inputs_above_float16_stay_exact_through_the_outlier_threshold(
    kind: str, models: dict[str, Path], float32: dict[str, Any], on_cuda: None, log_messages: list[str]
) -> None:
    """``down_proj``'s inputs pass 65504: bitsandbytes casts them to float16 (inf), but with the outlier
    threshold their columns are multiplied in float32 from the input itself.  Without it (the script's own
    ``llm_int8_threshold=0``) the logits are NaN - and a warning said so before loading."""
    name = f"{kind}-large"
    reference = float32[name]
    assert torch.isfinite(reference["logits"]).all()
    model = load(models[name])
    largest: list[float] = []
    hook_handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda module, args: largest.append(float(args[0].abs().max()))
    )
    got = bench.answers(model)
    hook_handle.remove()
    assert max(largest) > hook.FLOAT16_MAX, largest  # the case this test is about
    assert torch.isfinite(got["logits"]).all()
    assert bench.kl(reference["logits"], got["logits"]) < 0.02
    assert bench.agreement(reference["tokens"], got["tokens"]) >= 0.75
    unsafe = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    bad = load(models[name], quantization_config=unsafe)
    assert _logged(log_messages, "[cpu-8gb] the script's BitsAndBytesConfig has llm_int8_threshold=0.0: bitsandbytes")
    with torch.no_grad():
        assert not torch.isfinite(bad(torch.tensor(bench.TEXT)).logits).all()


@needs_bnb
def test_the_float16_dequantization_is_bounded_by_scaling(
    models: dict[str, Path], float32: dict[str, Any], on_cuda: None, cuda_dequantization: None, log_messages: list[str]
) -> None:
    """On CUDA the int8 part of each product passes through float16.  ``q_proj``'s products here reach far
    beyond 65504: our layers' scales are divided by a power of two (the output multiplied back), so the
    logits stay float32's; transformers' own layers (the script's config) give inf."""
    reference = float32["queries"]
    model = load(models["queries"])
    scales = {m.__dict__.get(hook._OUTPUT_SCALE) for m in _int8(model)}
    assert scales - {None} and all(s is None or (s > 1 and float(s).is_integer()) for s in scales)
    assert _logged(log_messages, "on CUDA (2 layer(s) scaled by a power of two to stay there)"), log_messages
    got = bench.answers(model)
    assert torch.isfinite(got["logits"]).all()
    assert bench.kl(reference["logits"], got["logits"]) < 0.02
    assert bench.agreement(reference["tokens"], got["tokens"]) >= 0.75
    # state_dict() keeps bitsandbytes' own scales
    own = load(models["queries"], None, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))
    mine, theirs = model.state_dict(), own.state_dict()
    key = "model.layers.0.self_attn.q_proj.SCB"
    assert torch.equal(mine[key], theirs[key])
    with torch.no_grad():
        assert not torch.isfinite(own(torch.tensor(bench.TEXT)).logits).all()  # the unbounded control


# -- planning ---------------------------------------------------------------------------------------------------


def test_plan_counts_int8_layers_on_the_gpu(tmp_path: Path) -> None:
    """t4 and a 9b-shaped Gemma 2: the memory table the preflight checks holds int8 decoder layers on cuda:0
    (bitsandbytes' Linear8bitLt: one byte a weight, a float32 scale a row) and the float32 embedder
    (transformers keeps the tied embedding unquantized)."""
    import json

    from click.testing import CliRunner

    from gemma_profiles.cli.main import cli

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gemma2",
                "num_hidden_layers": 42,
                "hidden_size": 3584,
                "intermediate_size": 14336,
                "num_attention_heads": 16,
                "num_key_value_heads": 8,
                "head_dim": 256,
                "vocab_size": 256000,
                "max_position_embeddings": 8192,
                "sliding_window": 4096,
            }
        )
    )
    out = CliRunner().invoke(cli, ["plan", "t4", "--model", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["quantization"] == "int8" and data["dtype"] == "float32"
    items = {item["component"]: item for item in data["memory"]["items"]}
    layers = items["decoder layers x42"]
    assert layers["device"] == "cuda:0"
    per_layer = 3584 * (16 * 256 + 2 * 8 * 256) + 16 * 256 * 3584 + 3 * 3584 * 14336  # int8: a byte each
    assert per_layer * 42 <= layers["bytes"] < per_layer * 42 * 1.01
    embedder = items["embedder (tied output)"]
    assert embedder["device"] == "cuda:0" and embedder["bytes"] == 256000 * 3584 * 4
    assert data["verdict"]["fits"]


# -- the GPU script's own code, here ----------------------------------------------------------------------------


@needs_bnb
def test_the_gpu_scripts_child_and_comparison_run_here(
    models: dict[str, Path], float32: dict[str, Any], on_cuda: None, tmp_path: Path
) -> None:
    """benchmarks/gpu_transformers_int8.py's per-system code (its ``--child``) and its checks, on the CPU."""
    with gemma_profiles.use("cpu-8gb"):
        got = bench.child(str(models["gemma3"]), {"logits": str(tmp_path / "logits.pt"), "tokens": 12})
    assert got["int8_layers"] == LINEARS and got["finite"] and got["devices"] == ["cpu"]
    got["logits"] = torch.load(tmp_path / "logits.pt")
    failures: list[str] = []
    reference = {**float32["gemma3"], "cuda_peak_gib": None}
    bench.compare("cpu-8gb through bitsandbytes", got, reference, LINEARS, failures)
    assert failures == []
    bench.compare("wrong count", got, reference, LINEARS + 1, failures)
    assert failures == [f"wrong count: {LINEARS} Linear8bitLt layers, want {LINEARS + 1}"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's answer on a machine without CUDA")
def test_the_gpu_script_says_it_needs_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main([]) == 2
    assert capsys.readouterr().err.strip() == (
        "gpu_transformers_int8.py: needs CUDA (torch.cuda.is_available() is False here); "
        "its CPU side is tests/test_transformers_bnb.py"
    )
