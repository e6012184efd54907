"""The framework half's facts in one place each (issue 16): the hook marker, the hardware
question, whether a plan computes on the CPU."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import gemma_profiles
from gemma_profiles.planning import hardware
from gemma_profiles.plugin import hookspecs, manager


def test_hookimpl_is_defined_once_and_re_exported():
    assert gemma_profiles.hookimpl is hookspecs.hookimpl
    assert hookspecs.hookimpl.project_name == hookspecs.PROJECT_NAME == "gemma_profiles"


def test_planning_hardware_is_a_value_module():
    """Asking the plugins is the manager's: planning.hardware imports nothing of the plugin layer."""
    assert not hasattr(hardware, "detect_hardware")
    tree = ast.parse(Path(hardware.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name and name.startswith("gemma_profiles.plugin")}


def test_detect_hardware_asks_the_plugins(fake_hardware):
    facts = hardware.Hardware(cpu=hardware.CpuInfo(cores=3, total_memory=5 << 30, available_memory=4 << 30))
    fake_hardware(facts)
    assert manager.detect_hardware() is facts


def _plan(write_profile: Any, placement: str) -> Any:
    from gemma_profiles.planning.plan import make_plan
    from gemma_profiles.spec.profile import load_profile

    path = write_profile("where", f"description: t\nplacement: {placement}\n")
    return make_plan(load_profile(str(path)), variant="2b")


def test_runs_on_cpu_asks_about_devices_only_without_a_device(write_profile):
    asked: list[str] = []

    def none_here(device: str) -> str | None:
        asked.append(device)
        return f"no {device} here"

    def cuda_here(device: str) -> str | None:
        asked.append(device)
        return None if device == "cuda" else f"no {device} here"

    assert _plan(write_profile, "{device: cpu}").runs_on_cpu(none_here)
    assert not _plan(write_profile, "{device: 'cuda:0'}").runs_on_cpu(none_here)
    assert not _plan(write_profile, "{device: cpu, offload: disk}").runs_on_cpu(none_here)
    assert asked == []  # the plan said it all
    assert _plan(write_profile, "{}").runs_on_cpu(none_here)
    assert asked == ["cuda", "mps"]
    assert not _plan(write_profile, "{}").runs_on_cpu(cuda_here)
