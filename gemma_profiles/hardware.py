"""Facts about this machine, as a typed value tests can fake.

`detect_hardware` asks the ``gemma_profile_detect_hardware`` hook (firstresult,
so a plugin can supply the facts); the builtin ``hooks/hardware.py`` imports
torch and psutil only when called.  Nothing here imports torch.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

#: x86 ISA levels we report, lowest first (Linux /proc/cpuinfo flag names).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
#: ``0`` turns the native int8 CPU kernel off (`gemma_profiles.native`).
NATIVE_ENV = "GEMMA_PROFILE_NATIVE"
#: Rows of activations (batch x prompt tokens) from which the native int8 kernel hands a
#: product to a float GEMM on a dequantized copy of the weight (gemma_profiles/native.py).
DEQUANTIZE_ROWS = 160
#: Linux's transparent huge page mode: ``always [madvise] never``, the bracketed one in force.
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_mode(setting: str = THP_SETTING) -> str:
    """Linux's transparent huge page mode (``always``, ``madvise``, ``never``); "" where unknown.

    The int8 weights go on 2 MiB pages under ``always`` and ``madvise``
    (`gemma_profiles.hugepages`).
    """
    try:
        with open(setting, encoding="ascii") as handle:
            text = handle.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def native_int8_expected(isa: tuple[str, ...]) -> bool:
    """Whether the native int8 CPU kernel should run on a CPU with these ISA flags (without torch).

    It needs AVX-512 VNNI and a C compiler to build it on first use; the planner uses this to
    know whether an int8 model keeps its tied embedder int8 in float32 compute too.
    """
    if os.environ.get(NATIVE_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    has_vnni = any(flag in isa for flag in ("avx512_vnni", "avx512_bf16", "amx_bf16"))
    return has_vnni and shutil.which(os.environ.get("CC") or "cc") is not None


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int
    free_memory: int | None = None

    @property
    def native_bf16(self) -> bool:
        return self.compute_capability >= (8, 0)


@dataclass(frozen=True)
class CpuInfo:
    """The host CPU and its memory."""

    cores: int
    total_memory: int
    available_memory: int
    isa: tuple[str, ...] = ()
    name: str = ""
    #: `huge_page_mode` of the running kernel ("" where unknown)
    huge_pages: str = ""

    @property
    def isa_level(self) -> str:
        """The highest level in `ISA_FLAGS` this CPU has, e.g. ``"avx512_bf16"``."""
        levels = [flag for flag in ISA_FLAGS if flag in self.isa]
        return levels[-1] if levels else "baseline"


@dataclass(frozen=True)
class Hardware:
    """Everything the planner needs to know about a machine."""

    cpu: CpuInfo
    gpus: tuple[GpuInfo, ...] = ()
    mps: bool = False
    torch_version: str | None = None
    cuda_version: str | None = None

    @property
    def accelerator(self) -> str:
        if self.gpus:
            return "cuda"
        return "mps" if self.mps else "cpu"

    def gpu(self, device: str) -> GpuInfo | None:
        """The GPU a torch device name (``cuda``, ``cuda:1``) refers to."""
        kind, _, index = device.partition(":")
        if kind != "cuda":
            return None
        wanted = int(index) if index else 0
        return next((g for g in self.gpus if g.index == wanted), None)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["accelerator"] = self.accelerator
        data["cpu"]["isa_level"] = self.cpu.isa_level
        return data


def detect_hardware() -> Hardware:
    """This machine's facts, from the first plugin that supplies them."""
    from .plugins import get_plugin_manager

    return get_plugin_manager().detect_hardware()
