"""Fused CPU layers (the ``fused`` builtin, csrc/decode.c), against real gemma or the stand-in."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from gemma_testing import cpu_flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kernels import checkpoint, cpu_profile, load  # noqa: F401 (checkpoint: a fixture)

import gemma_profiles
from gemma_profiles.engine import fused, native, surgery
from gemma_profiles.plugin import manager

PROMPTS = ["the cat sees a dog", "two red birds"]
KINDS = ("norms", "MLPs", "attention layers", "sampler")


def torch_only(test: Callable[..., None]) -> Callable[..., None]:
    """A test of this file's own yardsticks, on gemma's forwards: it runs without the kernels."""
    test.torch_only = True  # type: ignore[attr-defined]
    return test


FLAGS = cpu_flags()
AVX2_FMA = {"avx2", "fma"} <= FLAGS
AVX512 = {"avx512f", "avx512bw", "avx512vl"} <= FLAGS
#: The kernels' paths a test of the library runs on: the CPU's own and, on an AVX-512 CPU, AVX2 too.
PATHS = ["cpu", "avx2"] if AVX512 else ["cpu"]


@pytest.fixture(autouse=True)
def kernels_here(request: pytest.FixtureRequest) -> Iterator[None]:
    native.reset()
    reason = fused.unavailable()
    if reason and not getattr(request.function, "torch_only", False):
        # Where the CPU has AVX2 + FMA only a missing compiler or the switch may stop the kernels.
        assert not (AVX2_FMA and reason.startswith("this CPU lacks")), reason
        pytest.skip(f"fused CPU layers: {reason}")
    yield
    native.reset()


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each path of the kernels this CPU runs: ``cpu`` (AVX-512 where it has it) and ``avx2``."""
    library = native.decode_library()
    taken = library.gp_decode_use(2 if request.param == "avx2" else 0)
    assert taken == (2 if request.param == "avx2" or not AVX512 else 1)
    try:
        yield request.param
    finally:
        library.gp_decode_use(0)


def test_the_kernels_run_on_a_cpu_with_avx2_and_fma() -> None:
    """Not AVX-512 only: on an AVX2 + FMA CPU the library says it runs the kernels, and which path."""
    if not AVX2_FMA:
        pytest.skip("this CPU lacks AVX2 + FMA")
    assert fused.unavailable() is None
    library = native.decode_library()
    assert library.gp_decode_supported() == 1
    assert library.gp_decode_path() == (1 if AVX512 else 2)
    assert fused.path() == ("AVX-512" if AVX512 else "AVX2 + FMA")


def fused_kinds(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in model.modules():
        if fused.is_fused(module):
            original = surgery.original_class(module).__name__
            kind = next(k for k, (names, _, _) in fused.KINDS.items() if original in names)
            counts[kind] = counts.get(kind, 0) + 1
    return counts


#: Longer than the tiny configs' sliding window (8, gemma_testing.tiny_config): the window matters.
TOKENS = [2, 17, 33, 5, 60, 12, 40, 9, 21, 7, 44, 3, 18, 50]
#: Cosine similarity to gemma's logits the fused model must reach, by compute dtype.
SAME_AS_GEMMA = {"float32": 0.99999, "bfloat16": 0.999}
NEG = -2.3819763e38  # gemma's mask value


def logits(model: Any, tokens: list[int], *, window: bool = True) -> torch.Tensor:
    """Last-position logits of one forward over ``tokens`` (a fresh KV cache).

    Local (sliding-window) layers get gemma's ``local_mask`` - causal and at most
    ``sliding_window_size`` back - as gemma's ``generate`` builds it; ``window=False``
    passes the global mask instead.
    """
    config = model.config
    length = len(tokens)
    size = (1, length, config.num_key_value_heads, config.head_dim)
    dtype = config.get_dtype()
    caches = [(torch.zeros(size, dtype=dtype), torch.zeros(size, dtype=dtype)) for _ in model.model.layers]
    mask = torch.triu(torch.full((1, 1, length, length), NEG), diagonal=1)
    local = mask
    if window and config.sliding_window_size:
        local = mask + torch.tril(torch.full((1, 1, length, length), NEG), diagonal=-config.sliding_window_size)
    positions = torch.arange(length)
    with torch.no_grad():
        _, out = model(
            input_token_ids=torch.tensor([tokens]), input_positions=positions, kv_write_indices=positions,
            kv_caches=caches, mask=mask, output_positions=torch.tensor([length - 1]), temperatures=None,
            top_ps=torch.tensor([1.0]), top_ks=torch.tensor([1]), local_mask=local,
        )  # fmt: skip
    return out[0].float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b, dim=0).item()


@contextlib.contextmanager
def gemma_and_fused(
    gemma: Any, tokenizer: str, ckpt: str, profile: str, variant: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, Any]]:
    """The same checkpoint under the same profile: with gemma's own layer forwards, and fused (active)."""
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "fused")
    with gemma_profiles.use(profile):
        reference = load(gemma, tokenizer, variant, dtype, ckpt)
    monkeypatch.delenv("GEMMA_PROFILE_DISABLE_PLUGINS")
    manager.reset_plugin_manager()
    with gemma_profiles.use(profile):
        yield reference, load(gemma, tokenizer, variant, dtype, ckpt)


VARIANTS = ["2b", "7b", "2b-v2", "27b", "1b"]  # MQA, MHA, GQA + softcapping + sliding, query scalar, qk norms


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_model_generates_what_gemma_does(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],  # noqa: F811
    write_profile: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    variant: str,
    dtype: str,
) -> None:
    ckpt, profile = checkpoint(variant, dtype), cpu_profile(write_profile, dtype)
    with gemma_and_fused(gemma, tokenizer_path, ckpt, profile, variant, dtype, monkeypatch) as (reference, model):
        layers = model.config.num_hidden_layers
        counts = fused_kinds(model)
        assert counts["MLPs"] == counts["attention layers"] == layers and counts["sampler"] == 1
        assert counts["norms"] == sum(surgery.original_class(m).__name__ == "RMSNorm" for m in model.modules())
        assert not fused_kinds(reference)
        expected = logits(reference, TOKENS)
        assert cosine(logits(model, TOKENS), expected) > SAME_AS_GEMMA[dtype]
        if model.config.sliding_window_size:  # the comparison sees the window: ignoring it would fail
            assert len(TOKENS) > model.config.sliding_window_size
            assert cosine(logits(reference, TOKENS, window=False), expected) < SAME_AS_GEMMA[dtype]
        if dtype == "float32":  # bfloat16 roundings in another order may flip a near tie
            for prompts in (PROMPTS[0], PROMPTS):  # one prompt, and a batch of two
                expected = reference.generate(prompts, "cpu", output_len=6, temperature=None)
                assert model.generate(prompts, "cpu", output_len=6, temperature=None) == expected


def ignore_the_window(attention: Any) -> Any:
    """What a fused attention ignoring the sliding window would do: the local layer gets the global mask."""

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        mask = kwargs["mask"] if "mask" in kwargs else args[4]
        if len(args) > 5:
            args = (*args[:5], mask, *args[6:])
        else:
            kwargs["local_mask"] = mask
        return args, kwargs

    return attention.register_forward_pre_hook(hook, with_kwargs=True)


@torch_only
@pytest.mark.parametrize("variant", ["2b-v2", "1b"])  # Gemma 2 (local, global), Gemma 3 (5 local, 1 global)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_logits_comparison_fails_a_model_that_ignores_the_window(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],  # noqa: F811
    write_profile: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    variant: str,
    dtype: str,
) -> None:
    """The yardstick of test_fused_model_generates_what_gemma_does, on gemma's own forwards (runs anywhere).

    A local layer attending past its window - a fused kernel ignoring ``local_mask`` - must
    fall below the cosine that test demands; so must the logits without the window.
    """
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "fused")
    with gemma_profiles.use(cpu_profile(write_profile, dtype)):
        model = load(gemma, tokenizer_path, variant, dtype, checkpoint(variant, dtype))
    assert not fused_kinds(model) and len(TOKENS) > model.config.sliding_window_size
    expected = logits(model, TOKENS)
    assert cosine(logits(model, TOKENS), expected) > SAME_AS_GEMMA[dtype], "the yardstick is repeatable"
    assert cosine(logits(model, TOKENS, window=False), expected) < SAME_AS_GEMMA[dtype]
    local = [layer.self_attn for layer in model.model.layers if layer.self_attn.attn_type.name == "LOCAL_SLIDING"]
    assert local
    handles = [ignore_the_window(attention) for attention in local]
    try:
        assert cosine(logits(model, TOKENS), expected) < SAME_AS_GEMMA[dtype]
    finally:
        for handle in handles:
            handle.remove()


def test_int8_model_is_fused_too(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],  # noqa: F811
    write_profile: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt = checkpoint("2b")
    profile = cpu_profile(write_profile, "bfloat16", "quantization: {weights: int8}\n")
    with gemma_and_fused(gemma, tokenizer_path, ckpt, profile, "2b", "bfloat16", monkeypatch) as (reference, model):
        assert set(fused_kinds(model)) == set(KINDS)
        assert cosine(logits(model, TOKENS), logits(reference, TOKENS)) > SAME_AS_GEMMA["bfloat16"]


def test_sampling_with_a_temperature_is_gemmas(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],  # noqa: F811
    write_profile: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt, profile = checkpoint("2b"), cpu_profile(write_profile, "float32")
    with gemma_and_fused(gemma, tokenizer_path, ckpt, profile, "2b", "float32", monkeypatch) as (reference, model):
        results = []
        for each in (reference, model):
            torch.manual_seed(3)
            results.append(each.generate(PROMPTS, "cpu", output_len=6, temperature=0.9))
        assert results[0] == results[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [64, 2048, 37, 1, 7, 9, 23, 640])  # tails of the 16 and 8 lanes; 270M's 640
def test_norm_and_gelu_kernels_against_torch(dtype: torch.dtype, width: int, path: str) -> None:
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(5, width, generator=generator) * 3).to(dtype)
    weight = (torch.randn(width, generator=generator) * 0.1).to(dtype)
    norm = type("RMSNorm", (torch.nn.Module,), {})()
    norm.weight, norm.eps, norm.add_unit_offset = torch.nn.Parameter(weight, requires_grad=False), 1e-6, True
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + weight.float())).to(dtype)
    got = fused.rms_norm(norm, x)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-5)
    norm.add_unit_offset = False
    torch.testing.assert_close(
        fused.rms_norm(norm, x),
        (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.float()).to(dtype),
        rtol=1e-5 if dtype == torch.float32 else 8e-3,
        atol=1e-5,
    )

    gate, up = (torch.randn(3, width, generator=generator) * 4).to(dtype), torch.randn(3, width).to(dtype)
    library = native.decode_library()
    out = torch.full((gate.numel() + 16,), 7.0, dtype=dtype)  # past the end: left alone
    library.gp_gelu_mul(gate.data_ptr(), up.data_ptr(), int(dtype == torch.bfloat16), gate.numel(), out.data_ptr())
    torch.testing.assert_close(
        out[: gate.numel()].view(gate.shape),
        F.gelu(gate, approximate="tanh") * up,
        rtol=1e-5 if dtype == torch.float32 else 8e-3,
        atol=1e-6,
    )
    assert (out[gate.numel() :] == 7.0).all()
    rows = torch.full((x.numel() + 16,), 7.0, dtype=dtype)
    library.gp_rms_norm(x.data_ptr(), int(dtype == torch.bfloat16), 5, width, weight.data_ptr(),
                        int(dtype == torch.bfloat16), float(norm.add_unit_offset), 1e-6, rows.data_ptr())  # fmt: skip
    assert torch.equal(rows[: x.numel()].view(x.shape), fused.rms_norm(norm, x)) and (rows[x.numel() :] == 7.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_kernel_is_torchs(dtype: torch.dtype, path: str) -> None:
    library = native.decode_library()

    def argmax(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype).contiguous()
        out = torch.empty(x.shape[0], dtype=torch.int64)
        library.gp_argmax(x.data_ptr(), int(dtype == torch.bfloat16), x.shape[0], x.shape[1], out.data_ptr())
        return out

    x = torch.randn(3, 256000, generator=torch.Generator().manual_seed(1))
    x[1, 7], x[1, 9000] = 50.0, 50.0  # a tie: the first wins
    x[2, :] = -float("inf")
    x[2, 12345] = -1e30
    assert torch.equal(argmax(x), torch.argmax(x.to(dtype), dim=-1))
    assert argmax(x)[1] == 7 and argmax(x)[2] == 12345
    x[0, 100], x[0, 50] = float("nan"), float("nan")  # NaN counts as largest: the first NaN
    assert argmax(x)[0] == 50 == torch.argmax(x.to(dtype), dim=-1)[0]
    odd = torch.randn(4, 37, generator=torch.Generator().manual_seed(2))
    odd[1, 36] = 99.0  # in the masked tail of the last 16 lanes
    odd[2, 20], odd[2, 22] = 99.0, 99.0  # a tie within one group of 16 lanes
    odd[3, :] = -float("inf")  # all equal: the first
    assert torch.equal(argmax(odd), torch.argmax(odd.to(dtype), dim=-1))
    assert argmax(odd)[1:].tolist() == [36, 20, 0]


def argmax_of(x: torch.Tensor) -> list[int]:
    out = torch.empty(x.shape[0], dtype=torch.int64)
    native.decode_library().gp_argmax(
        x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], x.shape[1], out.data_ptr()
    )  # fmt: skip
    return out.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_ties_nans_and_tails_at_every_length(dtype: torch.dtype, path: str) -> None:
    """The first largest (a NaN the largest), wherever it falls: in a 32-value step, an 8-lane
    step or the last values one by one, for every length up to 80."""
    generator = torch.Generator().manual_seed(5)
    for n in range(1, 81):
        x = torch.randn(1, n, generator=generator).to(dtype)
        cases = [x]
        for at in {0, n // 2, n - 1}:
            for later in {at, n - 1}:
                tie = x.clone()
                tie[0, at], tie[0, later] = 9.0, 9.0  # a tie: the first
                nan = x.clone()
                nan[0, later], nan[0, at] = float("nan"), float("nan")  # the first NaN
                zeros = torch.zeros(1, n, dtype=dtype)
                zeros[0, at] = -0.0  # -0.0 == 0.0: the first
                cases += [tie, nan, zeros]
        cases.append(torch.full((1, n), -float("inf"), dtype=dtype))
        cases.append(torch.full((1, n), float("nan"), dtype=dtype))
        batch = torch.cat(cases)
        assert argmax_of(batch) == torch.argmax(batch, dim=-1).tolist(), n


def test_exp_is_accurate_to_its_range_ends(path: str) -> None:
    """The softmax's and gelu's e^x: ~2e-7 relative wherever the result is a normal float, the
    same subnormals below 2^-126 (within 2 of their steps), exactly 0 below e^-103.97, inf past
    FLT_MAX; NaN stays NaN; nothing written past the end."""
    library = native.decode_library()
    library.gp_exp.argtypes = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)
    library.gp_exp.restype = None
    sweep = torch.linspace(-110.0, 95.0, 400_001)
    ends = [88.72283, 88.72284, 88.7229, 89.0, 1e4, -87.33654, -87.3366, -103.27893, -103.9721, -104.0, -1e4]
    special = [0.0, -0.0, float("inf"), -float("inf"), float("nan")]
    x = torch.cat([sweep, torch.tensor(ends + special)])
    y = torch.full((x.numel() + 11,), 7.0)
    library.gp_exp(x.data_ptr(), x.numel(), y.data_ptr())
    assert (y[x.numel() :] == 7.0).all()
    y = y[: x.numel()].double()
    expected = torch.exp(x.double())
    normal = (expected >= 2.0**-126) & (expected <= torch.finfo(torch.float32).max)
    assert ((y - expected).abs() / expected)[normal].max() < 3e-7
    below = expected < 2.0**-126
    assert ((y - expected).abs()[below] <= 2 * 2.0**-149).all()
    assert (y[expected < 2.0**-150] == 0).all() and (y[expected < 2.0**-150] == 0).sum() > 1000
    assert (y[expected > torch.finfo(torch.float32).max] == float("inf")).all()
    assert y[-5:-1].tolist() == [1.0, 1.0, float("inf"), 0.0] and y[-1].isnan()
    assert y[-6] == 0 and y[-7] == 0 and 0 < y[-9] < 2.0**-148  # e^-1e4, e^-104: 0; e^-103.28: the least subnormal


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_go_through_norm_and_gelu_as_in_torch(dtype: torch.dtype, path: str) -> None:
    """A NaN spoils its own row of a norm and its own element of gelu(gate) * up, no other;
    infinities give torch's results (a norm's row with an inf: 0 and NaN; gelu(inf) = inf,
    gelu(-inf) = NaN)."""
    width = 21  # a tail in either path
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(6)).to(dtype)
    x[1, 19] = float("nan")
    x[2, 3] = float("inf")
    norm = type("RMSNorm", (torch.nn.Module,), {})()
    norm.weight, norm.eps, norm.add_unit_offset = torch.nn.Parameter(torch.zeros(width, dtype=dtype)), 1e-6, True
    got = fused.rms_norm(norm, x)
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=0)
    assert got[1].isnan().all() and got[2].isnan().sum() == 1 and got[2, 3].isnan()
    assert got[[0, 3]].isfinite().all() and (got[2, :3] == 0).all(), "x * rsqrt(inf): 0, and inf * 0 NaN"
    special = [float("nan"), float("inf"), -float("inf"), -1e4, -50.0, -9.5, -0.0, 0.0, 9.5, 50.0, 1e4]
    gate = torch.tensor(special * 2).to(dtype)
    up = torch.ones_like(gate)
    out = torch.empty_like(gate)
    bf16 = int(dtype == torch.bfloat16)
    native.decode_library().gp_gelu_mul(gate.data_ptr(), up.data_ptr(), bf16, gate.numel(), out.data_ptr())
    torch.testing.assert_close(out, F.gelu(gate, approximate="tanh"), equal_nan=True, rtol=1e-6, atol=1e-30)


def test_a_forward_that_disagrees_with_gemma_is_not_installed(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],  # noqa: F811
    write_profile: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    log_messages: list[str],
) -> None:
    class Wrong(fused.FusedNorm):  # a gemma whose RMSNorm changed, as it were
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return fused.rms_norm(self, x) * 1.01

    names, attributes, _ = fused.KINDS["norms"]
    monkeypatch.setitem(fused.KINDS, "norms", (names, attributes, Wrong))
    ckpt = checkpoint("2b")
    state = torch.get_rng_state()
    with gemma_profiles.use(cpu_profile(write_profile, "float32")):
        model = load(gemma, tokenizer_path, "2b", "float32", ckpt)
    assert torch.equal(torch.get_rng_state(), state), "the checks leave the user's RNG alone"
    counts = fused_kinds(model)
    assert "norms" not in counts and counts["MLPs"] == 2
    assert not any(fused.is_fused(m) for m in model.modules() if surgery.original_class(m).__name__ == "RMSNorm")
    assert any("gemma's own norms forward kept: differs from gemma's by" in m for m in log_messages)


def test_inputs_the_kernels_do_not_take_go_to_gemma(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],  # noqa: F811
    write_profile: Callable[..., Path],
) -> None:
    ckpt = checkpoint("2b")
    with gemma_profiles.use(cpu_profile(write_profile, "float32")):
        model = load(gemma, tokenizer_path, "2b", "float32", ckpt)
    norm = model.model.norm
    half = torch.randn(2, model.config.hidden_size).half()
    assert torch.equal(norm(half), type(norm).forward(norm, half))  # float16: gemma's forward
    attention = model.model.layers[0].self_attn
    size = (1, 4, model.config.num_key_value_heads, model.config.head_dim)
    cache = (torch.zeros(size), torch.zeros(size))
    mask = torch.zeros(1, 1, 1, 4)
    freqs = model.freqs_cis[:1]
    hidden = torch.randn(1, 1, model.config.hidden_size)
    with pytest.raises((IndexError, RuntimeError)):  # a position past the cache: gemma's own error
        attention(hidden, freqs, torch.tensor([9]), cache, mask)
    assert not cache[0].any(), "nothing written"


def test_not_installed_when_turned_off(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],  # noqa: F811
    write_profile: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    log_messages: list[str],
) -> None:
    ckpt = checkpoint("2b")
    monkeypatch.setenv(native.ENV, "0")
    native.reset()
    with gemma_profiles.use(cpu_profile(write_profile, "float32")):
        model = load(gemma, tokenizer_path, "2b", "float32", ckpt)
    assert not fused_kinds(model)
    assert any("gemma's own layer forwards: turned off (GEMMA_PROFILE_NATIVE=0)" in m for m in log_messages)
    monkeypatch.delenv(native.ENV)
    native.reset()
    text = "description: t\nplacement: {device: cpu, offload: disk}\nconfig: {dtype: float32}\n"
    offloaded = str(write_profile("offloaded", text))
    with gemma_profiles.use(offloaded):
        model = load(gemma, tokenizer_path, "2b", "float32", ckpt)
    assert not fused_kinds(model), "only for a model that runs on the CPU as a whole"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_a_sliding_window_and_a_batch(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],  # noqa: F811
    write_profile: Callable[..., Path],
    dtype: torch.dtype,
) -> None:
    name = str(dtype).removeprefix("torch.")
    ckpt = checkpoint("2b-v2", name)
    with gemma_profiles.use(cpu_profile(write_profile, name)):
        model = load(gemma, tokenizer_path, "2b-v2", name, ckpt)
    layers = [layer.self_attn for layer in model.model.layers]
    local = next(a for a in layers if getattr(a.attn_type, "name", "") == "LOCAL_SLIDING")
    full = next(a for a in layers if getattr(a.attn_type, "name", "") == "GLOBAL")
    config = model.config
    batch, length, max_seq, window = 2, 9, 12, 3
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(batch, length, config.hidden_size, generator=generator).to(dtype)
    causal = torch.triu(torch.full((1, 1, max_seq, max_seq), -2.3819763e38), diagonal=1)
    sliding = causal + torch.tril(torch.full((1, 1, max_seq, max_seq), -2.3819763e38), diagonal=-window)
    positions = torch.arange(length)
    freqs = model.freqs_cis.index_select(0, positions)
    mask, local_mask = causal.index_select(2, positions), sliding.index_select(2, positions)
    for attention in (local, full):
        assert fused.is_fused(attention) and type(attention).__name__ == "FusedGemmaAttention"
        results = []
        for run in (surgery.original_class(attention).forward, fused.attention):
            size = (batch, max_seq, config.num_key_value_heads, config.head_dim)
            cache = (torch.zeros(size, dtype=dtype), torch.zeros(size, dtype=dtype))
            out = run(attention, hidden, freqs, positions, cache, mask, local_mask)
            results.append((out, *cache))
        for expected, got in zip(*results, strict=True):
            distance = ((expected.double() - got.double()).norm() / expected.double().norm()).item()
            assert distance < (1e-5 if dtype == torch.float32 else 1e-2)
    # The window matters: the local layer's output under the global mask is different.
    size = (batch, max_seq, config.num_key_value_heads, config.head_dim)
    cache = (torch.zeros(size, dtype=dtype), torch.zeros(size, dtype=dtype))
    windowed = fused.attention(local, hidden, freqs, positions, cache, mask, local_mask)
    cache = (torch.zeros(size, dtype=dtype), torch.zeros(size, dtype=dtype))
    unwindowed = fused.attention(local, hidden, freqs, positions, cache, mask, mask)
    assert not torch.allclose(windowed, unwindowed)


def test_a_float16_cpu_model_keeps_gemmas_forwards_quietly(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],  # noqa: F811
    write_profile: Callable[..., Path],
    log_messages: list[str],
) -> None:
    ckpt = checkpoint("2b")
    with gemma_profiles.use(cpu_profile(write_profile, "float16")):
        model = load(gemma, tokenizer_path, "2b", "float16", ckpt)
    assert not fused_kinds(model)
    assert any("the fused kernels compute in float32 or bfloat16, not float16" in m for m in log_messages)
    assert not any("forward kept" in m for m in log_messages)


@st.composite
def attention_cases(draw: st.DrawFn) -> dict[str, Any]:
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    return {
        "kv_heads": kv_heads,
        "heads": kv_heads * draw(st.sampled_from([1, 2, 3])),
        # 6, 18, 34, 24, 40: not a multiple of 16 lanes; 2, 6, 18, 34 not of 8 either
        "head_dim": draw(st.sampled_from([2, 6, 16, 18, 24, 34, 40, 64])),
        "batch": draw(st.integers(1, 3)),
        "prompt": draw(st.integers(1, 9)),
        "steps": draw(st.integers(0, 3)),
        "softcap": draw(st.sampled_from([None, 5.0, 50.0])),
        "scalar": draw(st.sampled_from([None, 7])),
        "window": draw(st.sampled_from([None, 2, 4])),
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "seed": draw(st.integers(0, 2**16)),
    }


def attention_both_ways(
    gemma: Any, case: dict[str, Any], *, scale: float = 0.3, poison: Callable[[Any], None] | None = None
) -> list[tuple[torch.Tensor, ...]]:
    """A prefill and ``steps`` decode steps through a gemma attention shaped by ``case`` (weights
    ``randn * scale``), with gemma's forward and ours; each gives (outputs..., k cache, v cache).
    ``poison(cache)`` runs on both caches after the prefill."""
    import dataclasses

    from gemma_testing import tiny_config

    dtype = case["dtype"]
    sliding = case["window"] is not None
    config = dataclasses.replace(
        tiny_config(gemma.config, "2b-v2" if sliding else "2b"),
        num_attention_heads=case["heads"],
        num_key_value_heads=case["kv_heads"],
        head_dim=case["head_dim"],
        hidden_size=32,
        attn_logit_softcapping=case["softcap"],
        query_pre_attn_scalar=case["scalar"],
        sliding_window_size=case["window"],
        quant=False,
    )
    kind = gemma.config.AttentionType.LOCAL_SLIDING if sliding else gemma.config.AttentionType.GLOBAL
    generator = torch.Generator().manual_seed(case["seed"])
    attention = gemma.model.GemmaAttention(config, kind).to(dtype)
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    batch, prompt, steps = case["batch"], case["prompt"], case["steps"]
    max_seq = prompt + steps
    causal = torch.triu(torch.full((1, 1, max_seq, max_seq), -2.3819763e38), diagonal=1)
    local = causal
    if sliding:
        local = causal + torch.tril(torch.full((1, 1, max_seq, max_seq), -2.3819763e38), diagonal=-case["window"])
    angles = torch.rand(max_seq, case["head_dim"] // 2, generator=generator) * 6.28
    freqs = torch.polar(torch.ones_like(angles), angles)
    inputs = [torch.randn(batch, prompt, 32, generator=generator).to(dtype)]
    inputs += [torch.randn(batch, 1, 32, generator=generator).to(dtype) for _ in range(steps)]
    library, calls = native.decode_library(), []

    class Counting:  # the kernel must really run, not hand every case back to gemma
        def __getattr__(self, name: str) -> Any:
            return getattr(library, name)

        def gp_attend(self, *args: Any) -> int:
            calls.append(args)
            return int(library.gp_attend(*args))

    results = []
    for run in (type(attention).forward, fused.attention):
        size = (batch, max_seq, case["kv_heads"], case["head_dim"])
        cache = (torch.zeros(size, dtype=dtype), torch.zeros(size, dtype=dtype))
        outs = []
        start = 0
        for hidden in inputs:
            positions = torch.arange(start, start + hidden.shape[1])
            original, fused._library = fused._library, Counting  # type: ignore[assignment]
            try:
                step_freqs, step_mask = freqs.index_select(0, positions), causal.index_select(2, positions)
                step_local = local.index_select(2, positions)
                outs.append(run(attention, hidden, step_freqs, positions, cache, step_mask, step_local))
            finally:
                fused._library = original  # type: ignore[assignment]
            if poison is not None and start == 0:
                poison(cache)
            start += hidden.shape[1]
        results.append((*outs, *cache))
    assert len(calls) == len(inputs)
    return results


def distance(expected: torch.Tensor, got: torch.Tensor) -> float:
    assert got.shape == expected.shape and got.dtype == expected.dtype
    return ((expected.double() - got.double()).norm() / (expected.double().norm() + 1e-30)).item()


@settings(
    max_examples=int(os.environ.get("GEMMA_PROFILE_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # `path` is the same for every example
)
@given(case=attention_cases())
def test_attention_matches_gemma_on_random_shapes(gemma: Any, path: str, case: dict[str, Any]) -> None:
    """A prefill and a few decode steps through a randomly shaped gemma attention, both ways."""
    results = attention_both_ways(gemma, case)
    tolerance = 1e-5 if case["dtype"] == torch.float32 else 3e-2
    for expected, got in zip(*results, strict=True):
        assert distance(expected, got) < tolerance, (case, distance(expected, got))


CASE = {"kv_heads": 1, "heads": 3, "batch": 2, "prompt": 7, "steps": 2, "scalar": None, "seed": 11}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [18, 256])  # a tail of either path's lanes; Gemma 3 270M's heads
@pytest.mark.parametrize(("softcap", "window"), [(None, None), (50.0, 3), (5.0, None)])  # Gemma 1, 2, a tight cap
def test_attention_softmax_at_the_range_ends_of_exp(
    gemma: Any, path: str, dtype: torch.dtype, head_dim: int, softcap: float | None, window: int | None
) -> None:
    """Weights 40 times the usual: scores hundreds apart, so most e^(s - top) underflow to
    exactly 0, some to subnormals, as gemma's softmax has them (softcapping bounds them at cap)."""
    case = {**CASE, "head_dim": head_dim, "softcap": softcap, "window": window, "dtype": dtype}
    results = attention_both_ways(gemma, case, scale=12.0)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    for expected, got in zip(*results, strict=True):
        assert distance(expected, got) < tolerance, distance(expected, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_a_nan_in_the_cache_is_nan_where_gemmas_is(gemma: Any, path: str, dtype: torch.dtype) -> None:
    """A NaN in a key, or in one element of a value, at a position the mask lets through: the
    later queries of that sequence attend to it and are NaN, in gemma and in ours alike (after
    ``o_proj`` every element of the token); the other sequence of the batch is untouched."""
    case = {**CASE, "batch": 3, "kv_heads": 2, "heads": 4, "head_dim": 18, "softcap": None, "window": None}
    case["dtype"] = dtype

    def poison(cache: tuple[torch.Tensor, torch.Tensor]) -> None:
        cache[0][0, 2, 1, 5] = float("nan")  # sequence 0, position 2, KV head 1: a key
        cache[1][1, 4, 0, 17] = float("nan")  # sequence 1, position 4, KV head 0: one element of a value

    results = attention_both_ways(gemma, case, poison=poison)
    for expected, got in zip(results[0][1:3], results[1][1:3], strict=True):  # the decode steps' outputs
        assert torch.equal(expected.isnan(), got.isnan())
        assert got[:2].isnan().all() and got[2].isfinite().all()
        assert distance(expected[2], got[2]) < (1e-5 if dtype == torch.float32 else 3e-2)


@torch_only
@pytest.mark.parametrize("variant", ["2b", "2b-v2", "1b"])
def test_install_gives_classes_whose_fallbacks_are_gemmas_forwards(
    gemma: Any,
    tokenizer_path: str,
    checkpoint: Callable[..., str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    variant: str,
) -> None:
    """Runs anywhere: with no input the kernels take (``_cpu`` always False), every fused forward
    hands over to gemma's - through gemma's class, not back into itself - so the install checks
    pass, every kind is installed, and the model computes exactly as gemma's."""
    model = load(gemma, tokenizer_path, variant, "float32", checkpoint(variant))  # no profile: gemma's
    expected = logits(model, TOKENS)
    tokens = model.generate(PROMPTS, "cpu", output_len=4, temperature=None)
    monkeypatch.setattr(fused, "_cpu", lambda *tensors: False)
    installed = fused.install(model, torch.float32, model.config.hidden_size)
    assert set(installed) == set(KINDS)
    assert {type(m).__name__ for m in model.modules() if fused.is_fused(m)} == {
        "FusedRMSNorm",
        "FusedGemmaMLP",
        "FusedGemmaAttention",
        "FusedSampler",
    }
    assert all(isinstance(m, surgery.original_class(m)) and "forward" not in vars(m) for m in model.modules())
    assert torch.equal(logits(model, TOKENS), expected)
    assert model.generate(PROMPTS, "cpu", output_len=4, temperature=None) == tokens
    assert fused.install(model, torch.float32, model.config.hidden_size) == {}, "installed once"
