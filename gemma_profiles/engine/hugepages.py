"""CPU tensors on transparent huge pages, for weights read from memory on every token.

A decode step streams every weight once.  On 4 KiB pages that is a TLB miss every 4 KiB
whose page walk itself misses the caches (the page tables of a 2.5 GB model are 5 MB and
the weights stream through the caches over them), and the L2 prefetcher stops at each
page boundary.  On 2 MiB pages neither happens: the int8 kernel's 2b decode step took
38-40 ms instead of 42-45 with memory at 80 GB/s, 54 instead of 55.5 at 55 GB/s (the same
weights on either kind of page, alternating in one process; ``benchmarks/cpu_decode.py``
shows the switch as its row "cpu-8gb, 4 KiB pages").

Linux gives huge pages to ordinary memory only where asked: with THP in its usual
``madvise`` mode, memory marked ``MADV_HUGEPAGE`` before it is first touched is faulted
in 2 MiB at a time (no copying; ``MADV_COLLAPSE`` of memory already in use costs ~2 s per
GB).  torch's allocator does not ask (unless ``THP_MEM_ALLOC_ENABLE=1`` is set, and then
for every allocation of the process).  `empty` maps the memory itself, 2 MiB-aligned, and
asks for the whole 2 MiB stretches only, so the tail costs no more than it would have.
Where THP is off, not Linux, or ``GEMMA_PROFILE_HUGEPAGES=0``, it is ``torch.empty``.

The price is paid at load: faulting 2.4 GB in took 1.8-2.7 s on 2 MiB pages against 0.44 s on
4 KiB pages in the Firecracker VM this was measured in (which hands freed 8 MiB blocks back to
its host), and 0.15 s more in all when huge pages had just been freed by a previous run.

Used by `gemma_profiles.engine.loading` (int8 quantized while loading), `gemma_profiles.engine.native`
(the int8 layout) and `gemma_profiles.engine.kernels` (bfloat16 copies); the ``kernels`` and
``quantization`` builtins report the result in their log lines.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterable

import torch

import gemma_profiles.settings as settings
from gemma_profiles.engine.pages import THP_SETTING, huge_page_mode, smaps_bytes

ENV = settings.HUGEPAGES.name
HUGE_PAGE = 2 << 20


def enabled() -> bool:
    """Whether `empty` asks for huge pages (``GEMMA_PROFILE_HUGEPAGES=0`` turns it off)."""
    return settings.switch(settings.HUGEPAGES) and _supported()


def _supported() -> bool:
    return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")


def why_not() -> str:
    """Why weights may sit on ordinary pages here: a setting, or what the kernel reports."""
    if not enabled():
        return f"turned off ({ENV}=0)" if _supported() else "no transparent huge pages on this OS"
    mode = huge_page_mode()
    if not mode:
        return "this kernel has no transparent huge pages"
    if mode == "never":
        return f"transparent huge pages are off: {THP_SETTING} is 'never' (set it to 'madvise')"
    return "the kernel had no free 2 MiB pages when the weights were written (memory fragmented)"


def stretches(nbytes: int) -> int:
    """The bytes of an ``nbytes`` tensor that `empty` asks huge pages for: its whole 2 MiB stretches."""
    return nbytes // HUGE_PAGE * HUGE_PAGE


def empty(shape: tuple[int, ...], dtype: torch.dtype, *, switchable: bool = True) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor; its whole 2 MiB stretches on huge pages where the OS gives them.

    The memory is an anonymous private mapping owned by the tensor's storage: it is unmapped
    when the last tensor viewing it goes.  Below one huge page, ``torch.empty``.

    :param switchable: False ignores ``GEMMA_PROFILE_HUGEPAGES`` (the benchmarks' bandwidth
        probe, which must not change with the configuration it measures).
    """
    nbytes = dtype.itemsize
    for size in shape:
        nbytes *= size
    wanted = enabled() if switchable else _supported()
    if nbytes < HUGE_PAGE or not wanted:
        return torch.empty(shape, dtype=dtype)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping for as long as it lives
    offset = -raw.data_ptr() % HUGE_PAGE
    with contextlib.suppress(OSError):  # a kernel without THP: ordinary pages, as torch.empty gives
        mapping.madvise(mmap.MADV_HUGEPAGE, offset, stretches(nbytes))
    return raw[offset : offset + nbytes].view(dtype).view(shape)


def describe(weights: list[torch.Tensor]) -> str:
    """For a log line: ``"; X GiB of their Y GiB on 2 MiB pages"``, with `why_not` when under
    half of what could be is; empty when none of ``weights`` is large enough to ask."""
    total = sum(weight.numel() * weight.element_size() for weight in weights)
    eligible = sum(stretches(weight.numel() * weight.element_size()) for weight in weights)
    if not eligible:
        return ""
    huge = min(eligible, huge_bytes(weights))
    text = f"; {huge / 2**30:.2f} GiB of their {total / 2**30:.2f} GiB on 2 MiB pages"
    return text + (f" ({why_not()})" if huge < eligible // 2 else "")


def huge_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes on huge pages now in the mappings holding ``tensors`` (0 where there is no smaps)."""
    return smaps_bytes(tensors, "AnonHugePages")
