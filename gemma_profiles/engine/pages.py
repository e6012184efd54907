"""Operating-system page work for the engine: madvise, the process's mappings, smaps, huge pages.

The one place that calls ``madvise`` and ``malloc_trim`` (through ctypes' libc), parses ``/proc/self/maps`` and
``/proc/self/smaps``, and reads the transparent huge page mode; the engine's modules ask
here.  No torch at run time: a "tensor" below is anything with torch's ``data_ptr()``,
``numel()``, ``element_size()`` and ``device`` (the planner's hardware facts read
`huge_page_mode` too).  Linux only where it says so; elsewhere every question has a
harmless answer (no mappings, nothing released, advice not taken).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

PAGE = mmap.PAGESIZE
#: ``madvise`` advice (Linux): drop the pages (a private file mapping re-reads them from the
#: file; anonymous memory comes back zeroed), page them out, map them in in one call (5.14).
MADV_DONTNEED = 4
MADV_PAGEOUT = 21
MADV_POPULATE_READ = 22
#: Linux's transparent huge page mode: ``always [madvise] never``, the bracketed one in force.
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists; one we may not signal counts as alive (it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL | None:
    """The C library with ``madvise`` declared; None where there is none to load."""
    try:
        library = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        library.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    except (OSError, AttributeError):
        return None
    return library


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``); False where there
    is no such call (not glibc).

    A weight converted while loading (a float32 checkpoint in a bfloat16 model) lives in the heap,
    not in the file's pages; freed after its copy onto 2 MiB pages, glibc keeps its pages: Gemma 3
    270M under cpu-32gb stayed 138 MiB above the plain model after loading (1072 against 934 MiB),
    and loading peaked there too.  Trimming after each copy (`gemma_profiles.engine.kernels`) keeps
    the peak one tensor above the model (about 35 ms for the 270M's 90 layers)."""
    library = libc()
    trim = getattr(library, "malloc_trim", None) if library is not None else None
    if trim is None:
        return False
    trim(0)
    return True


def whole_pages(tensor: Any) -> tuple[int, int] | None:
    """The whole pages inside a CPU tensor's bytes, ``[first, last)``; None if there are none."""
    if tensor.device.type != "cpu" or getattr(tensor, "is_mkldnn", False) or getattr(tensor, "is_meta", False):
        return None
    start, length = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    first = -(-start // PAGE) * PAGE
    last = (start + length) // PAGE * PAGE
    return (first, last) if last > first else None


def advise(tensor: Any, advice: int) -> bool:
    """``madvise`` the whole pages inside ``tensor`` (Linux; a hint, never required).

    :returns: whether the kernel took the advice.
    """
    pages = whole_pages(tensor) if sys.platform.startswith("linux") else None
    library = libc()
    if pages is None or library is None:
        return False
    return int(library.madvise(ctypes.c_void_p(pages[0]), ctypes.c_size_t(pages[1] - pages[0]), advice)) == 0


class Mapping(NamedTuple):
    """One line of ``/proc/self/maps``: ``[low, high)``, permissions (``r-xp``), inode, path ("" if none)."""

    low: int
    high: int
    perms: str
    inode: int
    path: str

    @property
    def private_file(self) -> bool:
        """A private mapping of a file (a memory-mapped checkpoint's pages re-read from it)."""
        return self.inode != 0 and self.perms.endswith("p")


def _read_maps() -> Iterator[Mapping]:
    """The lines of ``/proc/self/maps`` as they are read (the one parser; raises OSError/ValueError)."""
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 5:
                continue
            low, _, high = fields[0].partition("-")
            inode = int(fields[4]) if fields[4].isdigit() else 0
            path = fields[5].strip() if len(fields) == 6 else ""
            yield Mapping(int(low, 16), int(high, 16), fields[1], inode, path)


def mappings() -> list[Mapping] | None:
    """This process's mappings (``/proc/self/maps``); None where it is not readable."""
    try:
        return list(_read_maps())
    except (OSError, ValueError):
        return None


def file_backed(first: int, last: int) -> bool:
    """Whether ``[first, last)`` lies in one private file mapping.

    ``MADV_DONTNEED`` on anonymous memory zeroes it: only a mapped checkpoint's pages,
    which the kernel re-reads from the file, may be dropped.  Called for every chunk the
    loader releases: it stops at the mapping holding ``first``.
    """
    try:
        for mapping in _read_maps():
            if mapping.low <= first < mapping.high:
                return last <= mapping.high and mapping.private_file
    except (OSError, ValueError):
        return False
    return False


def mapped_ranges(inodes: set[int] | None = None) -> list[tuple[int, int, int]] | None:
    """(low, high, inode) of the file mappings in this process (of ``inodes`` only, when given);
    None where ``/proc`` is not readable."""
    found = mappings()
    if found is None:
        return None
    return [(m.low, m.high, m.inode) for m in found if m.inode != 0 and (inodes is None or m.inode in inodes)]


def file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files named by a path (empty where unknown)."""
    return [(m.low, m.high) for m in mappings() or () if m.path.startswith("/")]


def memory_mapped(tensor: Any) -> bool:
    """Whether ``tensor`` (contiguous) lies in a private file mapping: a mapped checkpoint's."""
    pages = whole_pages(tensor)
    return pages is not None and file_backed(*pages)


def release_pages(tensor: Any) -> None:
    """Drop the resident pages of a memory-mapped source tensor we are done with (Linux).

    The mapping is private and never written, so the kernel re-reads the file if
    the pages are touched again; without this, every converted tensor's source
    pages stay in RSS until the whole checkpoint mapping goes away.  Anything else
    (anonymous memory, which ``MADV_DONTNEED`` would zero) is left alone.
    """
    pages = whole_pages(tensor)
    if pages is not None and file_backed(*pages):
        advise(tensor, MADV_DONTNEED)


def smaps_bytes(tensors: Iterable[Any], field: str) -> int:
    """A byte count of ``/proc/self/smaps`` (``Rss``, ``AnonHugePages``...) summed over the
    mappings holding ``tensors``; 0 where there is no smaps.

    Counted once per mapping: the kernel merges neighbouring mappings alike, so two tensors
    may share one.
    """
    starts = sorted({tensor.data_ptr() for tensor in tensors})
    total, counted = 0, False
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
            for line in smaps:
                head = line.split(maxsplit=1)[0] if line.strip() else ""
                if "-" in head and not head.endswith(":"):
                    low, _, high = head.partition("-")
                    first, last = int(low, 16), int(high, 16)
                    counted = any(first <= start < last for start in starts)
                elif counted and head == field + ":":
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total


def huge_page_mode(setting: str = THP_SETTING) -> str:
    """Linux's transparent huge page mode (``always``, ``madvise``, ``never``); "" where unknown.

    The int8 weights go on 2 MiB pages under ``always`` and ``madvise``
    (`gemma_profiles.engine.hugepages`).
    """
    try:
        with open(setting, encoding="ascii") as handle:
            text = handle.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""
