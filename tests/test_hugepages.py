"""Weights on transparent huge pages (gemma_profiles/hugepages.py) and where the loader puts them."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch

from gemma_profiles import hugepages, native
from gemma_profiles.loader import memory_mapped, quantize_rows

MIB = 1 << 20

linux_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or not os.path.exists(hugepages.THP_SETTING)
    or "[never]" in Path(hugepages.THP_SETTING).read_text(),
    reason="needs Linux transparent huge pages in 'always' or 'madvise' mode",
)


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


@linux_thp
def test_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hugepages.ENV, "0")
    assert not hugepages.enabled() and "GEMMA_PROFILE_HUGEPAGES=0" in hugepages.why_not()
    tensor = hugepages.empty((8 * MIB,), torch.int8)
    tensor.fill_(1)
    assert hugepages.huge_bytes([tensor]) == 0


@linux_thp
def test_quantized_weights_are_packed_on_huge_pages() -> None:
    """What on-the-fly int8 does: quantize onto huge pages, then pack in place (no copy)."""
    if native.unavailable():
        pytest.skip(f"native int8 kernel: {native.unavailable()}")
    weight = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0))
    q, scaler = quantize_rows(weight, torch.float32)
    expected = native.Int8Weight.pack(q.clone(), scaler)
    packed = native.Int8Weight.pack(q, scaler, in_place=True)
    assert packed.data.data_ptr() == q.data_ptr() and torch.equal(packed.data, expected.data)
    assert hugepages.huge_bytes([packed.data]) == 4 * MIB
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
    assert torch.equal(source, weight)  # every page of the mapping now resident
    scaler = torch.rand(n)
    packed = native.Int8Weight.pack(source, scaler, release=True)
    assert torch.equal(packed.unpack(), weight)
    assert hugepages.huge_bytes([packed.data]) == 4 * MIB
    assert resident(source) == 0  # dropped a chunk at a time; the file brings them back if read
    assert torch.equal(source, weight)


def resident(tensor: torch.Tensor) -> int:
    start, inside = tensor.data_ptr(), False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0] if line.strip() else ""
            if "-" in head and not head.endswith(":"):
                low, high = (int(part, 16) for part in head.split("-"))
                inside = low <= start < high
            elif inside and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found")
