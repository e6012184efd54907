"""The sampler's product on the tied embedder (``gemma_profiles.engine.tied``): never a second copy.

A bfloat16 model loaded from a float32 checkpoint (what ``gemma-profile import`` writes by
default) has its embedder converted while loading, so it is not memory-mapped. Where the
native bfloat16 kernel runs, the sampler's product must read that embedder's own storage (the
kernel takes plain row-major bfloat16): no packed copy, and no ``torch.matmul`` that oneDNN
would reorder into a temporary copy on every call. The kernel needs AVX-512 BF16; here it is
replaced by a stand-in with the same C signature (``gp_bf16_matmul``) that computes in torch and
records the weight pointer it was handed, so the wiring is tested on any CPU.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import gemma_profiles
from gemma_profiles.engine import kernels, native, surgery

PROMPTS = ["the cat sees a dog", "two red birds"]


class FakeBf16Library:
    """``gp_bf16_matmul(x, m, k, w, n, y)`` in torch: y = x @ w.T, float32 sums rounded to bfloat16."""

    def __init__(self) -> None:
        self.weights: list[tuple[int, int]] = []  # (pointer, rows) of every weight multiplied

    @staticmethod
    def _view(pointer: int, rows: int, cols: int) -> torch.Tensor:
        buffer = (ctypes.c_uint16 * (rows * cols)).from_address(pointer)
        return torch.frombuffer(buffer, dtype=torch.bfloat16).view(rows, cols)

    @staticmethod
    def gp_bf16_supported() -> int:
        return 2  # stands for the AVX-512 BF16 path: longer inputs go to F.linear

    def gp_bf16_matmul(self, x: int, m: int, k: int, w: int, n: int, y: int) -> int:
        self.weights.append((w, n))
        product = self._view(x, m, k).float() @ self._view(w, n, k).float().t()
        self._view(y, m, n).copy_(product.to(torch.bfloat16))
        return 0


@pytest.fixture
def fake_kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBf16Library]:
    fake = FakeBf16Library()
    monkeypatch.setattr(native, "bf16_library", lambda: fake)
    assert kernels.native_bf16() and kernels.available(torch.bfloat16) is None
    yield fake


@pytest.fixture
def float32_checkpoint(gemma: Any, tokenizer_path: str, tmp_path: Path) -> Callable[[str], str]:
    from gemma_testing import tiny_config, write_random_checkpoint

    def make(variant: str) -> str:
        path = tmp_path / f"{variant}-float32.ckpt"
        if not path.exists():
            config = tiny_config(gemma.config, variant, tokenizer_path, dtype="float32")
            with torch.device("meta"):
                shapes = {n: p.shape for n, p in gemma.model.GemmaForCausalLM(config).named_parameters()}
            write_random_checkpoint(shapes, path, torch.float32, seed=7)
        return str(path)

    return make


def load_bf16(gemma: Any, tokenizer: str, variant: str, ckpt: str) -> Any:
    return load_tiny(gemma, tokenizer, "bfloat16", ckpt, variant)


def embedder_of(model: Any) -> Any:
    return model.get_submodule("embedder" if hasattr(model, "embedder") else "text_token_embedder")


def sampler_logits(model: Any, embedding: Any, hidden: torch.Tensor) -> torch.Tensor:
    _, logits = model.sampler(
        embedding=embedding,
        hidden_states=hidden,
        output_positions=torch.tensor([0]),
        temperatures=None,
        top_ps=torch.tensor([1.0]),
        top_ks=torch.tensor([1]),
    )
    result: torch.Tensor = logits
    return result


@pytest.mark.parametrize("variant", ["2b", "1b"])
def test_a_converted_bfloat16_embedder_is_multiplied_in_place(
    gemma: Any,
    tokenizer_path: str,
    float32_checkpoint: Callable[[str], str],
    write_profile: Callable[..., Path],
    fake_kernel: FakeBf16Library,
    variant: str,
) -> None:
    from gemma_profiles.engine.loading import memory_mapped
    from gemma_profiles.engine.tied import _HOOK

    profile = write_profile("tied-bf16", "description: t\nplacement: {device: cpu}\nconfig: {dtype: bfloat16}\n")
    with gemma_profiles.use(str(profile)):
        model = load_bf16(gemma, tokenizer_path, variant, float32_checkpoint(variant))
        embedder = embedder_of(model)
        weight = embedder.weight
        assert weight.dtype == torch.bfloat16 and not memory_mapped(weight), "converted while loading"
        assert _HOOK in model.sampler.__dict__, "the sampler's product goes to the kernel"
        fake_kernel.weights.clear()
        out = model.generate(PROMPTS, "cpu", output_len=3, temperature=None)
    linears = {m.weight.data_ptr() for m in model.modules() if kernels.is_packed(m)}
    others = [pointer for pointer, _ in fake_kernel.weights if pointer not in linears]
    # Besides the layers' weights, the kernel read one matrix: the embedder's own storage, at
    # every step (prefill and two decode steps) - no copy of it was made.
    assert len(others) == 3 and set(others) == {weight.data_ptr()}
    assert len(out) == len(PROMPTS)
    # ...and it computes gemma's product (float32 sums, one bfloat16 rounding, as torch's matmul).
    hidden = torch.randn(1, 1, weight.shape[1]).to(torch.bfloat16)
    fast = sampler_logits(model, weight, hidden)  # the hook swaps the embedder's weight
    plain = sampler_logits(model, weight.detach().clone(), hidden)  # another tensor: gemma's matmul
    torch.testing.assert_close(fast.float(), plain.float(), rtol=2**-7, atol=1e-3)


def test_a_loaded_state_dict_reaches_the_in_place_sampler(
    gemma: Any,
    tokenizer_path: str,
    float32_checkpoint: Callable[[str], str],
    write_profile: Callable[..., Path],
    fake_kernel: FakeBf16Library,
) -> None:
    profile = write_profile("tied-bf16", "description: t\nplacement: {device: cpu}\nconfig: {dtype: bfloat16}\n")
    with gemma_profiles.use(str(profile)):
        model = load_bf16(gemma, tokenizer_path, "2b", float32_checkpoint("2b"))
    embedder = embedder_of(model)
    state = model.state_dict()
    name = next(key for key in state if key.endswith("embedder.weight"))
    state[name] = torch.ones_like(state[name])
    model.load_state_dict(state)
    hidden = torch.ones(1, 1, embedder.weight.shape[1]).to(torch.bfloat16)
    logits = sampler_logits(model, embedder.weight, hidden)
    assert fake_kernel.weights[-1] == (embedder.weight.data_ptr(), embedder.weight.shape[0])
    assert torch.all(logits.float() == float(embedder.weight.shape[1]))


# -- a deep copy multiplies by its own embedder ----------------------------------------------------


@pytest.fixture
def bf16_checkpoint(gemma: Any, tokenizer_path: str, tmp_path: Path) -> str:
    """A bfloat16 checkpoint: a bfloat16 model maps it, so the sampler gets a packed copy."""
    from gemma_testing import tiny_config, write_random_checkpoint

    config = tiny_config(gemma.config, "2b", tokenizer_path, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in gemma.model.GemmaForCausalLM(config).named_parameters()}
    path = tmp_path / "2b-bfloat16.ckpt"
    write_random_checkpoint(shapes, path, torch.bfloat16, seed=5)
    return str(path)


def load_tiny(gemma: Any, tokenizer: str, dtype: str, ckpt: str, variant: str = "2b") -> Any:
    """The tiny ``variant`` built with torch's default dtype set to the config's (as gemma's
    scripts do for a bfloat16 run), ``ckpt`` loaded, in eval mode on the CPU."""
    from gemma_testing import tiny_config

    config = tiny_config(gemma.config, variant, tokenizer, dtype=dtype)
    torch.set_default_dtype(config.get_dtype())
    try:
        model = gemma.model.GemmaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.load_weights(ckpt)
    return model.to("cpu").eval()


#: (model dtype, quantization.weights, checkpoint): the four ways the sampler gets a product.
TIED = {
    "int8": ("bfloat16", "int8", "float32"),
    "float16-storage": ("float32", "float16", "float32"),
    "bf16-in-place": ("bfloat16", "none", "float32"),
    "bf16-packed-copy": ("bfloat16", "none", "bfloat16"),
}


@pytest.mark.parametrize("case", list(TIED))
def test_a_deep_copy_multiplies_by_its_own_tied_embedder(
    gemma: Any,
    tokenizer_path: str,
    float32_checkpoint: Callable[[str], str],
    bf16_checkpoint: str,
    write_profile: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    """Before, the sampler's hook was a closure over the original embedder: a deep copy of an int8
    model sampled from its raw int8 weight (wrong logits; real gemma's matmul refused the dtype),
    a float16-storage one from the plain float16 weight (real gemma refused it), and the others
    lost the fast product."""
    import copy

    from gemma_profiles.engine import tied

    dtype, weights, ckpt_dtype = TIED[case]
    if weights == "none":
        monkeypatch.setattr(native, "bf16_library", lambda: FakeBf16Library())
    else:
        monkeypatch.setenv(native.ENV, "0")  # the same path on every CPU (no Native*)
        native.reset()
    ckpt = float32_checkpoint("2b") if ckpt_dtype == "float32" else bf16_checkpoint
    text = f"description: t\nplacement: {{device: cpu}}\nconfig: {{dtype: {dtype}}}\n"
    text += f"quantization: {{weights: {weights}}}\n"
    try:
        with gemma_profiles.use(str(write_profile(f"tied-copy-{case}", text))):
            model = load_tiny(gemma, tokenizer_path, dtype, ckpt)
        assert tied._HOOK in model.sampler.__dict__, "the sampler's product runs on the profile's kernel"
        expected = model.generate(PROMPTS, "cpu", output_len=4, temperature=None)
        twin = copy.deepcopy(model)
        # The original's weights all zero (through load_state_dict: packed copies are refilled):
        # the twin must read nothing of the original's.
        model.load_state_dict({key: torch.zeros_like(value) for key, value in model.state_dict().items()})
        products: list[Any] = []
        spied = tied.SamplerWeight.__torch_function__.__func__  # type: ignore[attr-defined]

        def spy(cls: type, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
            if len(args) == 2 and isinstance(args[1], tied.SamplerWeight) and args[1].transposed:
                products.append(func)
            return spied(cls, func, types, args, kwargs)

        monkeypatch.setattr(tied.SamplerWeight, "__torch_function__", classmethod(spy))
        assert twin.generate(PROMPTS, "cpu", output_len=4, temperature=None) == expected
        assert products, "the twin's sampler product ran on the profile's kernel, not gemma's matmul"
    finally:
        if weights != "none":
            native.reset()


def test_the_float16_product_runs_inside_and_outside_inference_mode() -> None:
    """gemma's generate runs under ``torch.inference_mode``; the float16-storage product's scratch
    buffer made there was reused (and written) outside it, which torch refuses."""
    from gemma_profiles.engine.half import half_linear

    weight, x = torch.randn(5, 4).half(), torch.randn(2, 4)
    with torch.inference_mode():
        inside = half_linear(x, weight)
    torch.testing.assert_close(half_linear(x, weight), inside)
    torch.testing.assert_close(inside, x @ weight.float().t())


class RecordsEmbedding(surgery.Surgery):
    """What the ``fused`` stage does to the sampler after the tied product is set up: its own forward."""

    prefix = "Recording"
    seen: ClassVar[list[Any]] = []

    def forward(self, embedding: Any, *args: Any, **kwargs: Any) -> Any:
        RecordsEmbedding.seen.append(embedding)
        return super().forward(embedding, *args, **kwargs)


def test_a_sampler_whose_class_changes_later_still_gets_the_tied_product(
    gemma: Any,
    tokenizer_path: str,
    float32_checkpoint: Callable[[str], str],
    write_profile: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ``fused`` stage swaps the sampler's class (``FusedSampler``) after the ``quantization``
    and ``kernels`` stages set up its product: the swap of the embedder's weight must reach the
    forward the sampler ends up with (a pre-hook, not a class of its own that a later class hides)."""
    from gemma_profiles.engine import tied

    monkeypatch.setenv(native.ENV, "0")
    native.reset()
    text = "description: t\nplacement: {device: cpu}\nconfig: {dtype: bfloat16}\nquantization: {weights: int8}\n"
    try:
        with gemma_profiles.use(str(write_profile("tied-later-class", text))):
            model = load_tiny(gemma, tokenizer_path, "bfloat16", float32_checkpoint("2b"))
        surgery.swap(model.sampler, RecordsEmbedding)
        RecordsEmbedding.seen.clear()
        model.generate(PROMPTS, "cpu", output_len=2, temperature=None)
        assert RecordsEmbedding.seen and all(isinstance(e, tied.SamplerWeight) for e in RecordsEmbedding.seen)
    finally:
        native.reset()
