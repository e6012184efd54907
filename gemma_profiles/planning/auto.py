"""``auto``: the profile built from detected hardware, and ``gemma-profile detect``'s best match.

``auto`` is a profile name like any other: ``GEMMA_PROFILE=auto``, ``show auto``,
``apply auto``, ``run auto -- ...``, ``plan auto``, ``bench auto`` and ``extends: auto``
in a profile file (the registry resolves it; see `gemma_profiles.spec.registry`).  It names
only the machine - its hardware facts and the device - and leaves dtype and int8 to the
planner, which chooses them from those facts.  Every value's origin says which detected
fact it came from.  No profile file may be called ``auto``: the name is this profile's.

Nothing here imports torch; `detect_hardware` (torch, in the builtin plugin) is called by
the caller, and `nvidia_gpus_visible` looks at the driver's files only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemma_profiles.planning.hardware import GpuInfo, Hardware
from gemma_profiles.spec import schema
from gemma_profiles.spec.profile import Origin, Profile
from gemma_profiles.spec.yamlio import Path_
from gemma_profiles.units import format_bytes, parse_memory

if TYPE_CHECKING:
    from gemma_profiles.spec.registry import Registry

AUTO = "auto"
#: Where ``auto``'s values come from, as a profile path: no file, the detected facts.
AUTO_PATH = Path("<detected hardware>")
#: What ``list`` says about ``auto`` without detecting anything (detection imports torch).
AUTO_DESCRIPTION = "built from this machine's detected hardware (see 'gemma-profile detect')"


def auto_parts(hardware: Hardware) -> tuple[dict[str, Any], dict[Path_, Origin]]:
    """``auto``'s profile data and, for every value, the detected fact it came from."""
    gpu = hardware.gpus[0] if hardware.gpus else None
    cpu = hardware.cpu
    host = {"host_memory": cpu.total_memory, "cpu_cores": cpu.cores}
    origins: dict[Path_, Origin] = {
        ("hardware", "host_memory"): _detected("this machine's RAM"),
        ("hardware", "cpu_cores"): _detected("CPU cores this process may use"),
    }
    if gpu is not None:
        capability = f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}"
        hardware_data: dict[str, Any] = {
            "device": "cuda",
            "gpu": [gpu.name],
            "compute_capability": capability,
            "memory": gpu.total_memory,
            **host,
        }
        origins.update(
            {
                ("hardware", "device"): _detected(f"CUDA device cuda:{gpu.index}"),
                ("hardware", "gpu"): _detected(f"cuda:{gpu.index}'s name"),
                ("hardware", "compute_capability"): _detected(f"cuda:{gpu.index}'s compute capability"),
                ("hardware", "memory"): _detected(f"cuda:{gpu.index}'s memory"),
                ("placement", "device"): _detected(f"the first CUDA device, cuda:{gpu.index}"),
            }
        )
        device = f"cuda:{gpu.index}"
        what = f"{gpu.name} (cc {capability}, {format_bytes(gpu.total_memory)})"
    else:
        # MPS cannot run gemma's complex RoPE (gemma_pytorch #11): Apple machines use the CPU.
        hardware_data = {"device": "mps" if hardware.mps else "cpu", **host}
        why = "MPS, which lacks gemma's complex RoPE: the CPU" if hardware.mps else "no CUDA device: the CPU"
        origins.update({("hardware", "device"): _detected(why), ("placement", "device"): _detected(why)})
        device = "cpu"
        what = f"CPU {cpu.name or ''} ({cpu.cores} cores, {format_bytes(cpu.total_memory)})".replace("CPU  (", "CPU (")
    data = {
        "name": AUTO,
        "description": f"built from detected hardware: {what}",
        "hardware": hardware_data,
        "placement": {"device": device},
    }
    origins[("name",)] = Origin("built in: the name of the profile from detected hardware")
    origins[("description",)] = _detected("a summary of the facts below")
    return data, origins


def _detected(fact: str) -> Origin:
    return Origin(f"detected: {fact}")


def auto_profile(hardware: Hardware) -> Profile:
    """A profile that names only the machine; the planner chooses dtype and int8 from its facts."""
    data, origins = auto_parts(hardware)
    model = schema.ProfileModel.model_validate(data)
    return Profile(model, AUTO_PATH, origins, (AUTO_PATH,))


def is_auto(profile: Profile) -> bool:
    """``auto`` itself, or a profile that extends it: its hardware facts are this machine's."""
    return AUTO_PATH in profile.chain or profile.path == AUTO_PATH


# -- a quick look for NVIDIA GPUs, without torch ----------------------------------------------

#: The NVIDIA driver's per-GPU folders (Linux), and its device nodes.
NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")
NVIDIA_DEV = Path("/dev")
_NODE = re.compile(r"^nvidia\d+$")


def nvidia_gpus_visible(proc: Path = NVIDIA_PROC, dev: Path = NVIDIA_DEV) -> list[str]:
    """Names of the NVIDIA GPUs the driver shows (``?`` where only a device node says so); [] when none.

    Reads a few small files only (no torch, no CUDA initialisation).  An empty list is not
    proof that CUDA is absent (another OS, WSL): callers confirm with `detect_hardware`.
    """
    names: list[str] = []
    try:
        for folder in sorted(proc.iterdir()):
            names.append(_model_name(folder / "information") or "?")
    except OSError:
        pass
    if names:
        return names
    try:
        return ["?" for node in sorted(dev.iterdir()) if _NODE.match(node.name)]
    except OSError:
        return []


def _model_name(information: Path) -> str:
    try:
        with open(information, encoding="utf-8", errors="replace") as handle:
            for line in handle.read(4096).splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "Model":
                    return value.strip()
    except OSError:
        pass
    return ""


# -- the best-fitting profile here ----------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """The bundled/user profile that best fits this machine, and why."""

    name: str
    reason: str
    score: int


def best_match(hardware: Hardware, registry: Registry, on_broken: Any = None) -> Match | None:
    """GPU name first, then compute capability and memory, then host memory for CPU boxes.

    :param on_broken: called with (name, error) for a profile that cannot be loaded; it is
        skipped (default: skipped silently), so one broken file does not hide the others.
    """
    from gemma_profiles.errors import GemmaProfileError

    best: Match | None = None
    gpu = hardware.gpus[0] if hardware.gpus else None
    for name in registry.names():
        try:
            profile = registry.load(name)
        except GemmaProfileError as exc:
            if on_broken is not None:
                on_broken(name, exc)
            continue
        facts = profile.model.hardware
        if profile.model.abstract or facts is None or profile.model.placement.tensor_parallel > 1:
            continue  # a profile for several ranks (torchrun) never runs a script started alone
        needed = gpus_named(profile.model.placement)
        if needed > max(len(hardware.gpus), 1):
            continue  # a pipeline over more GPUs than this machine has
        match = _score(name, facts, hardware, gpu)
        if match and needed > 1:  # of two profiles for this GPU, the one that uses all of them
            match = Match(match.name, f"{match.reason}; it uses {needed} of them", match.score + needed)
        if match and (best is None or match.score > best.score):
            best = match
    return best


def gpus_named(placement: schema.Placement) -> int:
    """How many CUDA devices a placement needs: one past the highest ``cuda:N`` its ``device``,
    ``max_memory`` and ``device_map`` name (1 when it names none)."""
    from gemma_profiles.planning.plan import memory_limits

    named = [str(placement.device or ""), *memory_limits(placement)]
    if isinstance(placement.device_map, dict):
        named += [str(value) for value in placement.device_map.values()]
    indices = [int(n.split(":")[1]) for n in named if re.fullmatch(r"cuda:\d+", n)]
    return max(indices, default=0) + 1


def _score(name: str, facts: schema.Hardware, hardware: Hardware, gpu: GpuInfo | None) -> Match | None:
    host = hardware.cpu.total_memory
    if gpu is not None:
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
