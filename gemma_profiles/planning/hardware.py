"""Facts about this machine, as a typed value tests can fake.

A value module: the facts (`Hardware`, `CpuInfo`, `GpuInfo`) and what follows from them
(`torch_kernel_support`, `native_int8_expected`).  It asks no plugin and imports no torch:
`gemma_profiles.plugin.manager.detect_hardware` asks the ``gemma_profile_detect_hardware``
hook for this machine's facts (the builtin ``hooks/hardware.py`` answers last).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

#: x86 ISA levels we report, lowest first (Linux /proc/cpuinfo flag names).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


def native_int8_expected(isa: tuple[str, ...]) -> bool:
    """Whether the native int8 CPU kernel runs on a CPU with these ISA flags (without torch).

    The engine's own decision (`gemma_profiles.engine.build.int8_verdict`, torch-free): the
    switch, AVX2 or AVX-512 VNNI, and a library this process built or loaded, else a compiler and no
    remembered build failure.  The planner uses it to know whether an int8 model keeps its
    tied embedder int8 in float32 compute too.
    """
    from gemma_profiles.engine.build import int8_verdict

    return int8_verdict(isa) is None


def native_int8_path(isa: tuple[str, ...]) -> str | None:
    """Which path of the native int8 kernel runs on a CPU with these ISA flags: ``"avx512-vnni"``
    (integer sums), ``"avx2"`` (float32 sums; a bfloat16 prompt's products run in float32), or
    None when the kernel does not run (`native_int8_expected`)."""
    from gemma_profiles.engine.build import VNNI_CPU_FLAGS

    if not native_int8_expected(isa):
        return None
    return "avx512-vnni" if any(flag in isa for flag in VNNI_CPU_FLAGS) else "avx2"


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
    #: ``torch.cuda.get_arch_list()``: the ``sm_XY`` (machine code) and ``compute_XY`` (PTX)
    #: targets this torch was built for; empty where torch has no CUDA or sees no GPU.
    cuda_arch_list: tuple[str, ...] = ()

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

    def kernel_support(self, gpu: GpuInfo) -> KernelSupport | None:
        """`torch_kernel_support` of this torch for `gpu`; None where the arch list is unknown
        (a plugin that does not report it, or torch without CUDA)."""
        if not self.cuda_arch_list:
            return None
        return torch_kernel_support(gpu.compute_capability, self.cuda_arch_list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["accelerator"] = self.accelerator
        data["cpu"]["isa_level"] = self.cpu.isa_level
        return data


#: The PyTorch CUDA build line that still carries Maxwell/Pascal/Volta kernels (sm_50/60/61/70);
#: the CUDA 12.8+ and CUDA 13 builds (PyPI's default) start at sm_75 (docs/design.md).
LEGACY_TORCH_INDEX = "https://download.pytorch.org/whl/cu126"
LEGACY_TORCH_FIX = f"pip install torch --index-url {LEGACY_TORCH_INDEX}"
#: Oldest compute capability any current PyTorch CUDA build (cu126) has kernels for.
OLDEST_SUPPORTED_CC = (5, 0)
#: Oldest compute capability PyPI's default torch (a CUDA 13 build) has kernels for.
DEFAULT_BUILD_OLDEST_CC = (7, 5)
_ARCH = re.compile(r"^(sm|compute)_(\d+)([af]?)$")


@dataclass(frozen=True)
class KernelSupport:
    """Whether a torch build can run CUDA kernels on a GPU, and what to do when it cannot."""

    ok: bool
    #: one line: which target serves the GPU, or why none does
    reason: str
    #: one line: the command or step that fixes it ("" when `ok`)
    fix: str = ""
    #: the arch list entry that serves the GPU (``sm_61``, ``compute_50``), "" when none
    match: str = ""
    #: served only by PTX, which the driver compiles on first use (slow start, then cached)
    jit: bool = False

    def __str__(self) -> str:
        return f"{self.reason}; fix: {self.fix}" if self.fix else self.reason


def _capability(value: str | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, tuple):
        return int(value[0]), int(value[1])
    text = str(value).strip().lower().removeprefix("sm_").removeprefix("compute_")
    major, dot, minor = text.partition(".")
    if dot and major.isdigit() and minor.isdigit():
        return int(major), int(minor)
    if not dot and text.isdigit() and len(text) >= 2:
        return int(text[:-1]), int(text[-1])
    raise ValueError(f"compute capability {value!r} is not of the form '6.1'")


def _parse_arch(entry: str) -> tuple[str, tuple[int, int], str] | None:
    """``sm_86`` -> ("sm", (8, 6), ""); ``compute_90a`` -> ("compute", (9, 0), "a"); None if unknown."""
    found = _ARCH.match(entry.strip().lower())
    if not found or len(found.group(2)) < 2:
        return None
    digits = found.group(2)
    return found.group(1), (int(digits[:-1]), int(digits[-1])), found.group(3)


def _serves(kind: str, target: tuple[int, int], suffix: str, gpu: tuple[int, int]) -> bool:
    """CUDA's compatibility rules for one compiled target on a GPU of capability `gpu`.

    Machine code (``sm_XY``) runs on X.Z for Z >= Y, same major only; PTX (``compute_XY``) is
    compiled by the driver for any capability >= X.Y, across majors.  Architecture-specific
    targets (``a`` suffix) run only on exactly X.Y; family targets (``f``) stay within the major.
    """
    if suffix == "a":
        return gpu == target
    if kind == "sm" or suffix == "f":
        return gpu[0] == target[0] and gpu[1] >= target[1]
    return gpu >= target


def torch_kernel_support(
    compute_capability: str | tuple[int, int], arch_list: list[str] | tuple[str, ...]
) -> KernelSupport:
    """Whether a torch built for `arch_list` (``torch.cuda.get_arch_list()``) runs on a GPU of
    `compute_capability` (``"6.1"`` or ``(6, 1)``), with a one-line reason and fix.  No torch needed.

    An empty `arch_list` is a torch without CUDA kernels (``get_arch_list()`` of a CPU build or
    where CUDA is unavailable): not ok.  Entries of unknown form are ignored.

    >>> torch_kernel_support("6.1", ["sm_75", "sm_80", "sm_90"]).ok
    False
    """
    gpu = _capability(compute_capability)
    cc = f"{gpu[0]}.{gpu[1]}"
    parsed = [(entry, arch) for entry in arch_list if (arch := _parse_arch(entry)) is not None]
    sm = f"sm_{gpu[0]}{gpu[1]}"
    machine = [entry for entry, (kind, target, suffix) in parsed if kind == "sm" and _serves(kind, target, suffix, gpu)]
    if machine:
        return KernelSupport(True, f"this torch has {machine[-1]} kernels for compute capability {cc}", "", machine[-1])
    ptx = [
        entry for entry, (kind, target, suffix) in parsed if kind == "compute" and _serves(kind, target, suffix, gpu)
    ]
    if ptx:
        return KernelSupport(
            True,
            f"this torch has no {sm} kernels; the driver compiles its {ptx[-1]} PTX for "
            f"compute capability {cc} on first use (slow first start, cached after)",
            match=ptx[-1],
            jit=True,
        )
    built = sorted({target for _, (_, target, _) in parsed})
    listed = f"built for {' '.join(entry for entry, _ in parsed)}" if parsed else "built without CUDA kernels"
    reason = (
        f"this torch ({listed}) has no kernels for compute capability {cc}; "
        "CUDA would fail mid-run with 'no kernel image is available'"
    )
    where = "https://pytorch.org/get-started/locally/"
    if gpu < OLDEST_SUPPORTED_CC:
        fix = f"no current PyTorch build has kernels for compute capability {cc}; use a CPU profile"
        fix += " (see 'gemma-profile detect')"
    elif gpu < DEFAULT_BUILD_OLDEST_CC:
        fix = f"{LEGACY_TORCH_FIX} (cu126 is the last PyTorch CUDA line with Maxwell/Pascal/Volta kernels)"
    elif built and gpu > built[-1]:
        fix = f"install a newer torch whose CUDA build lists {sm} ({where})"
    else:
        fix = f"install a torch CUDA build that lists {sm} ({where})"
    return KernelSupport(False, reason, fix)
