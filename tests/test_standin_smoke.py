"""Smoke tests of the gemma stand-in in tests/standin (skipped for real gemma)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

gemma = pytest.importorskip("gemma")
if not getattr(gemma, "__standin__", False):
    pytest.skip("gemma is not the stand-in", allow_module_level=True)

import gemma_testing  # noqa: E402
from gemma import config as gemma_config  # noqa: E402
from gemma import gemma3_model  # noqa: E402
from gemma import model as gemma_model  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return gemma_testing.train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(autouse=True)
def float32_default() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build(variant: str, tokenizer_path: str, tmp_path: Path, quant: bool = False) -> gemma_model.GemmaForCausalLM:
    config = gemma_testing.tiny_config(gemma_config, variant, tokenizer_path=tokenizer_path, dtype="float32")
    config = dataclasses.replace(config, quant=quant)
    model = gemma_model.GemmaForCausalLM(config).eval()
    ckpt = tmp_path / f"{variant}.ckpt"
    written = gemma_testing.write_random_checkpoint(model, ckpt, torch.float32)
    model.load_weights(str(ckpt))
    for name, param in model.named_parameters():
        assert torch.equal(param, written[name]), name
    return model


@pytest.mark.parametrize("variant", ["2b", "2b-v2", "1b"])
def test_greedy_generate_is_deterministic(variant: str, tokenizer_path: str, tmp_path: Path) -> None:
    model = _build(variant, tokenizer_path, tmp_path)
    cpu = torch.device("cpu")
    first = model.generate("the cat sees a dog", cpu, output_len=5, temperature=None)
    second = model.generate("the cat sees a dog", cpu, output_len=5, temperature=None)
    assert isinstance(first, str)
    assert first == second
    batch = model.generate(["the cat sees a dog", "a red house"], cpu, output_len=5, temperature=None)
    assert isinstance(batch, list) and batch[0] == first


def test_tiny_configs_keep_architecture(tokenizer_path: str) -> None:
    for variant in ["7b", "2b", "2b-v2", "9b", "27b", "1b", "4b", "12b", "27b_v3"]:
        full = gemma_config.get_model_config(variant)
        tiny = gemma_testing.tiny_config(gemma_config, variant, tokenizer_path)
        assert tiny.architecture == full.architecture
        assert tiny.num_attention_heads % tiny.num_key_value_heads == 0
        assert tiny.vocab_size == gemma_testing.TOKENIZER_VOCAB_SIZE
    with pytest.raises(ValueError):
        gemma_config.get_model_config("3b")


def test_kv_cache_written_in_place(tokenizer_path: str, tmp_path: Path) -> None:
    model = _build("2b-v2", tokenizer_path, tmp_path)
    config = model.config
    shape = (1, 8, config.num_key_value_heads, config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in model.model.layers]
    positions = torch.arange(3)
    mask = torch.full((1, 1, 8, 8), gemma_model.MASK_VALUE).triu(1)
    model(
        input_token_ids=torch.tensor([[2, 10, 11]]),
        input_positions=positions,
        kv_write_indices=None,
        kv_caches=caches,
        mask=mask.index_select(2, positions),
        output_positions=torch.tensor([2]),
        temperatures=None,
        top_ps=torch.tensor([1.0]),
        top_ks=torch.tensor([1]),
    )
    for k_cache, v_cache in caches:
        assert k_cache[:, :3].abs().sum() > 0 and v_cache[:, :3].abs().sum() > 0
        assert k_cache[:, 3:].abs().sum() == 0


def test_quant_and_sampling(tokenizer_path: str, tmp_path: Path) -> None:
    model = _build("2b", tokenizer_path, tmp_path, quant=True)
    assert model.embedder.weight.dtype == torch.int8
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    first = model.generate("a dog", cpu, output_len=5, temperature=0.8)
    torch.manual_seed(0)
    second = model.generate("a dog", cpu, output_len=5, temperature=0.8)
    assert first == second


def test_gemma3_multimodal_text_only(tokenizer_path: str, tmp_path: Path) -> None:
    config = gemma_testing.tiny_config(gemma_config, "4b", tokenizer_path=tokenizer_path, dtype="float32")
    mm = gemma3_model.Gemma3ForMultimodalLM(config)
    assert mm.dtype == torch.float32
    assert mm.local_freqs_cis.shape == (2 * 64, 8)
    assert mm.global_freqs_cis.dtype == torch.complex64
    ckpt = tmp_path / "mm.ckpt"
    gemma_testing.write_random_checkpoint(mm, ckpt, torch.float32, seed=1)
    mm.load_weights(str(ckpt))
    shape = (1, 4, config.num_key_value_heads, config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in mm.model.layers]
    positions = torch.arange(4)
    mask = torch.full((1, 1, 4, 4), gemma_model.MASK_VALUE).triu(1)
    tokens, logits = mm(
        input_token_ids=torch.tensor([[2, 10, 11, 12]]),
        input_positions=positions,
        kv_write_indices=None,
        kv_caches=caches,
        mask=mask,
        output_positions=torch.tensor([3]),
        temperatures=None,
        top_ps=torch.tensor([1.0]),
        top_ks=torch.tensor([1]),
        local_mask=mask,
    )
    assert tokens.shape == () and logits.shape == (1, config.vocab_size)  # squeezed, as gemma's sampler
