"""Offload on a CUDA device (skipped without one; ``benchmarks/gpu_check.sh`` runs it on a lent GPU).

The CPU tests (test_offload.py) cover the policy and the storage; these cover what
only a GPU has: pinned memory, the side stream and its events, a KV cache that
really is on another device, the tied embedder on the CPU while the layers run on
the GPU.  Every offloaded run must equal the plain model on the same GPU exactly.
"""

from __future__ import annotations

import dataclasses
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


def build(gemma: Any, tokenizer: str, dtype: str = "float16") -> Any:
    from gemma_testing import tiny_config

    config = tiny_config(gemma.config, "2b", tokenizer, dtype=dtype)
    # Wide enough that the copies take longer than a kernel launch: prefetch matters.
    config = dataclasses.replace(config, num_hidden_layers=LAYERS, hidden_size=512, intermediate_size=4096, quant=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(config.get_dtype())
    try:
        return gemma.model.GemmaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def run(model: Any) -> tuple[str, list[torch.Tensor]]:
    from gemma_testing import greedy

    return greedy(model, "cuda", PROMPT, TOKENS)


@pytest.fixture
def ckpt(gemma: Any, tokenizer_path: str, tmp_path: Path) -> str:
    from gemma_testing import write_random_checkpoint

    path = tmp_path / "wide.ckpt"
    write_random_checkpoint(build(gemma, tokenizer_path), str(path), torch.float16, seed=11)
    return str(path)


@pytest.fixture
def reference(gemma: Any, tokenizer_path: str, ckpt: str) -> tuple[str, list[torch.Tensor]]:
    model = build(gemma, tokenizer_path)
    model.load_weights(ckpt)
    return run(model.to("cuda").eval())


@pytest.fixture
def under(
    gemma: Any, tokenizer_path: str, ckpt: str, write_profile: Callable[..., Path], tmp_path: Path
) -> Callable[[str], tuple[Any, str, list[torch.Tensor]]]:
    def make(placement: str) -> tuple[Any, str, list[torch.Tensor]]:
        path = write_profile(
            "gpu-offload",
            "name: gpu-offload\ndescription: t\nconfig: {dtype: float16}\n"
            f"placement: {placement.replace('FOLDER', str(tmp_path / 'offload'))}\n",
        )
        with gemma_profiles.use(str(path)):
            model = build(gemma, tokenizer_path)
            model.load_weights(ckpt)
            text, logits = run(model.to("cuda").eval())
        return model, text, logits

    return make


PLACEMENTS = {
    "cpu": "{device: cuda, offload: cpu, device_map: {'1-5': cpu}}",
    "all-cpu": "{device: cuda, offload: cpu, device_map: {'0-5': cpu}}",
    "disk": "{device: cuda, offload: disk, offload_folder: FOLDER, device_map: {'0-5': disk}}",
    "mixed": "{device: cuda, offload: disk, offload_folder: FOLDER, device_map: {'0-1': cpu, '3-5': disk}}",
    "embedder-on-cpu": "{device: cuda, offload: cpu, device_map: {embedder: cpu, '2-5': cpu}}",
}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_offloaded_on_cuda_matches_the_plain_model(
    placement: str, reference: tuple[str, list[torch.Tensor]], under: Callable[[str], Any]
) -> None:
    model, text, logits = under(PLACEMENTS[placement])
    assert text == reference[0]
    assert len(logits) == TOKENS
    for got, want in zip(logits, reference[1], strict=True):
        if placement == "embedder-on-cpu":  # the tied output is computed on the CPU: its rounding, not cuBLAS's
            torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
        else:
            assert torch.equal(got, want)
    state = offload.offload_state(model)
    assert state is not None and state.layout.device == "cuda:0"
    for unit in state.units:
        if unit.kind == "cpu":
            assert unit.storage.is_pinned(), "host storage is page-locked"
    if state.streamer is not None:
        assert state.streamer.cuda and state.streamer.copied > 0


def test_a_cache_on_the_cpu_raises_for_a_layer_on_cuda(under: Callable[[str], Any]) -> None:
    model, _, _ = under(PLACEMENTS["cpu"])
    with pytest.raises(GemmaProfileError, match=r"decoder layer 0 runs on cuda:0 but its KV cache is on cpu"):
        _forward_with_cpu_cache(model)


def _forward_with_cpu_cache(model: Any) -> None:
    config = model.config
    shape = (1, 16, config.num_key_value_heads, config.head_dim)
    caches = [
        (torch.zeros(shape, dtype=torch.float16), torch.zeros(shape, dtype=torch.float16))
        for _ in range(config.num_hidden_layers)
    ]
    ids = torch.tensor([model.tokenizer.encode(PROMPT)], device="cuda")
    positions = torch.arange(ids.shape[1], device="cuda")
    mask = torch.full((1, 1, 16, 16), -2.3819763e38, device="cuda").triu(1).index_select(2, positions)
    model(
        input_token_ids=ids,
        input_positions=positions,
        kv_write_indices=None,
        kv_caches=caches,
        mask=mask,
        output_positions=torch.tensor([ids.shape[1] - 1], device="cuda"),
        temperatures=None,
        top_ps=torch.tensor([1.0], device="cuda"),
        top_ks=torch.tensor([1], device="cuda"),
    )


def test_streaming_keeps_device_memory_at_the_slots(under: Callable[[str], Any]) -> None:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, _, _ = under(PLACEMENTS["all-cpu"])
    state = offload.offload_state(model)
    assert state is not None and state.streamer is not None
    layer = max(unit.nbytes for unit in state.units)
    weights = sum(unit.nbytes for unit in state.units)
    assert layer * 3 < weights
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cuda")
    assert resident < weights / 2, "offloaded layers hold no device memory between forwards"


@pytest.mark.parametrize("placement", ["all-cpu", "disk"])
def test_a_corrupted_slot_copy_is_caught(
    placement: str,
    reference: tuple[str, list[torch.Tensor]],
    under: Callable[[str], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exact comparison above sees a wrong CUDA slot copy - which no CPU test can (test_offload.py).

    Half of each layer's bytes reach its slot (the rest is the slot's previous layer): the
    logits must differ from the plain model's.
    """
    copy = offload.WeightStreamer._to_device

    def half(self: offload.WeightStreamer, source: torch.Tensor, slot: int, nbytes: int) -> None:
        copy(self, source, slot, nbytes // 2)

    monkeypatch.setattr(offload.WeightStreamer, "_to_device", half)
    model, _, logits = under(PLACEMENTS[placement])
    state = offload.offload_state(model)
    assert state is not None and state.streamer is not None and state.streamer.copied > 0
    assert any(not torch.equal(got, want) for got, want in zip(logits, reference[1], strict=False))
