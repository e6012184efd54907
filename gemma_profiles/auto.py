"""``GEMMA_PROFILE=auto`` and ``gemma-profile detect``: profiles from detected hardware."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import schema
from .hardware import Hardware
from .profile import Origin, Profile
from .registry import Registry
from .units import format_bytes, parse_memory

AUTO = "auto"
_ORIGIN = Origin("<detected hardware>")


def auto_profile(hardware: Hardware) -> Profile:
    """A profile that names only the device; the planner chooses dtype and int8 from the hardware."""
    gpu = hardware.gpus[0] if hardware.gpus else None
    if gpu is not None:
        facts = schema.Hardware(
            device="cuda",
            gpu=[gpu.name],
            compute_capability=f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}",
            memory=gpu.total_memory,
            host_memory=hardware.cpu.total_memory,
        )
        device = "cuda:0"
        what = f"{gpu.name} (cc {facts.compute_capability}, {format_bytes(gpu.total_memory)})"
    else:
        # MPS cannot run gemma's complex RoPE (gemma_pytorch #11): Apple machines use the CPU.
        facts = schema.Hardware(device="mps" if hardware.mps else "cpu", host_memory=hardware.cpu.total_memory)
        device = "cpu"
        what = f"CPU {hardware.cpu.name or ''} ({hardware.cpu.cores} cores, {format_bytes(hardware.cpu.total_memory)})"
    model = schema.ProfileModel(
        name=AUTO,
        description=f"built from detected hardware: {what}",
        hardware=facts,
        placement=schema.Placement(device=device),
    )
    origins: dict[tuple[str | int, ...], Origin] = {("placement", "device"): _ORIGIN, ("hardware",): _ORIGIN}
    return Profile(model, Path("<auto>"), origins, ())


@dataclass(frozen=True)
class Match:
    """The bundled/user profile that best fits this machine, and why."""

    name: str
    reason: str
    score: int


def best_match(hardware: Hardware, registry: Registry) -> Match | None:
    """GPU name first, then compute capability and memory, then host memory for CPU boxes."""
    best: Match | None = None
    gpu = hardware.gpus[0] if hardware.gpus else None
    for name in registry.names():
        profile = registry.load(name)
        facts = profile.model.hardware
        if profile.model.abstract or facts is None:
            continue
        match = _score(name, facts, hardware, gpu)
        if match and (best is None or match.score > best.score):
            best = match
    return best


def _score(name: str, facts: schema.Hardware, hardware: Hardware, gpu: object) -> Match | None:
    from .hardware import GpuInfo

    host = hardware.cpu.total_memory
    if isinstance(gpu, GpuInfo):
        if facts.device != "cuda":
            return None
        if any(n.lower() in gpu.name.lower() or gpu.name.lower() in n.lower() for n in facts.gpu):
            return Match(name, f"GPU name '{gpu.name}' is listed in the profile", 1000)
        if facts.capability_tuple() == gpu.compute_capability and facts.memory is not None:
            memory = parse_memory(facts.memory)
            if memory <= gpu.total_memory:
                return Match(
                    name,
                    f"same compute capability {facts.compute_capability}, profile memory {facts.memory} <= "
                    f"{format_bytes(gpu.total_memory)}",
                    500 + memory // 2**30,
                )
        return None
    wanted = "mps" if hardware.mps else "cpu"
    if facts.device != wanted or facts.host_memory is None:
        return None
    memory = parse_memory(facts.host_memory)
    if memory <= host * 1.1:  # a "32 GB" box reports a little less than 32 GiB
        return Match(
            name,
            f"{wanted} profile for {facts.host_memory} of RAM; this machine has {format_bytes(host)}",
            memory // 2**30,
        )
    return None
