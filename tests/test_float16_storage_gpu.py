"""float16 storage, float32 compute on a CUDA device (``quantization: {weights: float16}``, issue 15
item 5): what pascal-5gb, t4 and v100 would use for Gemma 2/3.  Skipped without CUDA;
``benchmarks/gpu_check.sh`` runs it on a lent GPU.  test_float16_storage.py holds the same on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import gemma_profiles
from gemma_profiles.engine import half

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

#: gemma's 2b linear shapes (out, in), as in test_int8_gpu.py
SHAPES_2B = [(2560, 2048), (2048, 2048), (16384, 2048), (2048, 16384)]


@pytest.fixture
def exact() -> Iterator[None]:
    """float32 products without TF32, so the reference is float32's."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize(("n", "k"), SHAPES_2B)
def test_products_are_float32s_on_the_float16_weight(exact: None, n: int, k: int, rows: int) -> None:
    generator = torch.Generator().manual_seed(n + k)
    weight = (torch.randn(n, k, generator=generator) * 0.02).half().cuda()
    x = (torch.randn(rows, k, generator=generator) * 16).cuda()
    got = half.half_linear(x, weight)
    want = torch.nn.functional.linear(x, weight.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_no_float32_copy_of_the_weight_per_call(exact: None) -> None:
    weight = (torch.randn(16384, 2048) * 0.02).half().cuda()  # 64 MiB as float16, 128 MiB as float32
    x = torch.randn(1, 2048).cuda()
    half.half_linear(x, weight)  # the scratch block and cuBLAS's workspace, once
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    half.half_linear(x, weight)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < weight.numel()  # well under a float32 copy


def test_a_model_stored_in_float16_answers_as_float32_on_cuda(
    gemma: Any, tokenizer_path: str, write_profile: Callable[..., Path], tmp_path: Path, exact: None
) -> None:
    from gemma_testing import build_tiny_model, write_random_checkpoint

    path = tmp_path / "float.ckpt"
    write_random_checkpoint(build_tiny_model(gemma, tokenizer_path, "2b-v2"), path, torch.float32, seed=31)
    runs = {}
    for weights in ("none", "float16"):
        profile = write_profile(
            f"cuda-{weights}",
            f"description: t\nplacement: {{device: cuda}}\nconfig: {{dtype: float32}}\n"
            f"quantization: {{weights: {weights}}}\n",
        )
        with gemma_profiles.use(str(profile)):
            model = build_tiny_model(gemma, tokenizer_path, "2b-v2")
            model.load_weights(str(path))
            model = model.to("cuda").eval()
            steps: list[torch.Tensor] = []

            def keep(module: Any, args: Any, out: Any, steps: list[torch.Tensor] = steps) -> None:
                steps.append(out[1].float().cpu())

            handle = model.sampler.register_forward_hook(keep)
            try:
                text = model.generate("the cat sees a dog", "cuda", output_len=4, temperature=None)
            finally:
                handle.remove()
            weight = model.model.layers[0].mlp.down_proj.weight
            runs[weights] = (steps[0], text, weight.dtype, weight.device.type)
        del model
        torch.cuda.empty_cache()
    (want, want_text, _, _), (got, text, dtype, device) = runs["none"], runs["float16"]
    assert (dtype, device) == (torch.float16, "cuda")
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    assert text == want_text
