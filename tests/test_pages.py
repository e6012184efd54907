"""OS page work in one module (gemma_profiles/engine/pages.py): madvise, /proc/self/maps, smaps."""

from __future__ import annotations

import mmap
import re
import sys
from pathlib import Path

import pytest
import torch

from gemma_profiles.engine import pages

ENGINE = Path(pages.__file__).parent
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise are Linux's")

#: What only pages.py may do: load libc for madvise, declare the advice numbers, read /proc/self/maps or smaps.
PAGE_WORK = {
    "loads libc": re.compile(r"find_library\(\s*[\"']c[\"']|CDLL\(\s*None"),
    "declares a MADV_ number": re.compile(r"^\s*_?MADV_\w+\s*=", re.MULTILINE),
    "reads /proc/self/maps or smaps": re.compile(r"/proc/self/(?:maps|smaps)"),
    "calls madvise through libc": re.compile(r"libc\w*(?:\(\))?\.madvise\(", re.IGNORECASE),
}


def test_only_pages_does_page_work() -> None:
    """Before, loading and offload each had a ``_libc()`` and a ``MADV_DONTNEED``, and loading, offload
    and hugepages each parsed /proc/self/maps or smaps their own way."""
    found = [
        f"{path.name}: {what}"
        for path in sorted(ENGINE.glob("*.py"))
        if path.name != "pages.py"
        for what, pattern in PAGE_WORK.items()
        if pattern.search(path.read_text(encoding="utf-8"))
    ]
    assert found == [], found


@linux
def test_the_maps_parser_sees_a_mapped_file(tmp_path: Path) -> None:
    data = tmp_path / "weights.bin"
    data.write_bytes(bytes(range(256)) * 64)  # 4 pages
    tensor = torch.from_file(str(data), shared=False, size=data.stat().st_size, dtype=torch.uint8)
    found = pages.mappings()
    assert found is not None
    (mapping,) = [m for m in found if m.low <= tensor.data_ptr() < m.high]
    assert mapping.path == str(data) and mapping.inode == data.stat().st_ino and mapping.private_file
    assert (mapping.low, mapping.high) in pages.file_mappings()
    assert (mapping.low, mapping.high, mapping.inode) in (pages.mapped_ranges({mapping.inode}) or [])
    assert pages.mapped_ranges({-1}) == []
    assert pages.memory_mapped(tensor) and not pages.memory_mapped(tensor.clone())


@linux
def test_releasing_pages_keeps_the_values(tmp_path: Path) -> None:
    """A mapped file's pages are dropped and read back; anonymous memory is never advised (it would be zeroed)."""
    data = tmp_path / "weights.bin"
    data.write_bytes(bytes(range(256)) * 64)
    mapped = torch.from_file(str(data), shared=False, size=data.stat().st_size, dtype=torch.uint8)
    anonymous = torch.arange(4 * mmap.PAGESIZE, dtype=torch.uint8)
    before = mapped.clone(), anonymous.clone()
    pages.release_pages(mapped)
    pages.release_pages(anonymous)
    assert torch.equal(mapped, before[0]) and torch.equal(anonymous, before[1])
    assert pages.smaps_bytes([mapped], "Rss") >= 0
    assert pages.advise(torch.empty(0, dtype=torch.uint8), pages.MADV_DONTNEED) is False, "no whole page"


def test_whole_pages_and_huge_page_mode(tmp_path: Path) -> None:
    assert pages.whole_pages(torch.empty(0)) is None
    assert pages.whole_pages(torch.empty(4, device="meta")) is None
    tensor = torch.empty(3 * mmap.PAGESIZE, dtype=torch.uint8)
    first, last = pages.whole_pages(tensor) or (0, 0)
    assert first % mmap.PAGESIZE == 0 and last % mmap.PAGESIZE == 0 and last - first >= mmap.PAGESIZE
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert pages.huge_page_mode(str(setting)) == "madvise"
    assert pages.huge_page_mode(str(tmp_path / "missing")) == ""
