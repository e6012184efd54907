"""pascal-5gb on a CUDA device: int8 weights, float16 compute, a 5 GiB allocator cap (issue 13, item 5).

Skipped without CUDA; ``benchmarks/gpu_check.sh`` runs it on a lent GPU.  The CPU
tests (test_int8.py) hold the same numbers on the CPU; these hold what only a GPU
has: the one-pass dequantization into the scratch buffer (``torch.mul(..., out=)``,
which casts inside the kernel), cuBLAS's float16 products, and the allocator cap of
a 5 GiB card (``torch.cuda.set_per_process_memory_fraction``).  Activations have
std ~16, as after the norm weights of a trained checkpoint: the raw int8 sums pass
float16's 65504 where the true outputs stay in the tens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import gemma_profiles
from gemma_profiles.engine.loading import quantize_rows
from gemma_profiles.engine.quantization import dequantize_into, int8_linear

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GiB = 2**30
CAP = 5 * GiB  # a Quadro P2200
FP16_MAX = 65504.0
#: gemma's 2b linear shapes (out, in): qkv_proj (8 heads + 2 x 1 KV head of 256), o_proj, gate/up, down
SHAPES_2B = [(2560, 2048), (2048, 2048), (16384, 2048), (2048, 16384)]


@pytest.fixture
def capped() -> Iterator[None]:
    """The CUDA allocator capped at 5 GiB for the test (released afterwards)."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP / total), 0)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference is float32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


def quantized(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained-like weight, normal(0, 0.02), quantized by the loader (float16 scaler), on CUDA."""
    generator = torch.Generator().manual_seed(seed)
    q, scaler = quantize_rows(torch.randn(n, k, generator=generator) * 0.02, torch.float16)
    return q.cuda(), scaler.cuda()


def reference(x: torch.Tensor, q: torch.Tensor, scaler: torch.Tensor) -> torch.Tensor:
    """float32 on the GPU: ``x @ (q * s).T`` from the values ``x`` and ``scaler`` hold."""
    return x.float() @ (q.float() * scaler.float().unsqueeze(1)).T


def assert_near(got: torch.Tensor, want: torch.Tensor, relative: float) -> None:
    assert torch.isfinite(got).all(), f"{(~torch.isfinite(got)).sum().item()} of {got.numel()} outputs not finite"
    error = (got.float() - want).abs().max().item()
    bound = relative * want.abs().max().item()
    assert error <= bound, f"max error {error:.4g} > {bound:.4g} ({relative} of the largest output)"


@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize(("n", "k"), SHAPES_2B)
def test_2b_shapes_in_float16_stay_finite_and_match_float32(capped: None, n: int, k: int, rows: int) -> None:
    q, scaler = quantized(n, k)
    x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(1)) * 16).half().cuda()
    want = reference(x, q, scaler)
    raw = (x.float() @ q.float().T).abs().max().item()
    assert want.abs().max().item() < 500 and raw > FP16_MAX, "the case this test is about"
    got = int8_linear(x, q, scaler)
    assert got.dtype == torch.float16 and got.device.type == "cuda"
    assert_near(got, want, 3e-3)
    # gemma's own int8 forward: F.linear(x, weight * weight_scaler[:, None])
    assert_near(got, torch.nn.functional.linear(x, q * scaler.unsqueeze(1)).float(), 1e-3)


def test_one_pass_dequantization_on_cuda(capped: None) -> None:
    q, scaler = quantized(300, 2048)
    dense = torch.empty(q.shape, dtype=torch.float16, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dequantize_into(dense, q, scaler)
    torch.cuda.synchronize()
    assert torch.equal(dense, q.half() * scaler.unsqueeze(1))
    assert torch.cuda.max_memory_allocated() - before < q.numel(), "no weight-sized temporary"


def test_no_weight_sized_allocation_per_call(capped: None) -> None:
    """One scratch buffer, reused: a call allocates its output, not a copy of the weight."""
    q, scaler = quantized(16384, 2048)
    x = (torch.randn(1, 2048) * 16).half().cuda()
    int8_linear(x, q, scaler)  # the scratch buffer and cuBLAS's workspace, once
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    int8_linear(x, q, scaler)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < q.numel()  # float16 weight: 2 x numel


# -- pascal-5gb end to end ---------------------------------------------------------------------------


def build(gemma: Any, tokenizer: str, dtype: str) -> Any:
    """gemma's 2b layer shapes (hidden 2048, MLP 16384, 8 heads of 256, MQA), two layers, the test vocabulary."""
    from gemma_testing import build_tiny_model

    shape = {"hidden_size": 2048, "intermediate_size": 16384, "head_dim": 256}
    return build_tiny_model(gemma, tokenizer, dtype=dtype, **shape, num_attention_heads=8, num_key_value_heads=1)


@pytest.fixture
def trained_like_ckpt(gemma: Any, tokenizer_path: str, tmp_path: Path) -> str:
    """A float16 checkpoint (0.4 GB) with norm weights of ~16 (trained checkpoints have tens)."""
    from gemma_testing import write_random_checkpoint

    with torch.device("meta"):
        shapes = {name: p.shape for name, p in build(gemma, tokenizer_path, "float32").named_parameters()}
    path = tmp_path / "trained-like.ckpt"
    state = write_random_checkpoint(shapes, path, torch.float16, seed=12)
    generator = torch.Generator().manual_seed(13)
    for name, tensor in state.items():
        if "norm" in name:
            state[name] = (16 * (1 + 0.2 * torch.rand(tensor.shape, generator=generator))).half()
    torch.save({"model_state_dict": state}, path)
    return str(path)


def first_logits(model: Any) -> tuple[torch.Tensor, bool, str]:
    steps: list[torch.Tensor] = []
    handle = model.sampler.register_forward_hook(lambda m, a, out: steps.append(out[1].float().cpu()))
    try:
        text = model.generate("the cat sees a dog", "cuda", output_len=4, temperature=None)
    finally:
        handle.remove()
    return steps[0], all(bool(torch.isfinite(step).all()) for step in steps), text


def test_pascal_5gb_int8_float16_logits_are_finite_and_match_float32(
    gemma: Any, tokenizer_path: str, trained_like_ckpt: str, write_profile: Callable[..., Path], capped: None
) -> None:
    reference_profile = write_profile(
        "cuda-float32-int8",
        "name: cuda-float32-int8\ndescription: t\nplacement: {device: cuda}\nconfig: {dtype: float32}\n"
        "quantization: {weights: int8}\n",
    )
    runs = {}
    for name, profile in (("float32", str(reference_profile)), ("pascal-5gb", "pascal-5gb")):
        with gemma_profiles.use(profile):
            model = build(gemma, tokenizer_path, "float32")
            model.load_weights(trained_like_ckpt)
            model = model.to("cuda").eval()
            assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
            runs[name] = first_logits(model)
            dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        del model
        torch.cuda.empty_cache()
        if name == "pascal-5gb":
            assert dtypes == {torch.float16}, "pascal-5gb computes Gemma 1 in float16"
    (want, _, _), (got, finite, text) = runs["float32"], runs["pascal-5gb"]
    assert finite and isinstance(text, str), "pascal-5gb's float16 logits are not finite"
    assert want.abs().max() > 5, "the case this test is about: logits far from zero"
    error = (got - want).abs().max().item()
    assert error <= 2e-2 * want.abs().max().item(), f"float16 logits off by {error:.4g}"
