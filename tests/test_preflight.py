"""Preflight: what construction checks before any weight is read (docs/planning.md).

`torch_kernel_support` is pure (no torch): CUDA's rules for machine code (``sm_XY`` runs on
X.Z, Z >= Y, same major) and PTX (``compute_XY`` is compiled by the driver for any capability
>= X.Y) against the arch list a torch build reports.
"""

from __future__ import annotations

import pytest

from gemma_profiles.planning.hardware import (
    LEGACY_TORCH_FIX,
    CpuInfo,
    GpuInfo,
    Hardware,
    KernelSupport,
    torch_kernel_support,
)

#: torch.cuda.get_arch_list() of the builds that matter (PyTorch's CUDA 12.6, 12.8 and 13 lines).
CU126 = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
CU128 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_110", "sm_120", "compute_120"]


@pytest.mark.parametrize("arch_list", [CU128, CU130], ids=["cu128", "cu130"])
def test_pascal_on_a_default_torch_is_refused_with_the_cu126_fix(arch_list: list[str]) -> None:
    support = torch_kernel_support("6.1", arch_list)
    assert not support.ok and not support.match
    assert "compute capability 6.1" in support.reason and "no kernel image is available" in support.reason
    assert support.fix.startswith(LEGACY_TORCH_FIX)
    assert "https://download.pytorch.org/whl/cu126" in str(support) and "last" in support.fix
    assert "\n" not in str(support)


@pytest.mark.parametrize(
    ("cc", "match"),
    [("6.1", "sm_60"), ("6.0", "sm_60"), ("5.2", "sm_50"), ("7.0", "sm_70"), ("7.5", "sm_75"), ("8.9", "sm_86")],
)
def test_machine_code_runs_on_the_same_major_at_or_above(cc: str, match: str) -> None:
    support = torch_kernel_support(cc, CU126)
    assert support.ok and support.match == match and not support.jit and support.fix == ""


def test_machine_code_does_not_run_below_its_minor_nor_on_another_major() -> None:
    assert not torch_kernel_support("8.0", ["sm_86"]).ok  # 8.6 code on an A100
    assert not torch_kernel_support("9.0", ["sm_86"]).ok  # no PTX: no way across majors
    assert not torch_kernel_support("7.5", ["sm_80"]).ok


def test_ptx_is_compiled_for_any_capability_at_or_above_even_across_majors() -> None:
    support = torch_kernel_support("6.1", ["sm_75", "compute_50"])
    assert support.ok and support.jit and support.match == "compute_50"
    assert "first use" in support.reason
    blackwell = torch_kernel_support((12, 0), ["sm_50", "sm_90", "compute_90"])
    assert blackwell.ok and blackwell.jit
    assert not torch_kernel_support("6.1", ["sm_75", "compute_75"]).ok  # PTX never runs below its target
    # machine code is preferred over PTX when both serve
    assert torch_kernel_support("9.0", ["sm_90", "compute_90"]) == KernelSupport(
        True, "this torch has sm_90 kernels for compute capability 9.0", "", "sm_90"
    )


def test_architecture_specific_targets_run_only_on_their_own_capability() -> None:
    assert torch_kernel_support("9.0", ["sm_90a"]).ok
    assert not torch_kernel_support("10.0", ["sm_90a", "compute_90a"]).ok
    assert torch_kernel_support("10.3", ["sm_100f"]).ok  # a family target stays within its major
    assert not torch_kernel_support("12.0", ["sm_100f", "compute_100f"]).ok


def test_fixes_for_too_old_too_new_and_cpu_only_torch() -> None:
    kepler = torch_kernel_support("3.7", CU126)
    assert not kepler.ok and "no current PyTorch build" in kepler.fix and "gemma-profile detect" in kepler.fix
    newer = torch_kernel_support("12.0", CU126)
    assert not newer.ok and "newer torch" in newer.fix and "sm_120" in newer.fix
    cpu_only = torch_kernel_support("7.5", [])
    assert not cpu_only.ok and "without CUDA kernels" in cpu_only.reason
    assert torch_kernel_support("7.0", []).fix.startswith(LEGACY_TORCH_FIX)


@pytest.mark.parametrize("cc", ["6.1", (6, 1), "sm_61", "61"])
def test_capability_spellings(cc: str | tuple[int, int]) -> None:
    assert torch_kernel_support(cc, ["sm_60"]).ok


@pytest.mark.parametrize("cc", ["six", "6.x", "", "6"])
def test_a_malformed_capability_is_one_clear_error(cc: str) -> None:
    with pytest.raises(ValueError, match=r"not of the form '6\.1'"):
        torch_kernel_support(cc, CU126)


def test_unknown_arch_entries_are_ignored() -> None:
    assert torch_kernel_support("6.1", ["gfx90a", "sm_", "sm_60", "compute_x"]).match == "sm_60"


def test_hardware_kernel_support_is_none_where_the_arch_list_is_unknown() -> None:
    p2200 = GpuInfo(0, "Quadro P2200", (6, 1), 5 << 30)
    cpu = CpuInfo(2, 8 << 30, 6 << 30)
    assert Hardware(cpu, (p2200,)).kernel_support(p2200) is None
    support = Hardware(cpu, (p2200,), cuda_arch_list=tuple(CU130)).kernel_support(p2200)
    assert support is not None and not support.ok
