"""int8 weights: the quantization error itself, and float16 compute that stays finite (issue 13, items 5, 12).

pascal-5gb computes in float16 on int8 weights.  float16 tops out at 65504, so the
order of the product matters: ``x @ q.T`` on the raw int8 values (up to 127) overflows
where ``x @ (q * s).T`` (gemma's order) does not.  Trained models have norm weights of
tens, so activations of std ~16: these tests use such activations, and bound every
result against a float64 product of the same dequantized weights.

The quantization itself is checked row by row against the source weights: the scale
is ``max|row| / 127`` and no element is off by more than half a step; a cosine over
logits cannot see a scale 5% off.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import gemma_profiles
from gemma_profiles.engine import surgery
from gemma_profiles.engine.loading import column_scales, dequantize_rows, per_row, quantize_groups, quantize_rows
from gemma_profiles.engine.quantization import dequantize_into, int8_linear, int8_lookup

#: float16's largest finite value
FP16_MAX = 65504.0


def weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A trained-like float32 weight: normal(0, 0.02), with a few outliers per row."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=generator) * 0.02
    columns = torch.randint(0, k, (n, 3), generator=generator)
    w.scatter_(1, columns, torch.randn(n, 3, generator=generator) * 0.1)
    return w


def activations(rows: int, k: int, std: float, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=generator) * std


def reference(x: torch.Tensor, q: torch.Tensor, scaler: torch.Tensor) -> torch.Tensor:
    """``x @ (q * s).T`` in float64, from the values ``x`` and ``scaler`` really hold."""
    return x.double() @ (q.double() * scaler.double().unsqueeze(1)).T


def assert_near(got: torch.Tensor, want: torch.Tensor, relative: float) -> None:
    """Finite, and every element within ``relative`` of the largest true output."""
    assert torch.isfinite(got).all(), f"{(~torch.isfinite(got)).sum().item()} of {got.numel()} outputs not finite"
    error = (got.double() - want).abs().max().item()
    bound = relative * want.abs().max().item()
    assert error <= bound, f"max error {error:.4g} > {bound:.4g} ({relative} of the largest output)"


# -- float16 compute on int8 weights ----------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(256, 2048), (64, 16384), (96, 3072)])
@pytest.mark.parametrize("rows", [1, 7])
def test_float16_with_trained_like_activations_stays_finite_and_close(n: int, k: int, rows: int) -> None:
    """Activations of std 16 through 2b-shaped weights: outputs near 60, raw int8 sums past 65504."""
    q, scaler = quantize_rows(weights(n, k), torch.float16)
    x = activations(rows, k, 16.0).half()
    want = reference(x, q, scaler)
    raw = (x.double() @ q.double().T).abs().max().item()
    assert want.abs().max().item() < 200 and raw > FP16_MAX, "the case this test is about"
    got = int8_linear(x, q, scaler)
    assert got.dtype == torch.float16 and got.shape == (rows, n)
    # float16 rounds the dequantized weight and the output: 2^-11 each
    assert_near(got, want, 2e-3)
    # gemma's own int8 forward, F.linear(x, weight * weight_scaler[:, None]): the same numbers
    assert torch.equal(got, torch.nn.functional.linear(x, q * scaler.unsqueeze(1)))


def test_float16_finite_wherever_the_true_result_is_representable() -> None:
    """Outputs up to ~30000: still finite and close; only a true result past 65504 may be inf."""
    q, scaler = quantize_rows(weights(128, 2048, seed=2), torch.float16)
    x = activations(3, 2048, 16.0, seed=3)
    x = (x * (30000 / reference(x.half(), q, scaler).abs().max().item())).half()
    want = reference(x, q, scaler)
    assert 20000 < want.abs().max().item() < FP16_MAX
    assert_near(int8_linear(x, q, scaler), want, 2e-3)


def test_float16_batched_activations_keep_their_shape() -> None:
    q, scaler = quantize_rows(weights(64, 512), torch.float16)
    x = activations(6, 512, 16.0).half().reshape(2, 3, 512)
    got = int8_linear(x, q, scaler)
    assert got.shape == (2, 3, 64)
    assert_near(got.reshape(6, 64), reference(x.reshape(6, 512), q, scaler), 2e-3)


@pytest.mark.parametrize(("dtype", "relative"), [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)])
def test_other_dtypes_agree_with_float64(dtype: torch.dtype, relative: float) -> None:
    """float32 and bfloat16 keep their path (scale after the product): both exact enough for a 5% scale."""
    n, k = 256, 2048  # a multiple of 4 rows: bfloat16 runs on _weight_int8pack_mm
    q, scaler = quantize_rows(weights(n, k), dtype)
    x = activations(5, k, 16.0).to(dtype)
    assert_near(int8_linear(x, q, scaler), reference(x, q, scaler), relative)


def test_one_scratch_buffer_serves_every_shape() -> None:
    """Layers of different shapes share one scratch buffer: each product still sees its own weight."""
    shapes = [(64, 512), (256, 2048), (32, 128), (256, 2048), (64, 512)]
    layers = [quantize_rows(weights(n, k, seed=i), torch.float16) for i, (n, k) in enumerate(shapes)]
    for i, (q, scaler) in enumerate(layers):
        x = activations(2, q.shape[1], 16.0, seed=10 + i).half()
        assert_near(int8_linear(x, q, scaler), reference(x, q, scaler), 2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dequantize_into_is_weight_times_scale(dtype: torch.dtype) -> None:
    q, scaler = quantize_rows(weights(48, 300), dtype)
    dense = torch.empty(q.shape, dtype=dtype)
    dequantize_into(dense, q, scaler)
    assert torch.equal(dense, q.to(dtype) * scaler.unsqueeze(1))


def test_int8_lookup_in_float16_is_gemmas_and_finite() -> None:
    """The embedder lookup gathers rows and scales them: no sum, nothing near 65504."""
    q, scaler = quantize_rows(weights(100, 64), torch.float16)
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(q, requires_grad=False)
    module.weight_scaler = torch.nn.Parameter(scaler, requires_grad=False)
    ids = torch.tensor([[0, 5, 99, 5]])
    got = int8_lookup(module, ids)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert torch.equal(got, torch.nn.functional.embedding(ids, q * scaler.unsqueeze(1)))


# -- the quantization error, row by row --------------------------------------------------------------


def sources() -> dict[str, torch.Tensor]:
    w = weights(64, 1000, seed=4)
    w[3] = 0.0  # an all-zero row
    w[5] *= 1e-3  # a row of small weights (a subnormal float16 scale)
    w[6] *= 0.1  # max|row| ~0.03: a normal one
    w[7, 11] = 5.0  # one large outlier
    w[9] = -w[9].abs()  # a row with no positive value
    return {"trained-like": w, "uniform": torch.rand(33, 257, generator=torch.Generator().manual_seed(6)) - 0.5}


def assert_quantized_within_half_a_step(
    source: torch.Tensor, q: torch.Tensor, scaler: torch.Tensor, what: str = "weight"
) -> None:
    """``scaler == max|row| / 127`` (in the scaler's dtype), and ``|q * s - w| <= s / 2`` per row.

    Both up to the scaler's own rounding in its dtype (gemma's layout keeps it in the
    compute dtype): relative eps, or float16's subnormal spacing, 2^-24, for a row whose
    largest weight is below 127 * 2^-14 = 0.0078.
    """
    source = source.double()
    peak = source.abs().amax(dim=1)
    expected = (peak.float().clamp(min=1e-12) / 127.0).to(scaler.dtype).double()
    info = torch.finfo(scaler.dtype)
    rounding = torch.maximum(expected * info.eps, torch.full_like(expected, info.smallest_normal * info.eps))
    off = ((scaler.double() - expected).abs() > rounding).nonzero().flatten()
    assert off.numel() == 0, (
        f"{what}: scale of row {off[0].item()} is {scaler[off[0]].item():.6g},"
        f" max|row|/127 is {expected[off[0]].item():.6g}"
    )
    nonzero = peak > 0
    assert torch.equal(q.abs().amax(dim=1)[nonzero], torch.full_like(peak[nonzero], 127, dtype=torch.int8)), (
        f"{what}: a row's largest weight is not quantized to +-127"
    )
    s = scaler.double()
    error = (q.double() * s.unsqueeze(1) - source).abs().amax(dim=1)
    # half a step, plus what the scaler's rounding moves the largest value (127 steps)
    bound = s / 2 + 127 * rounding + 1e-12
    row = int((error - bound).argmax())
    assert (error <= bound).all(), f"{what}: row {row} is off by {error[row].item():.4g} > {bound[row].item():.4g}"


@pytest.mark.parametrize("scaler_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["trained-like", "uniform"])
def test_quantize_rows_within_half_a_step(name: str, scaler_dtype: torch.dtype) -> None:
    source = sources()[name]
    q, scaler = quantize_rows(source, scaler_dtype)
    assert q.dtype == torch.int8 and scaler.dtype == scaler_dtype and scaler.shape == (source.shape[0],)
    assert_quantized_within_half_a_step(source, q, scaler)


def test_quantize_rows_keeps_its_source() -> None:
    source = sources()["trained-like"]
    before = source.clone()
    quantize_rows(source, torch.float32)
    assert torch.equal(source, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_rows_is_weight_times_scale(dtype: torch.dtype) -> None:
    q, scaler = quantize_rows(sources()["trained-like"], torch.float32)
    want = (q.float() * scaler.unsqueeze(1)).to(dtype)
    assert torch.equal(dequantize_rows(q, scaler, dtype), want)


# -- through a model ------------------------------------------------------------------------------


def build(gemma: Any, tokenizer: str, dtype: str = "float32", hidden: int = 64) -> Any:
    from gemma_testing import build_tiny_model

    return build_tiny_model(gemma, tokenizer, dtype=dtype, hidden_size=hidden, intermediate_size=2 * hidden)


@pytest.fixture
def profile(write_profile: Callable[..., Path]) -> Callable[[str], str]:
    from gemma_testing import cpu_profile

    return lambda dtype: cpu_profile(write_profile, dtype, "int8")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_loaded_int8_weights_are_the_checkpoints_within_half_a_step(
    gemma: Any, tokenizer_path: str, tmp_path: Path, profile: Callable[[str], str], dtype: str, int8_kernel: str
) -> None:
    """Every weight quantized while loading, against the float checkpoint it came from, row by row."""
    from gemma_testing import write_random_checkpoint

    path = tmp_path / "float.ckpt"
    state = write_random_checkpoint(build(gemma, tokenizer_path), path, torch.float32, seed=7)
    with gemma_profiles.use(profile(dtype)):
        model = build(gemma, tokenizer_path)
        model.load_weights(str(path))
        loaded = model.state_dict()  # the native kernel's layout unpacks here
    checked = 0
    for name, source in state.items():
        if "embedder" in name and name in loaded:
            # row and column scales; state_dict() gives gemma's per-row format of those values
            columns = column_scales(source)
            q, scaler = quantize_rows(source, getattr(torch, dtype), columns=columns)
            assert_quantized_within_half_a_step(source / columns, q, scaler, name)
            if loaded[name].dtype == torch.int8:
                want, want_scaler = per_row(q, scaler, columns)
                assert torch.equal(loaded[name], want) and torch.equal(loaded[name + "_scaler"], want_scaler), name
            else:  # dequantized once for the sampler
                assert torch.equal(loaded[name], dequantize_rows(q, scaler, getattr(torch, dtype), columns)), name
            checked += 1
        elif name + "_scaler" in loaded and loaded[name].dtype == torch.int8:
            assert loaded[name + "_scaler"].dtype == getattr(torch, dtype)
            owner = model.get_submodule(name.rpartition(".")[0])
            packed = owner.__dict__.get("_gemma_profile_int8")
            if packed is not None and packed.groups is not None:
                # a scale per group of columns (the native kernel's AVX2 path), each group within
                # half a step; state_dict() gives gemma's per-row format of those values
                q, groups = quantize_groups(source, packed.group)
                assert torch.equal(packed.unpack(), q) and torch.equal(packed.groups, groups), name
                assert_quantized_within_half_a_step(
                    source.reshape(-1, packed.group), q.reshape(-1, packed.group), groups.reshape(-1), name
                )
                want, want_scaler = per_row(q, groups.amax(1).to(getattr(torch, dtype)), groups=groups)
                assert torch.equal(loaded[name], want) and torch.equal(loaded[name + "_scaler"], want_scaler), name
            else:
                assert_quantized_within_half_a_step(source, loaded[name], loaded[name + "_scaler"], name)
            checked += 1
    linears = sum(1 for module in model.modules() if surgery.original_class(module).__name__ == "Linear")
    assert checked >= linears + 1, f"only {checked} weights checked"


def scaled_norms(state: dict[str, torch.Tensor], scale: float, seed: int = 8) -> dict[str, torch.Tensor]:
    """Norm weights of tens, as in trained checkpoints: activations of std ~``scale``."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: scale * (1 + 0.2 * torch.rand(tensor.shape, generator=generator)) if "norm" in name else tensor
        for name, tensor in state.items()
    }


def first_logits_and_all_finite(model: Any) -> tuple[torch.Tensor, bool, str]:
    steps: list[torch.Tensor] = []
    handle = model.sampler.register_forward_hook(lambda m, a, out: steps.append(out[1].float().clone()))
    try:
        text = model.generate("the cat sees a dog", "cpu", output_len=4, temperature=None)
    finally:
        handle.remove()
    return steps[0], all(bool(torch.isfinite(step).all()) for step in steps), text


def test_float16_int8_model_generates_finite_logits_with_trained_like_norms(
    gemma: Any, tokenizer_path: str, tmp_path: Path, profile: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pascal-5gb's numbers on the CPU: int8 weights, float16 compute, norm weights of ~30.

    gemma's 2b layout at hidden 256: its int8 products reach raw sums of ~10^5 (past
    float16) for outputs in the tens.  The float16 logits must be finite and close to
    float32 compute on the same int8 weights.
    """
    from gemma_testing import write_random_checkpoint

    from gemma_profiles.engine import loading

    # the same int8 weights in both: per row (float16 compute is never grouped)
    monkeypatch.setattr(loading, "INT8_GROUP_COLUMNS", 0)
    hidden = 256
    path = tmp_path / "trained-like.ckpt"
    state = write_random_checkpoint(build(gemma, tokenizer_path, hidden=hidden), path, torch.float32, seed=9)
    torch.save({"model_state_dict": scaled_norms(state, 30.0)}, path)
    runs = {}
    for dtype in ("float32", "float16"):
        with gemma_profiles.use(profile(dtype)):
            model = build(gemma, tokenizer_path, dtype, hidden=hidden)
            model.load_weights(str(path))
            model = model.to("cpu").eval()
            assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
            assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {getattr(torch, dtype)}
            runs[dtype] = first_logits_and_all_finite(model)
    (want, _, _), (got, finite, text) = runs["float32"], runs["float16"]
    assert finite and torch.isfinite(got).all(), "float16 logits are not finite"
    assert isinstance(text, str)
    assert want.abs().max() > 5, "the case this test is about: logits far from zero"
    error = (got - want).abs().max().item()
    assert error <= 2e-2 * want.abs().max().item(), f"float16 logits off by {error:.4g}"


# -- row and column scales (the tied embedder quantized while loading) --------------------------


def test_column_scales_are_each_columns_peak_over_the_largest() -> None:
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(300, 48, generator=generator) * 0.02
    weight[:, 7] *= 40.0  # a massive hidden dimension, as Gemma's embedders have
    weight[:, 9] = 0.0
    columns = column_scales(weight)
    assert columns.dtype == torch.float32 and float(columns[7]) == 1.0
    torch.testing.assert_close(columns[:7], weight[:, :7].abs().amax(0) / weight[:, 7].abs().max())
    assert float(columns[9]) > 0  # an all-zero column divides to zeros, not NaN
    assert torch.equal(column_scales(torch.zeros(3, 4)), torch.ones(4))


def test_column_scales_cut_the_error_of_a_weight_with_a_massive_column() -> None:
    """Per-row scales spend the int8 range on the massive column; with column scales every column
    gets its own: the mean squared error falls ~7x here."""
    generator = torch.Generator().manual_seed(12)
    weight = torch.randn(512, 64, generator=generator) * 0.02
    weight[:, 3] *= 30.0
    q, scaler = quantize_rows(weight, torch.float32)
    per_row_error = (dequantize_rows(q, scaler, torch.float32) - weight).pow(2).mean()
    columns = column_scales(weight)
    q, scaler = quantize_rows(weight, torch.float32, columns=columns)
    column_error = (dequantize_rows(q, scaler, torch.float32, columns) - weight).pow(2).mean()
    assert column_error * 5 < per_row_error, (column_error, per_row_error)


def test_column_scaled_nan_is_refused_with_its_count() -> None:
    from gemma_profiles.engine.loading import _NonFinite

    weight = torch.randn(20, 8)
    weight[3, 2] = float("nan")
    with pytest.raises(_NonFinite) as caught:
        quantize_rows(weight, torch.float32, finite=True, columns=column_scales(weight))
    assert caught.value.count == 1


def test_per_row_gives_gemmas_format_of_column_scaled_weights() -> None:
    weight = sources()["trained-like"]
    columns = column_scales(weight)
    q, scaler = quantize_rows(weight, torch.float32, columns=columns)
    exact = dequantize_rows(q, scaler, torch.float32, columns)
    q2, scaler2 = per_row(q, scaler, columns)
    assert q2.dtype == torch.int8 and scaler2.shape == (weight.shape[0],)
    assert_quantized_within_half_a_step(exact, q2, scaler2, "per_row")


# -- scales per group of columns (the native kernel's AVX2 path) -------------------------------


def test_quantize_groups_is_per_row_quantization_of_each_group() -> None:
    from gemma_profiles.engine.loading import quantize_groups

    source = weights(6, 256, seed=13)
    q, groups = quantize_groups(source, 64)
    assert q.dtype == torch.int8 and groups.shape == (6, 4) and groups.dtype == torch.float32
    want_q, want_scales = quantize_rows(source.reshape(24, 64), torch.float32)
    assert torch.equal(q.reshape(24, 64), want_q) and torch.equal(groups.reshape(24), want_scales)
    bad = source.clone()
    bad[2, 100] = float("nan")
    from gemma_profiles.engine.loading import _NonFinite

    with pytest.raises(_NonFinite):
        quantize_groups(bad, 64, finite=True)


def test_per_row_of_a_grouped_weight_is_gemmas_format_of_its_values() -> None:
    from gemma_profiles.engine.loading import quantize_groups

    source = weights(5, 128, seed=14)
    q, groups = quantize_groups(source, 64)
    dense = dequantize_rows(q, groups.amax(1), torch.float32, groups=groups)
    assert torch.equal(dense, (q.float().view(5, 2, 64) * groups.unsqueeze(2)).view(5, 128))
    rows_q, rows_scale = per_row(q, groups.amax(1), groups=groups)
    assert_quantized_within_half_a_step(dense, rows_q, rows_scale)


def _linears(model: Any) -> list[Any]:
    return [m for m in model.modules() if surgery.original_class(m).__name__ == "Linear"]


def test_an_int8_model_on_the_avx2_path_keeps_a_scale_per_64_columns(
    gemma: Any,
    tokenizer_path: str,
    tmp_path: Path,
    profile: Callable[[str], str],
    write_profile: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loaded for the native kernel's AVX2 path, the decoder's linears are quantized per group of
    64 columns, and its logits are closer to the float model's than per-row int8's (the same model
    with the native kernels off: gemma's per-row format); ``state_dict()`` is gemma's format."""
    from gemma_testing import cpu_profile, write_random_checkpoint

    from gemma_profiles.engine import native
    from gemma_profiles.engine.loading import INT8_GROUP_COLUMNS

    native.reset()
    if not native.grouped_path():
        pytest.skip(f"the native kernel's AVX2 path does not run here: {native.unavailable() or native.int8_path()}")
    path = tmp_path / "float.ckpt"
    hidden = 128
    state = write_random_checkpoint(build(gemma, tokenizer_path, hidden=hidden), path, torch.float32, seed=15)
    for name, tensor in state.items():  # a few large input dimensions, as trained models have
        if tensor.dim() == 2 and "embedder" not in name:
            tensor[:, :8] *= 8.0
    torch.save({"model_state_dict": state}, path)
    models = {}
    for name, switch, weights_profile in (
        ("float", "1", cpu_profile(write_profile, "float32")),
        ("grouped", "1", profile("float32")),
        ("per row", "0", profile("float32")),
    ):
        monkeypatch.setenv(native.ENV, switch)
        native.reset()
        with gemma_profiles.use(weights_profile):
            model = build(gemma, tokenizer_path, hidden=hidden)
            model.load_weights(str(path))
        models[name] = model.eval()
        monkeypatch.delenv(native.ENV)
        native.reset()
    packed = [m.__dict__.get("_gemma_profile_int8") for m in _linears(models["grouped"])]
    assert packed and all(p is not None and p.group == INT8_GROUP_COLUMNS for p in packed)
    assert all("_gemma_profile_int8" not in m.__dict__ for m in _linears(models["per row"]))
    assert all(m._buffers.get("weight_group_scaler") is None for m in _linears(models["per row"]))
    want, _, _ = first_logits_and_all_finite(models["float"])
    errors = {}
    for name in ("grouped", "per row"):
        got, finite, _ = first_logits_and_all_finite(models[name])
        assert finite
        errors[name] = (got - want).abs().max().item()
    assert errors["grouped"] < 0.8 * errors["per row"], errors
    # state_dict(): gemma's per-row format (rounded once more), which gemma's own loader reads
    saved = models["grouped"].state_dict()
    assert not any(name.endswith("group_scaler") for name in saved)
    for name, module in models["grouped"].named_modules():
        if surgery.original_class(module).__name__ == "Linear":
            assert saved[name + ".weight"].dtype == torch.int8 and saved[name + ".weight_scaler"].dim() == 1


def test_a_grouped_linear_off_the_avx2_path_becomes_per_row() -> None:
    """`to_per_row`: what the quantization builtin does to a grouped weight that will not run on
    the kernel computing groups (a weight moved since loading, another kernel)."""
    from gemma_profiles.engine.loading import GROUP_SCALER, quantize_groups
    from gemma_profiles.engine.quantization import to_per_row

    source = weights(8, 128, seed=16)
    q, groups = quantize_groups(source, 64)
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(q.clone(), requires_grad=False)
    module.weight_scaler = torch.nn.Parameter(groups.amax(1), requires_grad=False)
    module.register_buffer(GROUP_SCALER, groups, persistent=False)
    to_per_row(module)
    assert GROUP_SCALER not in module._buffers
    want_q, want_scale = per_row(q, groups.amax(1), groups=groups)
    assert torch.equal(module.weight, want_q) and torch.equal(module.weight_scaler, want_scale)


def test_the_scratch_buffer_made_under_inference_mode_serves_a_forward_outside_it() -> None:
    """gemma's generate runs under inference mode; the int8 scratch buffer it first allocates is
    then used by a plain forward too (a test, a script's own call): it must be a normal tensor
    (an inference tensor cannot be written outside inference mode)."""
    from gemma_profiles.engine import quantization

    quantization._scratch.clear()
    q, scaler = quantize_rows(weights(8, 64, seed=17), torch.float32)
    x = activations(1, 64, 1.0)
    with torch.inference_mode():
        inside = int8_linear(x, q, scaler)
    outside = int8_linear(x, q, scaler)
    assert torch.equal(inside, outside)
    assert_near(outside, reference(x, q, scaler), 1e-5)
