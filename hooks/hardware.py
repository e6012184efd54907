"""Hardware detection: torch for CUDA/MPS, psutil for memory, /proc/cpuinfo for ISA flags,
/sys for the transparent huge page mode.

Every CUDA device reports its compute capability read directly — not
``torch.cuda.is_bf16_supported()``, which also counts emulation (docs/design.md) — and the
targets this torch was built for (``torch.cuda.get_arch_list()``), which
`gemma_profiles.planning.hardware.torch_kernel_support` checks against each capability.
"""

from __future__ import annotations

import os
import platform

import psutil

from gemma_profiles.engine.pages import huge_page_mode
from gemma_profiles.planning.hardware import ISA_FLAGS, CpuInfo, GpuInfo, Hardware
from gemma_profiles.plugin.hookspecs import hookimpl


def cpu_flags() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(flag for flag in ISA_FLAGS if flag in flags)
    except OSError:
        pass
    return ()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@hookimpl(trylast=True)
def gemma_profile_detect_hardware() -> Hardware:
    import torch

    memory = psutil.virtual_memory()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpu = CpuInfo(cores, memory.total, memory.available, cpu_flags(), cpu_name(), huge_page_mode())
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            try:
                free, _ = torch.cuda.mem_get_info(index)
            except RuntimeError:
                free = None
            gpus.append(GpuInfo(index, props.name, (props.major, props.minor), props.total_memory, free))
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    arch_list = tuple(torch.cuda.get_arch_list()) if gpus else ()
    return Hardware(cpu, tuple(gpus), mps, torch.__version__, torch.version.cuda, arch_list)
