"""A pipeline on real devices (skipped without CUDA; ``benchmarks/gpu_check.sh`` runs it on a lent GPU).

tests/test_pipeline.py covers the planner, the refusals and the hooks on a CPU model; here the
activations and the KV caches really cross devices:

- on any CUDA machine, layers computed on the CPU beside a CUDA execution device (the engine's
  `Layout.stages` accepts any device; profiles map layers to GPUs): every step's inputs cross
  PCIe both ways, and each stage layer's cache moves in place to the CPU at the first step;
- with two GPUs or more, a profile's ``device_map`` over ``cuda:0`` and ``cuda:1``, end to end
  (construction, loading straight onto each GPU, generate) - the single-GPU text;
- with one GPU, that profile is refused before construction, in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import gemma_profiles
from gemma_profiles.engine import offload
from gemma_profiles.errors import GemmaProfileError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPT = "the cat sees"
TOKENS = 6
LAYERS = 6


def build(gemma: Any, tokenizer: str, ckpt: str | None = None) -> Any:
    """gemma's construction step on a tiny float32 2b; loaded from ``ckpt`` when given."""
    from gemma_testing import build_tiny_model

    model = build_tiny_model(gemma, tokenizer, "2b", num_hidden_layers=LAYERS, quant=False)
    if ckpt is not None:
        model.load_weights(ckpt)
    return model


def run(model: Any) -> tuple[str, list[torch.Tensor]]:
    from gemma_testing import greedy

    return greedy(model, "cuda", PROMPT, TOKENS)


@pytest.fixture
def ckpt(gemma: Any, tokenizer_path: str, tmp_path: Path) -> str:
    from gemma_testing import write_random_checkpoint

    write_random_checkpoint(build(gemma, tokenizer_path), str(tmp_path / "pipe.ckpt"), torch.float32, seed=5)
    return str(tmp_path / "pipe.ckpt")


@pytest.fixture
def reference(gemma: Any, tokenizer_path: str, ckpt: str) -> tuple[str, list[torch.Tensor]]:
    """One GPU, no profile."""
    return run(build(gemma, tokenizer_path, ckpt).to("cuda").eval())


def test_layers_computed_on_the_cpu_beside_cuda_give_the_same_text(
    gemma: Any, tokenizer_path: str, ckpt: str, reference: tuple[str, list[torch.Tensor]]
) -> None:
    model = build(gemma, tokenizer_path, ckpt).to("cuda").eval()
    stages = {2: "cpu", 3: "cpu"}
    seen: dict[int, list[tuple[int, str]]] = {2: [], 3: [], 4: []}

    def record(index: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            cache = kwargs["kv_cache"][0]
            seen[index].append((id(cache), str(cache.device)))
            assert str(output.device).startswith("cpu" if index in stages else "cuda")

        return hook

    for index in seen:
        model.model.layers[index].register_forward_hook(record(index), with_kwargs=True)
    offload.apply_offload(model, offload.Layout("cuda:0", {}, reason="test", stages=stages), "test")
    assert next(model.model.layers[2].parameters()).device.type == "cpu"
    text, logits = run(model)
    assert text == reference[0]
    for got, want in zip(logits, reference[1], strict=True):  # two layers in the CPU's float32 rounding
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    for index in (2, 3):  # the same cache tensor every step, moved to the CPU once
        assert {device for _, device in seen[index]} == {"cpu"}
        assert len({ident for ident, _ in seen[index]}) == 1
    assert {device for _, device in seen[4]} == {"cuda:0"}


def test_two_gpus_under_a_profile_give_the_single_gpu_text(
    gemma: Any,
    tokenizer_path: str,
    ckpt: str,
    reference: tuple[str, list[torch.Tensor]],
    write_profile: Callable[..., Path],
) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    path = write_profile(
        "two-gpus",
        "name: two-gpus\ndescription: t\nconfig: {dtype: float32}\n"
        "placement: {device: cuda:0, device_map: {'0-2': cuda:0, '3-5': cuda:1}}\n",
    )
    with gemma_profiles.use(str(path)):
        model = build(gemma, tokenizer_path)
        model.load_weights(ckpt)
        text, logits = run(model.eval())
    assert text == reference[0]
    for got, want in zip(logits, reference[1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert next(model.model.layers[3].parameters()).device == torch.device("cuda:1")
    assert next(model.model.layers[2].parameters()).device == torch.device("cuda:0")
    assert model.embedder.weight.device == torch.device("cuda:0")
    print(
        "pipeline over 2 GPUs: allocated",
        {f"cuda:{i}": torch.cuda.memory_allocated(i) for i in range(2)},
    )


def test_a_second_gpu_this_machine_lacks_is_refused_before_construction(
    gemma: Any, tokenizer_path: str, write_profile: Callable[..., Path]
) -> None:
    count = torch.cuda.device_count()
    path = write_profile(
        "missing-gpu",
        "name: missing-gpu\ndescription: t\nconfig: {dtype: float32}\n"
        f"placement: {{device: cuda:0, device_map: {{'3-5': 'cuda:{count}'}}}}\n",
    )
    with gemma_profiles.use(str(path)), pytest.raises(GemmaProfileError) as caught:
        build(gemma, tokenizer_path)
    assert f"computes decoder layers 3-5 on 'cuda:{count}'" in str(caught.value)
    assert "\n" not in str(caught.value)
