"""Packed CPU matmuls (the ``kernels`` builtin), against real gemma or the stand-in."""

from __future__ import annotations

import mmap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import gemma_profiles
from gemma_profiles.engine import kernels, surgery
from gemma_profiles.engine.pages import file_backed, release_pages

PROMPTS = ["the cat sees a dog", "two red birds"]


def build(gemma: Any, tokenizer: str, variant: str, dtype: str) -> Any:
    from gemma_testing import tiny_config

    config = tiny_config(gemma.config, variant, tokenizer, dtype=dtype)
    torch.set_default_dtype(config.get_dtype())
    try:
        model = gemma.model.GemmaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model


@pytest.fixture
def checkpoint(gemma: Any, tokenizer_path: str, tmp_path: Path) -> Callable[[str], str]:
    from gemma_testing import write_random_checkpoint

    def make(variant: str, dtype: str = "float32") -> str:
        path = tmp_path / f"{variant}-{dtype}.ckpt"
        if not path.exists():
            model = build(gemma, tokenizer_path, variant, "float32")
            write_random_checkpoint(model, path, getattr(torch, dtype), seed=5)
        return str(path)

    return make


def load(gemma: Any, tokenizer: str, variant: str, dtype: str, ckpt: str) -> Any:
    model = build(gemma, tokenizer, variant, dtype)
    model.load_weights(ckpt)
    return model.to("cpu").eval()


def packed_names(model: Any) -> list[str]:
    return [name for name, module in model.named_modules() if kernels.is_packed(module)]


def cpu_profile(write_profile: Callable[..., Path], dtype: str, extra: str = "") -> str:
    text = f"description: t\nplacement: {{device: cpu}}\nconfig: {{dtype: {dtype}}}\n{extra}"
    return str(write_profile(f"kernels-{dtype}", text))


@pytest.mark.parametrize("variant", ["2b", "2b-v2", "1b"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_model_generates_what_the_plain_one_does(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[[str], str],
    write_profile: Callable[..., Path],
    variant: str,
    dtype: str,
) -> None:
    if kernels.available(getattr(torch, dtype)):
        pytest.skip(str(kernels.available(getattr(torch, dtype))))
    ckpt = checkpoint(variant, dtype)  # in the model's dtype: memory-mapped as it is
    plain = load(gemma, tokenizer_path, variant, dtype, ckpt)
    with gemma_profiles.use(cpu_profile(write_profile, dtype)):
        model = load(gemma, tokenizer_path, variant, dtype, ckpt)
        names = packed_names(model)
        linears = [n for n, m in model.named_modules() if surgery.original_class(m).__name__ == "Linear"]
        assert names and names == linears, "every gemma Linear is packed"
        weights = [model.get_submodule(n).weight for n in names]
        if dtype == "bfloat16" and kernels.native_bf16():  # plain, for the native kernel
            assert all(w.dtype == torch.bfloat16 and w.is_contiguous() and not w.is_mkldnn for w in weights)
        else:
            assert all(w.is_mkldnn for w in weights)
        assert sampler_swapped(model), "the sampler's product runs on a packed copy of the mapped embedder"
        # A batch of prompts of different lengths: prefill (many rows) and decode (one row each).
        out = model.generate(PROMPTS, "cpu", output_len=4, temperature=None)
    expected = plain.generate(PROMPTS, "cpu", output_len=4, temperature=None)
    if dtype == "float32":
        assert out == expected
    for name in names:
        x = torch.randn(3, model.get_submodule(name).weight.shape[1]).to(getattr(torch, dtype))
        got = model.get_submodule(name)(x).float()
        want = plain.get_submodule(name)(x).float()
        tolerance = 1e-5 if dtype == "float32" else 2e-2
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.fixture
def bf16_kernel() -> None:
    from gemma_profiles.engine import native

    native.reset()
    if not kernels.native_bf16():
        pytest.skip(f"native bfloat16 kernel: {native.bf16_unavailable()}")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 17])
@pytest.mark.parametrize(("n", "k"), [(8, 64), (7, 100), (33, 2080), (5, 16384)])
def test_native_bfloat16_product(bf16_kernel: None, rows: int, n: int, k: int) -> None:
    """Up to NATIVE_ROWS rows on the kernel (any n, k: masked tails, short row groups), more on
    F.linear; each output is the float32 sum of bfloat16 products, rounded once to bfloat16."""
    generator = torch.Generator().manual_seed(rows * n + k)
    weight = torch.randn(n, k, generator=generator).to(torch.bfloat16)
    x = torch.randn(2, rows, k, generator=generator).to(torch.bfloat16)
    stored = kernels.pack(weight)
    assert not stored.is_mkldnn and torch.equal(stored, weight)
    got = kernels.packed_linear(x, stored)
    exact = (x.double() @ weight.double().t()).float()
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows, n)
    # float32 accumulation (k products: ~sqrt(k) * 2^-24 relative), then one bfloat16 rounding (2^-9)
    torch.testing.assert_close(got.float(), exact, rtol=2**-8, atol=1e-4 * k**0.5)
    strided = x.transpose(0, 1)  # not contiguous: copied first
    torch.testing.assert_close(kernels.packed_linear(strided, stored), got.transpose(0, 1))
    torch.testing.assert_close(kernels.packed_linear(x.float(), stored), got.float())  # cast both ways
    assert kernels.packed_linear(x[:, :0], stored).shape == (2, 0, n)


def test_the_bfloat16_kernel_runs_on_an_avx2_cpu() -> None:
    """A CPU with AVX2 and FMA runs the native bfloat16 kernel (its AVX2 path without AVX-512
    BF16), so bfloat16 weights no longer wait for oneDNN's bfloat16 GEMM, which is slow there."""
    import os
    import platform
    import shutil

    from gemma_testing import cpu_flags

    from gemma_profiles.engine import native

    flags = cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= flags:
        pytest.skip("not an x86-64 CPU with AVX2 and FMA")
    if not shutil.which(os.environ.get("CC") or "cc") or os.environ.get(native.ENV) == "0":
        pytest.skip("no C compiler, or the kernels are turned off")
    native.reset()
    assert native.bf16_unavailable() is None and kernels.native_bf16()
    avx512 = "avx512_bf16" in flags
    assert kernels.native_path() == ("avx512-bf16" if avx512 else "avx2")
    assert kernels.native_rows() == (kernels.NATIVE_ROWS if avx512 else kernels.NATIVE_ROWS_AVX2)
    assert kernels.available(torch.bfloat16) is None
    assert kernels.kernel_name(torch.bfloat16).startswith("the native bfloat16 kernel")


def _native(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``gp_bf16_matmul`` called directly (any number of rows, no routing)."""
    from gemma_profiles.engine import native

    library = native.bf16_library()
    assert not isinstance(library, str), library
    (n, k), rows = weight.shape, x.shape[0]
    y = torch.empty(rows, n, dtype=torch.bfloat16)
    assert library.gp_bf16_matmul(x.data_ptr(), rows, k, weight.data_ptr(), n, y.data_ptr()) == 0
    return y


def _assert_bf16_product(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """``got`` is ``x.float() @ weight.float().T`` rounded to bfloat16, within two bfloat16 ulps
    (float32 sums in another order can round the other way) plus the float32 error of the sum
    (relative 2^-20 of the sum of |products|, for results that cancel to near zero)."""
    reference = x.float() @ weight.float().t()
    rounded = reference.bfloat16().float()
    ulp = torch.ldexp(torch.ones_like(rounded), torch.frexp(rounded).exponent - 8)  # bfloat16: 8 bits
    magnitude = x.float().abs() @ weight.float().abs().t()
    assert got.dtype == torch.bfloat16 and got.shape == reference.shape
    error = (got.float() - rounded).abs()
    assert bool((error <= 2 * ulp + magnitude * 2**-20).all()), (error - 2 * ulp).max()


@pytest.mark.parametrize("k", [1, 7, 8, 15, 16, 17, 31, 33, 100, 640, 2047, 2049, 4100])
@pytest.mark.parametrize("n", [1, 3, 5, 8, 13])
def test_native_bfloat16_tails(bf16_kernel: None, n: int, k: int) -> None:
    """Columns past a multiple of 16/32 and short row groups (n not a multiple of 4), on one row
    of x (below and above 2048 columns: one row of w at a time, or four side by side) and on
    every row count up to the native kernel's limit and one past it (the kernel takes any)."""
    generator = torch.Generator().manual_seed(n * 10000 + k)
    weight = torch.randn(n, k, generator=generator).to(torch.bfloat16)
    for rows in range(1, kernels.native_rows() + 2):
        x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
        _assert_bf16_product(_native(x, weight), x, weight)


@pytest.mark.parametrize("k", [40, 2080])
def test_native_bfloat16_nan_and_inf(bf16_kernel: None, k: int) -> None:
    """NaN and infinities propagate as in the float32 product: a NaN input makes its whole
    output row (x) or column (w) NaN, an infinity gives +-inf, or NaN where inf meets 0 or -inf."""
    generator = torch.Generator().manual_seed(k)
    weight = torch.randn(9, k, generator=generator).to(torch.bfloat16)
    for rows in (1, 3, 5):
        x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
        x[:, 0] = x[:, k - 2] = 1.0
        x[0, k - 1] = float("nan")  # in a tail column
        weight[2, 3] = float("inf")
        weight[4, k // 2] = float("-inf")
        weight[6, 0] = float("inf")
        weight[6, k - 2] = float("-inf")  # inf + -inf: NaN
        if rows > 1:
            x[1, 0] = 0.0  # 0 * inf: NaN in row 1, column 6
        got = _native(x, weight).float()
        reference = x.float() @ weight.float().t()
        assert torch.equal(got.isnan(), reference.isnan()), (got, reference)
        assert torch.equal(got.isposinf(), reference.isposinf()) and torch.equal(got.isneginf(), reference.isneginf())
        assert got[0].isnan().all() and got[:, 6].isnan().all()
        clean = [0, 1, 3, 5, 7, 8]  # rows of w without an infinity; rows of x past the first have no NaN
        _assert_bf16_product(got[1:, clean].bfloat16(), x[1:], weight[clean])


@pytest.mark.parametrize(("n", "k"), [(70, 100), (33, 2080), (1000, 64)])
def test_a_long_input_widens_the_weight_to_float32(
    bf16_kernel: None, monkeypatch: pytest.MonkeyPatch, n: int, k: int
) -> None:
    """More rows than the native kernel takes: on the AVX2 path the weight is widened to float32
    a block of rows at a time (here small blocks, the last one short) for torch's float32 GEMM;
    the result is the float32 product rounded once to bfloat16, also inside inference mode (the
    reused block buffer is an ordinary tensor either way) and for inputs of more dimensions."""
    monkeypatch.setattr(kernels, "WIDEN_BYTES", 4 * k * 16)  # blocks of 16 rows
    generator = torch.Generator().manual_seed(n + k)
    weight = kernels.pack(torch.randn(n, k, generator=generator).to(torch.bfloat16))
    x = torch.randn(2, kernels.native_rows(), k, generator=generator).to(torch.bfloat16)
    flat = x.reshape(-1, k)
    wide = kernels.widened_linear(flat, weight)
    assert torch.equal(wide, (flat.float() @ weight.float().t()).bfloat16())
    _assert_bf16_product(wide, flat, weight)
    with torch.inference_mode():
        assert torch.equal(kernels.widened_linear(flat, weight), wide)
    got = kernels.packed_linear(x, weight)
    assert got.shape == (2, kernels.native_rows(), n)
    if kernels.native_path() == "avx2":
        assert torch.equal(got.reshape(-1, n), wide)
    else:
        assert torch.equal(got, torch.nn.functional.linear(x, weight))


def test_a_long_input_on_the_avx2_path_never_reaches_bfloat16_f_linear(
    bf16_kernel: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the kernel runs its AVX2 path, a prompt's bfloat16 product is never torch's bfloat16
    GEMM (9.5x slower than float32 there); up to the row limit it is the native kernel."""
    if kernels.native_path() != "avx2":
        pytest.skip("the AVX-512 BF16 path sends prompts to oneDNN's bfloat16 GEMM")

    def refuse(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("bfloat16 F.linear")

    monkeypatch.setattr(torch.nn.functional, "linear", refuse)
    weight = kernels.pack(torch.randn(24, 640).to(torch.bfloat16))
    for rows in (1, kernels.native_rows(), kernels.native_rows() + 1, 300):
        x = torch.randn(rows, 640).to(torch.bfloat16)
        _assert_bf16_product(kernels.packed_linear(x, weight), x, weight)


@pytest.fixture
def without_native(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``GEMMA_PROFILE_NATIVE=0``, the library's cached state forgotten before and after; skips
    where oneDNN has no bfloat16 kernels either."""
    from gemma_profiles.engine import native

    monkeypatch.setenv("GEMMA_PROFILE_NATIVE", "0")
    native.reset()
    try:
        if kernels.available(torch.bfloat16):
            pytest.skip(str(kernels.available(torch.bfloat16)))
        yield
    finally:
        monkeypatch.delenv("GEMMA_PROFILE_NATIVE")
        native.reset()


def test_without_the_native_library_bfloat16_goes_to_onednn(without_native: None) -> None:
    assert not kernels.native_bf16()
    assert kernels.pack(torch.randn(8, 64).to(torch.bfloat16)).is_mkldnn
    assert kernels.kernel_name(torch.bfloat16) == "oneDNN-packed weights"


def test_without_the_native_library_a_bfloat16_model_says_why(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[[str], str],
    write_profile: Callable[..., Path],
    log_messages: list[str],
    without_native: None,
) -> None:
    with gemma_profiles.use(cpu_profile(write_profile, "bfloat16")):
        model = load(gemma, tokenizer_path, "2b", "bfloat16", checkpoint("2b", "bfloat16"))
    assert all(model.get_submodule(name).weight.is_mkldnn for name in packed_names(model))
    assert any(
        "bfloat16 weights on oneDNN: no native bfloat16 kernel (turned off (GEMMA_PROFILE_NATIVE=0))" in m
        for m in log_messages
    ), log_messages
    assert any("use oneDNN-packed weights" in m for m in log_messages), log_messages


def sampler_swapped(model: Any) -> bool:
    from gemma_profiles.engine.tied import _HOOK

    return _HOOK in model.sampler.__dict__


def test_a_converted_embedder_is_not_copied(
    gemma: Any, tokenizer_path: str, checkpoint: Callable[[str], str], write_profile: Callable[..., Path]
) -> None:
    """float32 checkpoint, bfloat16 model: the embedder is not memory-mapped; a packed copy would double it.
    The native kernel reads it in place instead (tests/test_tied_sampler.py); oneDNN's would need a copy."""
    if kernels.available(torch.bfloat16):
        pytest.skip(str(kernels.available(torch.bfloat16)))
    with gemma_profiles.use(cpu_profile(write_profile, "bfloat16")):
        model = load(gemma, tokenizer_path, "2b", "bfloat16", checkpoint("2b"))
    assert packed_names(model) and sampler_swapped(model) == kernels.native_bf16()


@pytest.mark.parametrize("variant", ["2b", "1b"])
def test_int8_sampler_reads_the_int8_embedder(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[[str], str],
    write_profile: Callable[..., Path],
    variant: str,
    int8_kernel: str,
) -> None:
    with gemma_profiles.use(cpu_profile(write_profile, "bfloat16", "quantization: {weights: int8}\n")):
        model = load(gemma, tokenizer_path, variant, "bfloat16", checkpoint(variant))
        expected = model.generate(PROMPTS, "cpu", output_len=3, temperature=None)
    name = "embedder" if hasattr(model, "embedder") else "text_token_embedder"
    embedder = model.get_submodule(name)
    assert embedder.weight.dtype == torch.int8 and sampler_swapped(model)
    state = embedder.state_dict()
    hidden = torch.randn(2, 1, state["weight"].shape[1]).to(torch.bfloat16)
    args = {
        "hidden_states": hidden,
        "output_positions": torch.tensor([0]),
        "temperatures": None,
        "top_ps": torch.tensor([1.0, 1.0]),
        "top_ks": torch.tensor([1, 1]),
    }
    _, fast = model.sampler(embedding=embedder.weight, **args)
    dense = (state["weight"].float() * state["weight_scaler"].float().unsqueeze(-1)).to(torch.bfloat16)
    _, reference = model.sampler(embedding=dense, **args)  # not the embedder's weight: used as it is
    cosine = torch.nn.functional.cosine_similarity(fast.float().flatten(), reference.float().flatten(), dim=0)
    assert cosine.item() >= 0.999
    assert len(expected) == len(PROMPTS)  # generate ran through the int8 lookup and sampler


def test_sampler_weight_stands_in_for_the_tensor() -> None:
    from gemma_profiles.engine.tied import SamplerWeight

    matrix = torch.randn(7, 3)
    calls: list[torch.Tensor] = []

    def project(hidden: torch.Tensor) -> torch.Tensor:
        calls.append(hidden)
        return hidden @ matrix.t()

    weight = SamplerWeight(lambda: matrix, project, (7, 3), torch.float32)
    hidden = torch.randn(2, 3)
    assert weight.shape == (7, 3) and weight.t().shape == (3, 7) and weight.T.size(1) == 7
    assert weight.t().to(torch.float32).transposed and weight.to("cpu") is weight
    torch.testing.assert_close(torch.matmul(hidden, weight.t()), hidden @ matrix.t())
    torch.testing.assert_close(hidden @ weight.t(), hidden @ matrix.t())
    torch.testing.assert_close(hidden.matmul(weight.t()), hidden @ matrix.t())
    assert len(calls) == 3, "every product went through the kernel"
    # Anything else sees the dense matrix.
    torch.testing.assert_close(torch.sum(weight), matrix.sum())
    torch.testing.assert_close(torch.matmul(weight, hidden.t()), matrix @ hidden.t())
    torch.testing.assert_close(weight.to(torch.float64), matrix.double())
    assert len(calls) == 3


def test_state_dict_round_trip(
    gemma: Any, tokenizer_path: str, checkpoint: Callable[[str], str], write_profile: Callable[..., Path]
) -> None:
    ckpt = checkpoint("2b")
    saved = torch.load(ckpt, weights_only=True)["model_state_dict"]
    with gemma_profiles.use(cpu_profile(write_profile, "float32")):
        model = load(gemma, tokenizer_path, "2b", "float32", ckpt)
    state = model.state_dict()
    assert set(state) == {n for n, _ in model.named_parameters()} | set(dict(model.named_buffers()))
    for name, value in saved.items():
        if name in state:
            assert not state[name].is_mkldnn and torch.equal(state[name], value), name
    # Loading a changed state dict repacks: the module computes with the new weight.
    name = "model.layers.0.mlp.down_proj"
    state[f"{name}.weight"] = torch.ones_like(state[f"{name}.weight"])
    model.load_state_dict(state)
    module = model.get_submodule(name)
    assert module.weight.is_mkldnn
    x = torch.ones(1, module.weight.shape[1])
    torch.testing.assert_close(module(x), torch.full((1, module.weight.shape[0]), float(module.weight.shape[1])))
    wrong = dict(state, **{f"{name}.weight": torch.ones(2, 2)})
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(wrong)


@pytest.mark.parametrize(
    ("extra", "disable"),
    [
        ("quantization: {weights: int8}\n", ""),  # int8 layers keep their own kernel
        ("", "kernels"),  # blocked like any plugin
    ],
    ids=["int8", "disabled"],
)
def test_not_packed(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[[str], str],
    write_profile: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    extra: str,
    disable: str,
) -> None:
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", disable)
    with gemma_profiles.use(cpu_profile(write_profile, "bfloat16", extra)):
        model = load(gemma, tokenizer_path, "2b", "bfloat16", checkpoint("2b"))
    assert packed_names(model) == []


def test_only_on_a_cpu_execution_device(write_profile: Callable[..., Path]) -> None:
    from gemma_profiles.engine.devices import device_problem
    from gemma_profiles.planning.plan import make_plan
    from gemma_profiles.spec.profile import load_profile

    def plan(placement: str) -> Any:
        path = write_profile("where", f"description: t\nplacement: {placement}\n")
        return make_plan(load_profile(str(path)), variant="2b")

    assert plan("{device: cpu}").runs_on_cpu(device_problem)
    assert not plan("{device: 'cuda:0'}").runs_on_cpu(device_problem)
    assert not plan("{device: cpu, offload: disk}").runs_on_cpu(device_problem)
    assert plan("{}").runs_on_cpu(device_problem) is not (torch.cuda.is_available())


def test_packing_hands_the_freed_weight_back_to_the_system(monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight converted while loading lives in the C heap: once copied for the kernel, it is
    freed before the heap is trimmed (glibc kept 138 MiB of Gemma 3 270M's otherwise)."""
    import weakref

    if kernels.available(torch.bfloat16):
        pytest.skip(str(kernels.available(torch.bfloat16)))
    linear = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    module = type("Linear", (torch.nn.Module,), {"quant": False})()  # gemma's Linear, matched by name
    module.weight = linear.weight
    del linear
    source = weakref.ref(module.weight)
    calls: list[bool] = []
    monkeypatch.setattr(kernels, "trim_heap", lambda: calls.append(source() is None) or True)
    kernels.pack_module(module)
    assert calls == [True], "trimmed once, after the source weight was freed"
    assert kernels.is_packed(module)


def test_release_pages_never_zeroes_anonymous_memory(tmp_path: Path) -> None:
    tensor = torch.arange(4 * mmap.PAGESIZE, dtype=torch.uint8)
    start = tensor.data_ptr()
    assert not file_backed(start, start + mmap.PAGESIZE)
    release_pages(tensor)
    assert torch.equal(tensor, torch.arange(4 * mmap.PAGESIZE, dtype=torch.uint8))
    # A memory-mapped checkpoint tensor: pages dropped, contents read back from the file.
    path = tmp_path / "t.pt"
    torch.save({"t": torch.arange(2**20, dtype=torch.float32)}, path)
    mapped = torch.load(path, mmap=True, weights_only=True)["t"]
    assert mapped.sum().item() == sum(range(2**20))
    assert file_backed(mapped.data_ptr() + mmap.PAGESIZE, mapped.data_ptr() + 2 * mmap.PAGESIZE)
    release_pages(mapped)
    assert torch.equal(mapped, torch.arange(2**20, dtype=torch.float32))


@pytest.mark.parametrize("weights", ["none", "int8"])
def test_load_state_dict_reaches_the_sampler(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[[str], str],
    write_profile: Callable[..., Path],
    weights: str,
) -> None:
    """The sampler's packed (or int8) copy of the tied embedder follows a later load_state_dict."""
    dtype = "float32" if weights == "none" else "bfloat16"
    ckpt = checkpoint("2b", "float32")
    with gemma_profiles.use(cpu_profile(write_profile, dtype, f"quantization: {{weights: {weights}}}\n")):
        model = load(gemma, tokenizer_path, "2b", dtype, ckpt)
    assert sampler_swapped(model)
    state = model.state_dict()
    hidden = torch.randn(1, 1, state["embedder.weight"].shape[1]).to(getattr(torch, dtype))
    args = {
        "hidden_states": hidden,
        "output_positions": torch.tensor([0]),
        "temperatures": None,
        "top_ps": torch.tensor([1.0]),
        "top_ks": torch.tensor([1]),
    }
    _, before = model.sampler(embedding=model.embedder.weight, **args)
    state["embedder.weight"] = -state["embedder.weight"]
    model.load_state_dict(state)
    _, after = model.sampler(embedding=model.embedder.weight, **args)
    torch.testing.assert_close(after.float(), -before.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("weights", ["none", "int8"])
def test_moving_a_packed_model_is_one_clear_error(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[[str], str],
    write_profile: Callable[..., Path],
    weights: str,
    int8_kernel: str,
) -> None:
    from gemma_profiles.errors import GemmaProfileError

    with gemma_profiles.use(cpu_profile(write_profile, "bfloat16", f"quantization: {{weights: {weights}}}\n")):
        model = load(gemma, tokenizer_path, "2b", "bfloat16", checkpoint("2b"))
        expected = model.generate(PROMPTS, "cpu", output_len=2, temperature=None)
    layer = model.model.layers[0].mlp.up_proj
    if weights == "none" and kernels.available(torch.bfloat16):
        pytest.skip(str(kernels.available(torch.bfloat16)))  # bfloat16 weights stay plain here
    if weights == "none" or int8_kernel == "native":
        assert kernels.is_packed(layer) or layer.weight.dim() == 5
        model.to("cpu").eval()  # nothing changes: fine
        layer.to(torch.bfloat16)
        if weights == "none":
            with pytest.raises(GemmaProfileError, match="packed for the CPU kernels; they cannot move to float16"):
                model.half()
        with pytest.raises(GemmaProfileError, match="cannot move to meta"):
            layer.to("meta")
        model.to("meta")  # the profile's device (cpu) wins over the call's: nothing moves
        assert model.generate(PROMPTS, "cpu", output_len=2, temperature=None) == expected, "left as it was"
