"""Weights on transparent huge pages (gemma_profiles/engine/hugepages.py) and where the loader puts them."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import gemma_profiles
from gemma_profiles.engine import hugepages, native, pages
from gemma_profiles.engine.loading import quantize_rows
from gemma_profiles.engine.pages import huge_page_mode, memory_mapped

MIB = 1 << 20

linux_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or huge_page_mode() not in ("always", "madvise"),
    reason="needs Linux transparent huge pages in 'always' or 'madvise' mode",
)


@pytest.fixture(autouse=True)
def switched_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests here set ``GEMMA_PROFILE_HUGEPAGES`` themselves; one from the caller's shell does not count."""
    monkeypatch.delenv(hugepages.ENV, raising=False)


def mapped_at(address: int) -> bool:
    with open("/proc/self/maps") as maps:
        spans = (line.split()[0].split("-") for line in maps)
        return any(int(low, 16) <= address < int(high, 16) for low, high in spans)


@pytest.mark.parametrize(
    ("shape", "dtype"), [((3, 5), torch.float32), ((5, MIB), torch.int8), ((3, MIB), torch.bfloat16)]
)
def test_empty_is_an_ordinary_writable_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    tensor = hugepages.empty(shape, dtype)
    assert tensor.shape == shape and tensor.dtype == dtype and tensor.is_contiguous()
    tensor.fill_(3)
    assert tensor.sum().item() == 3 * tensor.numel()
    if tensor.numel() * tensor.element_size() >= hugepages.HUGE_PAGE and hugepages.enabled():
        assert tensor.data_ptr() % hugepages.HUGE_PAGE == 0


@linux_thp
def test_large_tensors_get_huge_pages_and_give_the_memory_back() -> None:
    tensor = hugepages.empty((5 * MIB + 4096,), torch.int8)
    tensor.fill_(1)
    # The whole 2 MiB stretches (4 MiB) are on huge pages; the tail is not rounded up to one.
    assert hugepages.huge_bytes([tensor]) == 4 * MIB
    view = tensor[MIB:]
    address = tensor.data_ptr()
    del tensor
    gc.collect()
    assert mapped_at(address) and view.sum().item() == view.numel()  # a view keeps the mapping
    del view
    gc.collect()
    assert not mapped_at(address)


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]", "never"),
        ("", ""),
        ("madvise\n", ""),
        (None, ""),
    ],
)
def test_the_kernels_mode_is_read(tmp_path: Path, text: str | None, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    setting = tmp_path / "enabled"
    if text is not None:
        setting.write_text(text)
    assert huge_page_mode(str(setting)) == mode
    monkeypatch.setattr(hugepages, "huge_page_mode", lambda: mode)
    expected = {"never": "is 'never' (set it to 'madvise')", "": "no transparent huge pages"}.get(mode, "fragmented")
    assert expected in hugepages.why_not()


@linux_thp
def test_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hugepages.ENV, "0")
    assert not hugepages.enabled() and "GEMMA_PROFILE_HUGEPAGES=0" in hugepages.why_not()
    tensor = hugepages.empty((8 * MIB,), torch.int8)
    tensor.fill_(1)
    assert hugepages.huge_bytes([tensor]) == 0
    probe = hugepages.empty((8 * MIB,), torch.int8, switchable=False)  # the benchmarks' probe
    probe.fill_(1)
    assert hugepages.huge_bytes([probe]) == 8 * MIB


@linux_thp
def test_quantized_weights_are_packed_on_huge_pages() -> None:
    """What on-the-fly int8 does: quantize onto huge pages, then pack in place (no copy)."""
    if native.unavailable():
        pytest.skip(f"native int8 kernel: {native.unavailable()}")
    weight = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))
    q, scaler = quantize_rows(weight, torch.float32)
    expected = native.Int8Weight.pack(q.clone(), scaler)
    kernels = native.Int8Weight.pack(q, scaler, in_place=True)
    assert kernels.data.data_ptr() == q.data_ptr() and torch.equal(kernels.data, expected.data)
    assert hugepages.huge_bytes([kernels.data]) == 4 * MIB
    assert hugepages.huge_bytes([expected.data]) == 4 * MIB  # a copy goes onto huge pages too


@linux_thp
def test_a_mapped_int8_checkpoint_is_copied_onto_huge_pages_and_its_pages_dropped(tmp_path: Path) -> None:
    if native.unavailable():
        pytest.skip(f"native int8 kernel: {native.unavailable()}")
    n, k = 1024, 4096
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "w.bin"
    path.write_bytes(weight.numpy().tobytes())
    source = torch.from_file(str(path), shared=False, size=n * k, dtype=torch.int8).view(n, k)
    assert memory_mapped(source) and not memory_mapped(weight)
    assert torch.equal(source, weight)
    assert pages.smaps_bytes([source], "Rss") == n * k  # every page of the mapping read in
    scaler = torch.rand(n)
    kernels = native.Int8Weight.pack(source, scaler, release=True)
    assert torch.equal(kernels.unpack(), weight)
    assert hugepages.huge_bytes([kernels.data]) == 4 * MIB
    # Dropped a chunk at a time; the file brings them back if read.
    assert pages.smaps_bytes([source], "Rss") == 0
    assert torch.equal(source, weight)


@linux_thp
@pytest.mark.parametrize("switch", ["on", "off"])
def test_an_int8_model_loads_onto_huge_pages_and_says_so(
    gemma: Any,
    tokenizer_path: str,
    write_profile: Callable[..., Path],
    tmp_path: Path,
    log_messages: list[str],
    monkeypatch: pytest.MonkeyPatch,
    switch: str,
) -> None:
    """Through the loader: quantized while loading, packed in place, on huge pages (4 MiB MLP weights)."""
    if native.unavailable():
        pytest.skip(f"native int8 kernel: {native.unavailable()}")
    from gemma_testing import write_medium_checkpoint

    from gemma_profiles.engine.quantization import native_weights

    if switch == "off":
        monkeypatch.setenv(hugepages.ENV, "0")
    ckpt = tmp_path / "m.ckpt"
    config = write_medium_checkpoint(gemma, tokenizer_path, ckpt, layers=2)
    text = "description: t\nplacement: {device: cpu}\nconfig: {dtype: float32}\nquantization: {weights: int8}\n"
    profile = write_profile("int8-cpu", text)
    with gemma_profiles.use(str(profile)):
        model = gemma.model.GemmaForCausalLM(config)
        model.load_weights(str(ckpt))
    weights = [kernels.data for kernels in native_weights(model)]
    assert len(weights) == 2 * 5 + 1  # qkv, o, gate, up, down per layer, and the tied embedder
    line = next(message for message in log_messages if "int8: linear layers" in message)
    if switch == "on":
        # 2 x 3 MLP weights of 4 MiB each on huge pages at least; the rest are under 2 MiB or partly
        assert hugepages.huge_bytes(weights) >= 24 * MIB, line
        assert "GiB on 2 MiB pages" in line and "(" not in line.split("2 MiB pages")[1], line
    else:
        assert hugepages.huge_bytes(weights) == 0
        assert "(turned off (GEMMA_PROFILE_HUGEPAGES=0))" in line, line
    assert isinstance(model.generate("the cat", "cpu", output_len=3, temperature=None), str)


@linux_thp
@pytest.mark.parametrize("switch", ["on", "off"])
def test_a_bfloat16_model_loads_onto_huge_pages_and_says_so(
    gemma: Any,
    tokenizer_path: str,
    write_profile: Callable[..., Path],
    tmp_path: Path,
    log_messages: list[str],
    monkeypatch: pytest.MonkeyPatch,
    switch: str,
) -> None:
    """The native bfloat16 kernel's plain weights are copied onto huge pages (8 MiB MLP weights)."""
    from gemma_profiles.engine import kernels

    native.reset()
    if not kernels.native_bf16():
        pytest.skip(f"native bfloat16 kernel: {native.bf16_unavailable()}")
    from gemma_testing import write_medium_checkpoint

    if switch == "off":
        monkeypatch.setenv(hugepages.ENV, "0")
    ckpt = tmp_path / "m.ckpt"
    config = write_medium_checkpoint(gemma, tokenizer_path, ckpt, layers=2)
    config.dtype = "bfloat16"
    profile = write_profile("bf16-cpu", "description: t\nplacement: {device: cpu}\nconfig: {dtype: bfloat16}\n")
    with gemma_profiles.use(str(profile)):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = gemma.model.GemmaForCausalLM(config)
        finally:
            torch.set_default_dtype(torch.float32)
        model.load_weights(str(ckpt))
    weights = kernels.stored_weights(model)
    assert len(weights) == 2 * 5  # qkv, o, gate, up, down per layer
    line = next(message for message in log_messages if "CPU kernels:" in message)
    assert "use the native bfloat16 kernel" in line, line
    if switch == "on":
        assert hugepages.huge_bytes(weights) >= 2 * 3 * 8 * MIB, line  # the MLP weights at least
        assert "GiB on 2 MiB pages" in line and "(" not in line.split("2 MiB pages")[1], line
    else:
        assert hugepages.huge_bytes(weights) == 0
        assert "(turned off (GEMMA_PROFILE_HUGEPAGES=0))" in line, line
    assert isinstance(model.generate("the cat", "cpu", output_len=3, temperature=None), str)
