"""The native int8 kernel (gemma_profiles/engine/csrc/int8_matmul.c): layout, numerics, build failures."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import gemma_profiles
from gemma_profiles.engine import build, native


@pytest.fixture(autouse=True)
def forget_the_library() -> Iterator[None]:
    """Tests here switch CC, GEMMA_PROFILE_NATIVE and the architecture: later tests start afresh."""
    yield
    native.reset()


@pytest.fixture
def kernel() -> None:
    native.reset()
    if native.unavailable():
        pytest.skip(f"native int8 kernel: {native.unavailable()}")


def quantized(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    return weight, torch.rand(n, generator=generator) * 0.01 + 1e-4


@pytest.mark.parametrize(
    ("k", "columns"), [(63, 64), (2048, 2048), (4096, 4096), (4097, 2112), (9216, 3072), (16384, 4096), (32768, 4096)]
)
def test_column_chunks(k: int, columns: int) -> None:
    assert native.chunk_columns(k) == columns


# (8, 5000): two chunks, the second padded; (12, 16384): four chunks (gemma 2b's down_proj width)
@pytest.mark.parametrize(("n", "k"), [(7, 63), (37, 100), (64, 2048), (12, 4096), (1, 64), (8, 5000), (12, 16384)])
def test_layout_round_trip_and_row_lookup(kernel: None, n: int, k: int) -> None:
    weight, scaler = quantized(n, k)
    packed = native.Int8Weight.pack(weight, scaler)
    columns = native.chunk_columns(k)
    assert packed.data.shape == (-(-k // columns), -(-n // 4), columns // 64, 4, 64)
    assert torch.equal(packed.unpack(), weight)
    ids = torch.tensor([[0, n - 1, n // 2], [n - 1, 0, 0]])
    assert torch.equal(packed.rows(ids), weight[ids])
    assert torch.equal(packed.sums, weight.sum(dim=1, dtype=torch.int32))
    # In place (what loading does with the parameter it drops): same layout, no second copy
    # when no padding is needed.
    scratch = weight.clone()
    in_place = native.Int8Weight.pack(scratch, scaler, in_place=True)
    assert torch.equal(in_place.data, packed.data) and torch.equal(in_place.unpack(), weight)
    assert (in_place.data.data_ptr() == scratch.data_ptr()) is (n % 4 == 0 and k % columns == 0)


@pytest.mark.parametrize(
    ("m", "n", "k"),
    [
        *[(1, 7, 63), (2, 37, 100), (3, 64, 2048), (5, 256, 4096), (1, 4, 32768), (3, 9, 5000), (2, 64, 16384)],
        *[(4, 12, 5000), (6, 9, 16384), (7, 5, 640)],  # pairs of rows and a last odd row, across chunks
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_matches_the_dequantized_product(kernel: None, m: int, n: int, k: int, dtype: torch.dtype) -> None:
    weight, scaler = quantized(n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[0, k // 3] = 50.0  # an outlier: the per-row scale follows the largest value
    exact = x.double() @ (weight.double() * scaler.double().unsqueeze(1)).t()
    got = native.Int8Weight.pack(weight, scaler).matmul(x)
    assert got.dtype == dtype and got.shape == (m, n)
    # float32: 24-bit activations, exact integer sums; bfloat16: the output's own rounding.
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < tolerance


@pytest.mark.parametrize(("n", "k"), [(7, 63), (37, 100), (64, 2048), (9, 5000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_go_through_the_dequantized_weight(
    kernel: None, monkeypatch: pytest.MonkeyPatch, n: int, k: int, dtype: torch.dtype
) -> None:
    weight, scaler = quantized(n, k)
    scaler = scaler.to(dtype)  # a parameter of the model's dtype, as in gemma
    packed = native.Int8Weight.pack(weight, scaler)
    # Rounded as gemma's own int8 Linear rounds ``weight * weight_scaler`` in the model dtype.
    assert torch.equal(packed.dequantize(dtype), weight * scaler.unsqueeze(-1))
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    by_kernel = packed.matmul(x)
    monkeypatch.setattr(native, "DEQUANTIZE_ROWS", 10)
    monkeypatch.setattr(native, "DEQUANTIZE_ROWS_AVX2", 10)
    by_gemm = packed.matmul(x)
    assert by_gemm.shape == by_kernel.shape == (2, 5, n) and by_gemm.dtype == dtype
    exact = x.double() @ (weight.double() * scaler.double().unsqueeze(1)).t()
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    for got in (by_kernel, by_gemm):
        assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < tolerance


def test_the_kernel_runs_on_an_avx2_cpu() -> None:
    """A CPU with AVX2 and FMA runs the kernel (its float32 path without AVX-512 VNNI): the
    kernel is not left to AVX-512 machines only, where CI never runs it."""
    import platform
    import shutil

    from gemma_testing import cpu_flags

    flags = cpu_flags()
    if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= flags:
        pytest.skip("not an x86-64 CPU with AVX2 and FMA")
    if not shutil.which(os.environ.get("CC") or "cc") or os.environ.get(native.ENV) == "0":
        pytest.skip("no C compiler, or the kernels are turned off")
    native.reset()
    assert native.unavailable() is None
    assert native.int8_path() == ("avx512-vnni" if "avx512_vnni" in flags else "avx2")


def test_a_bfloat16_prompt_on_the_avx2_path_multiplies_in_float32(
    kernel: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without AVX-512 torch's bfloat16 GEMM is slow: the AVX2 path's prompt products widen to
    float32 (the VNNI path keeps bfloat16: AVX-512 BF16 CPUs have oneDNN's fast kernel)."""
    weight, scaler = quantized(12, 640)
    packed = native.Int8Weight.pack(weight, scaler)
    x = torch.randn(3, 640, generator=torch.Generator().manual_seed(3)).bfloat16()
    monkeypatch.setattr(native, "DEQUANTIZE_ROWS", 2)
    monkeypatch.setattr(native, "DEQUANTIZE_ROWS_AVX2", 2)
    got = packed.matmul(x)
    dense = packed.dequantize(torch.float32)
    if native.int8_path() == "avx2":
        assert torch.equal(got, torch.nn.functional.linear(x.float(), dense).bfloat16())
    else:
        assert torch.equal(got, torch.nn.functional.linear(x, packed.dequantize(torch.bfloat16)))


def test_matmul_shapes(kernel: None) -> None:
    weight, scaler = quantized(8, 128)
    packed = native.Int8Weight.pack(weight, scaler)
    x = torch.randn(2, 3, 128)
    torch.testing.assert_close(packed.matmul(x), packed.matmul(x.reshape(6, 128)).reshape(2, 3, 8))
    assert packed.matmul(torch.randn(0, 128)).shape == (0, 8)
    strided = torch.randn(128, 4).t()  # not contiguous
    torch.testing.assert_close(packed.matmul(strided), packed.matmul(strided.contiguous()))
    zeros = packed.matmul(torch.zeros(1, 128))
    assert torch.equal(zeros, torch.zeros(1, 8))


def test_turned_off_and_build_failures(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(native.ENV, "0")
    native.reset()
    assert native.unavailable() == "turned off (GEMMA_PROFILE_NATIVE=0)"
    monkeypatch.delenv(native.ENV)
    native.reset()
    with pytest.raises(build.Unavailable, match=r"no C compiler \('no-such-cc' not found; set CC\)"):
        build.build("no-such-cc", tmp_path)
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'decode.c:1: error: no AVX-512 here' >&2\nexit 1\n")
    failing.chmod(failing.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(build.Unavailable, match=r"failed: decode\.c:1: error: no AVX-512 here"):
        build.build(str(failing), tmp_path)
    assert not list(tmp_path.glob("*.so*")), "no partial library left behind"
    monkeypatch.setenv("CC", str(failing))
    native.reset()
    assert "failed" in str(native.unavailable())


def test_build_is_cached(kernel: None, tmp_path: Path) -> None:
    first = build.build(folder=tmp_path)
    mtime = os.stat(first).st_mtime_ns
    assert build.build(folder=tmp_path) == first and os.stat(first).st_mtime_ns == mtime


def int8_cpu_model(
    gemma: Any, tokenizer: str, write_profile: Callable[..., Path], folder: Path, dtype: str, seed: int
) -> tuple[Any, Any]:
    """A tiny 2b loaded from a random float32 checkpoint under a CPU int8 profile computing in ``dtype``."""
    from gemma_testing import tiny_config, write_random_checkpoint

    config = tiny_config(gemma.config, "2b", tokenizer, dtype=dtype)
    ckpt = folder / "m.ckpt"
    write_random_checkpoint(gemma.model.GemmaForCausalLM(config), str(ckpt), torch.float32, seed=seed)
    path = write_profile(
        "int8-cpu",
        f"description: t\nplacement: {{device: cpu}}\nconfig: {{dtype: {dtype}}}\nquantization: {{weights: int8}}\n",
    )
    with gemma_profiles.use(str(path)):
        torch.set_default_dtype(config.get_dtype())
        try:
            model = gemma.model.GemmaForCausalLM(config)
        finally:
            torch.set_default_dtype(torch.float32)
        model.load_weights(str(ckpt))
    return model, config


def test_a_model_without_the_kernel_says_why(
    gemma: Any,
    tokenizer_path: str,
    write_profile: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    log_messages: list[str],
) -> None:
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing built there yet
    native.reset()
    int8_cpu_model(gemma, tokenizer_path, write_profile, tmp_path, "bfloat16", seed=1)
    assert any("no native kernel here: no C compiler ('no-such-cc' not found; set CC)" in m for m in log_messages)
    assert any("on the _weight_int8pack_mm" in m for m in log_messages)


def test_a_hanging_compiler_gives_torchs_kernels_and_one_line(
    gemma: Any,
    tokenizer_path: str,
    write_profile: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    log_messages: list[str],
) -> None:
    """A compiler that never finishes: the model loads on torch's int8 path after the time limit (no stall)."""
    import time

    hanging = tmp_path / "hanging-cc"
    hanging.write_text("#!/bin/sh\nsleep 600\n")
    hanging.chmod(hanging.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(hanging))
    monkeypatch.setenv(build.BUILD_TIMEOUT_ENV, "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native.reset()
    started = time.monotonic()
    int8_cpu_model(gemma, tokenizer_path, write_profile, tmp_path, "bfloat16", seed=1)
    assert time.monotonic() - started < 60
    why = [m for m in log_messages if "int8: no native kernel here" in m]
    assert len(why) == 1 and "hanging-cc took over 1 s: stopped it" in why[0], why
    assert any("on the _weight_int8pack_mm" in m for m in log_messages)


def test_int8_model_state_dict_round_trip(
    kernel: None, gemma: Any, tokenizer_path: str, write_profile: Callable[..., Path], tmp_path: Path
) -> None:
    model, config = int8_cpu_model(gemma, tokenizer_path, write_profile, tmp_path, "float32", seed=2)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.weight.dim() == 5, "the kernel's layout"
    state = model.state_dict()
    weight, scaler = state["model.layers.0.mlp.down_proj.weight"], state["model.layers.0.mlp.down_proj.weight_scaler"]
    assert weight.dtype == torch.int8 and weight.shape == (config.hidden_size, config.intermediate_size)
    x = torch.randn(1, config.intermediate_size)
    by_rows = x @ (weight.float() * scaler.unsqueeze(1)).t()
    packed = layer.__dict__["_gemma_profile_int8"]
    if packed.groups is not None:
        # a scale per group of columns (the AVX2 path): state_dict() is gemma's per-row format of
        # those values, one rounding away; loading it back drops the groups
        torch.testing.assert_close(layer(x), x @ packed.dequantize(torch.float32).t(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), by_rows, rtol=0.05, atol=0.05 * by_rows.abs().max().item())
    else:
        torch.testing.assert_close(layer(x), by_rows, rtol=1e-5, atol=1e-5)
    state["model.layers.0.mlp.down_proj.weight"] = -weight
    model.load_state_dict(state)
    assert layer.__dict__["_gemma_profile_int8"].groups is None
    torch.testing.assert_close(layer(x), -by_rows, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.state_dict()["model.layers.0.mlp.down_proj.weight"], -weight)
    state["model.layers.0.mlp.down_proj.weight"] = weight[:, :8]
    with pytest.raises(RuntimeError, match=r"size mismatch for model\.layers\.0\.mlp\.down_proj\.weight"):
        model.load_state_dict(state)


def test_the_planner_knows_when_the_embedder_stays_int8(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gemma_profiles.planning.hardware import native_int8_expected, native_int8_path
    from gemma_profiles.planning.memory import ModelShape, estimate_memory

    monkeypatch.setenv("CC", "sh")  # any program on PATH stands for a compiler here
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no build of it remembered
    native.reset()  # nothing tried in this process yet (else the planner reads what the engine found)
    assert native_int8_expected(("avx2", "avx512f", "avx512_vnni"))
    assert native_int8_expected(("avx2", "avx512f")), "the AVX2 path"
    assert native_int8_expected(("avx2",))
    assert not native_int8_expected(())
    assert native_int8_path(("avx2", "avx512f", "avx512_vnni")) == "avx512-vnni"
    assert native_int8_path(("avx2",)) == "avx2"
    assert native_int8_path(()) is None
    monkeypatch.setenv(native.ENV, "0")
    assert not native_int8_expected(("avx512_vnni",))
    monkeypatch.delenv(native.ENV)
    monkeypatch.setenv("CC", "no-such-cc")
    assert not native_int8_expected(("avx512_vnni",))

    shape = ModelShape.of_variant("2b")

    def embedder(**kwargs: Any) -> int:
        estimate = estimate_memory(shape, int8=True, device="cpu", **kwargs)
        return next(item.bytes for item in estimate.items if item.component == "embedder (tied output)")

    int8_bytes = shape.embedding_weights + shape.vocab_size * 4
    assert embedder(dtype="float32", cpu_int8_kernel=True) == int8_bytes
    assert embedder(dtype="float32", cpu_int8_kernel=False) == shape.embedding_weights * 4
    assert embedder(dtype="bfloat16") == shape.embedding_weights + shape.vocab_size * 2


def test_not_tried_on_other_architectures(monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    native.reset()
    assert native.unavailable() == "x86-64 AVX2/AVX-512 kernels; this CPU is aarch64"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_while_loading_gives_the_torch_result_bit_for_bit(
    kernel: None, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gemma_profiles.engine.loading import quantize_rows

    generator = torch.Generator().manual_seed(4)
    for n, k in [(7, 63), (300, 2048), (9000, 100), (5, 16384)]:
        weight = (torch.randn(n, k, generator=generator) * torch.rand(n, 1, generator=generator) * 3).to(dtype)
        weight[0, 0] = 0.0
        weight[-1] = 0.0  # an all-zero row: the 1e-12 floor
        fast = quantize_rows(weight, torch.float32)
        monkeypatch.setenv(native.ENV, "0")
        native.reset()
        reference = quantize_rows(weight, torch.float32)  # torch, chunk by chunk
        monkeypatch.delenv(native.ENV)
        native.reset()
        assert torch.equal(fast[0], reference[0]) and torch.equal(fast[1], reference[1]), (n, k)


# -- scales per group of columns (the AVX2 path) ------------------------------------------------


@pytest.fixture
def grouped_kernel(kernel: None) -> None:
    if not native.grouped_path():
        pytest.skip(f"scales per group run on the AVX2 path only; this CPU runs {native.int8_path()}")


def grouped(n: int, k: int, group: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gemma_profiles.engine.loading import quantize_groups

    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(n, k, generator=generator) * 0.02
    source[:, : k // 3] *= 10.0  # groups of very different sizes: one row scale would waste them
    q, groups = quantize_groups(source, group)
    dense = (q.double().view(n, k // group, group) * groups.double().unsqueeze(2)).view(n, k)
    return q, groups, dense


@pytest.mark.parametrize(
    ("k", "group", "fits"),
    [
        (64, 64, True),
        (640, 128, True),
        (640, 64, True),
        (100, 64, False),
        (192, 128, False),
        (16384, 64, True),
        (4160, 64, True),
        (4160, 128, False),
        (0, 64, False),
        (64, 32, False),
    ],
)
def test_which_groups_fit_the_layout(k: int, group: int, fits: bool) -> None:
    # 4160: 2 chunks of 2112 columns (the second padded): 64 divides both, 128 does not divide 4160
    assert native.groups_fit(k, group) is fits


@pytest.mark.parametrize(
    ("m", "n", "k", "group"),
    [(1, 7, 64, 64), (2, 37, 640, 128), (3, 64, 2048, 64), (5, 9, 16384, 64), (1, 12, 4160, 64), (4, 5, 640, 64)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matmul_matches_the_dequantized_product(
    grouped_kernel: None, m: int, n: int, k: int, group: int, dtype: torch.dtype
) -> None:
    q, groups, dense = grouped(n, k, group, seed=m)
    packed = native.Int8Weight.pack(q, groups.amax(1), groups=groups)
    assert packed.group == group and torch.equal(packed.unpack(), q)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    exact = x.double() @ dense.t()
    got = packed.matmul(x)
    assert got.dtype == dtype and got.shape == (m, n)
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < tolerance
    if k > group:  # the row scale alone would be far off: the groups are used
        by_row = x.double() @ (q.double() * groups.double().amax(1, keepdim=True)).t()
        assert ((by_row - exact).abs().max() / exact.abs().max()).item() > 0.1
    # a prompt: the dequantized weight through a float32 GEMM
    assert torch.equal(packed.dequantize(torch.float32), dense.float())
    assert torch.equal(packed.dequantize(torch.bfloat16), dense.float().bfloat16())


def test_a_grouped_prompt_goes_through_the_dequantized_weight(
    grouped_kernel: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, groups, dense = grouped(12, 640, 64)
    packed = native.Int8Weight.pack(q, groups.amax(1), groups=groups)
    x = torch.randn(2, 3, 640, generator=torch.Generator().manual_seed(2)).bfloat16()
    by_kernel = packed.matmul(x)
    monkeypatch.setattr(native, "DEQUANTIZE_ROWS", 4)
    monkeypatch.setattr(native, "DEQUANTIZE_ROWS_AVX2", 4)
    by_gemm = packed.matmul(x)
    assert torch.equal(by_gemm, torch.nn.functional.linear(x.float(), dense.float()).bfloat16())
    torch.testing.assert_close(by_kernel, by_gemm, rtol=8e-3, atol=1e-3)


def test_groups_that_do_not_fit_are_refused(kernel: None) -> None:
    q, groups, _ = grouped(8, 640, 128)
    with pytest.raises(ValueError, match="group scales of shape"):
        native.Int8Weight.pack(q, groups.amax(1), groups=groups[:4])
    with pytest.raises(ValueError, match="group scales of shape"):
        native.Int8Weight.pack(q[:, :600], groups.amax(1), groups=groups)


def test_the_kernel_refuses_groups_outside_its_contract(grouped_kernel: None) -> None:
    """The C entry point checks what Python checks: a group that straddles a chunk is -1, not a
    wrong answer."""
    library = native._library()
    assert not isinstance(library, str)
    q, groups, _ = grouped(4, 640, 64)
    packed = native.Int8Weight.pack(q, groups.amax(1), groups=groups)
    x, y = torch.randn(1, 640), torch.empty(1, 4)
    weight = packed._pointers[0]
    call = library.gp_int8_matmul_grouped
    assert call(x.data_ptr(), 0, 1, 640, weight, 4, packed.kc, groups.data_ptr(), 64, y.data_ptr(), 0) == 0
    for bad_group in (0, 32, 96, 128 * 3, 1280):
        assert call(x.data_ptr(), 0, 1, 640, weight, 4, packed.kc, groups.data_ptr(), bad_group, y.data_ptr(), 0) == -1


# Rows 1..9 and an odd 13 against weights of one chunk, of several (16384: four of 4096), with
# rows past a multiple of 4 (n = 37, 9) and two group sizes: the two-row loop, its odd last row,
# and carried partial sums across chunks.
@pytest.mark.parametrize(("n", "k", "group"), [(37, 640, 64), (9, 16384, 64), (12, 4160, 64), (8, 2048, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_rows_in_pairs_give_each_rows_own_result(
    grouped_kernel: None, n: int, k: int, group: int, dtype: torch.dtype
) -> None:
    """The AVX2 grouped kernel takes rows of x two at a time (each widened weight feeds both): every
    row's result is the one it gets alone, bit for bit (the same FMAs in the same order), and the
    float64 product's within float32 rounding."""
    q, groups, dense = grouped(n, k, group, seed=n)
    packed = native.Int8Weight.pack(q, groups.amax(1), groups=groups)
    x = torch.randn(13, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    x[3, k // 2] = 40.0  # an outlier in one row stays in that row
    alone = torch.cat([packed.matmul(x[m : m + 1]) for m in range(13)])
    exact = x.double() @ dense.t()
    tolerance = 1e-5 if dtype == torch.float32 else 8e-3
    assert ((alone.double() - exact).abs().max() / exact.abs().max()).item() < tolerance
    for m in (*range(1, 10), 13):
        together = packed.matmul(x[:m])
        assert together.shape == (m, n)
        assert torch.equal(together, alone[:m]), m
        rows = torch.arange(m)
        assert torch.equal(packed.matmul(x[rows.flip(0)]), alone[:m].flip(0)), m  # order of rows is irrelevant
