"""A new machine's profile, written from what is known about it: ``gemma-profile new``.

`profile_text` turns detected `Hardware` into profile YAML in which every value carries a
comment saying where it came from (the rule the bundled profiles follow): a fact read from
this machine, or the planner's choice with its reason.  The dtype and int8 choices are the
planner's own for each gemma variant, so a profile written here plans exactly as
``GEMMA_PROFILE=auto`` would on this machine, and can then be edited and shared.

`schema_json` is the JSON Schema of a profile file, generated from the pydantic model that
validates profiles; the package ships it as ``profile.schema.json`` for editors.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gemma_profiles.planning.auto import auto_profile
from gemma_profiles.planning.hardware import Hardware
from gemma_profiles.planning.plan import Plan, make_plan
from gemma_profiles.spec import schema
from gemma_profiles.spec.variants import FAMILIES, VARIANTS
from gemma_profiles.units import format_bytes

SCHEMA_FILE = "profile.schema.json"


def schema_json() -> str:
    """The JSON Schema (draft 2020-12) of a profile file, as text with a final newline."""
    document = schema.ProfileModel.model_json_schema()
    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "gemma-profiles profile",
        **{key: value for key, value in document.items() if key != "title"},
    }
    return json.dumps(document, indent=2, sort_keys=False) + "\n"


def shipped_schema() -> Path:
    """The installed ``profile.schema.json`` (what ``new`` points editors at)."""
    return Path(str(resources.files("gemma_profiles.spec") / SCHEMA_FILE))


def modeline() -> str:
    """The first line of a profile written by ``new``: yaml-language-server reads its schema from it."""
    return f"# yaml-language-server: $schema={shipped_schema().as_uri()}"


@dataclass(frozen=True)
class Choice:
    """The planner's decision for one variant on this machine."""

    variant: str
    dtype: str
    dtype_reason: str
    int8: bool
    int8_reason: str
    verdict: str | None


def _choice(plan: Plan) -> Choice:
    dtype = plan.config.get("dtype")
    quant = plan.config.get("quant")
    verdict = None
    if plan.verdict is not None and not plan.verdict.fits:
        verdict = f"short by {format_bytes(plan.verdict.shortfall)}" + (
            f"; cheapest change that fits: {plan.verdict.suggestion}" if plan.verdict.suggestion else ""
        )
    return Choice(
        plan.variant or "",
        str(dtype.value) if dtype else "float32",
        _reason(dtype.origin) if dtype else "",
        plan.quantization == "int8",
        _reason(quant.origin) if quant else "",
        verdict,
    )


def _reason(origin: str) -> str:
    return origin[len("auto: ") :] if origin.startswith("auto: ") else origin


def profile_text(name: str, hardware: Hardware, *, extends: str | None = None, today: _dt.date | None = None) -> str:
    """Profile YAML for ``hardware``, every value with a comment saying where it came from."""
    base = auto_profile(hardware)
    facts = base.model.hardware
    assert facts is not None
    gpu = hardware.gpus[0] if hardware.gpus else None
    choices = {variant: _choice(make_plan(base, variant)) for variant in VARIANTS}
    date = (today or _dt.date.today()).isoformat()
    parent = extends or ("base-cuda" if facts.device == "cuda" else "base-cpu")
    lines = [
        modeline(),
        f"# {name}: written by 'gemma-profile new --from-detect' on {date} from this machine's",
        "# detected facts and the planner's choices for them. Each value says where it came from;",
        "# where you know better (a data sheet, nvidia-smi -q, a measurement), change it and say so.",
        f"name: {name}",
        f"description: {json.dumps(_description(hardware))}",
        f"extends: {parent}" + ("" if extends else f"  # the bundled base for {facts.device} machines"),
        "hardware:",
        f"  device: {facts.device}  # detected"
        + (": torch.cuda.is_available()" if facts.device == "cuda" else ": no CUDA device"),
    ]
    if gpu is not None:
        lines += [
            f"  gpu: [{json.dumps(gpu.name)}]  # detected: torch.cuda.get_device_name({gpu.index})",
            f'  compute_capability: "{facts.compute_capability}"  # detected: torch.cuda.get_device_capability()',
            f"  memory: {_size(gpu.total_memory)}  # detected: total device memory ({format_bytes(gpu.total_memory)})",
        ]
    lines.append(
        f"  host_memory: {_size(hardware.cpu.total_memory)}  # detected: total RAM"
        f" ({format_bytes(hardware.cpu.total_memory)}, psutil)"
    )
    lines.append(
        f"  cpu_cores: {hardware.cpu.cores}  # detected: {hardware.cpu.cores} cores"
        + (f", ISA {hardware.cpu.isa_level}" if hardware.cpu.isa else "")
    )
    lines += _dtype_lines(choices)
    return "\n".join(lines) + "\n"


def _description(hardware: Hardware) -> str:
    if hardware.gpus:
        gpu = hardware.gpus[0]
        cc = f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}"
        return f"{gpu.name}, {format_bytes(gpu.total_memory)} (cc {cc})"
    cpu = hardware.cpu
    return f"CPU only: {cpu.name or 'CPU'}, {cpu.cores} cores, {format_bytes(cpu.total_memory)} RAM"


def _size(n: int) -> str:
    """Bytes as a profile memory size, rounded down to 0.1 GiB (a budget should not round up)."""
    tenths = int(n * 10 // 2**30)
    return f"{tenths // 10}.{tenths % 10}GiB" if tenths % 10 else f"{tenths // 10}GiB"


def _dtype_lines(choices: dict[str, Choice]) -> list[str]:
    """``config.dtype`` as the most common choice, then the families and variants that differ."""
    common = Counter(choice.dtype for choice in choices.values()).most_common(1)[0][0]
    example = next(choice for choice in choices.values() if choice.dtype == common)
    lines = ["config:", f"  dtype: {common}  # planner: {example.dtype_reason}"]
    variants: list[str] = []
    misfits: list[str] = []
    for family in FAMILIES:
        members = [choices[v] for v, shape in VARIANTS.items() if shape.family == family]
        dtypes = {choice.dtype for choice in members}
        family_dtype = dtypes.pop() if len(dtypes) == 1 else common
        if family_dtype != common:
            reason = members[0].dtype_reason
            variants.append(f"  {family}: {{config: {{dtype: {family_dtype}}}}}  # planner: {reason}")
        for choice in members:
            body: list[str] = []
            why: list[str] = []
            if choice.dtype != family_dtype:
                body.append(f"config: {{dtype: {choice.dtype}}}")
                why.append(choice.dtype_reason)
            if choice.int8:
                body.append("quantization: {weights: int8}")
                why.append(choice.int8_reason)
            if body:
                variants.append(f"  {choice.variant}: {{{', '.join(body)}}}  # planner: {'; '.join(why)}")
            if choice.verdict:
                misfits.append(f"#   {choice.variant}: {choice.verdict}")
    if variants:
        lines += ["variants:", *variants]
    if misfits:
        lines += ["# Too big for this machine as planned ('gemma-profile plan NAME --variant V' says more):", *misfits]
    return lines


def check_name(name: str) -> str | None:
    """Why ``name`` cannot name a profile, or None."""
    if not schema._NAME.match(name):  # the pattern the schema holds a name: to
        return (
            "a profile name is lower-case letters, digits, '.', '_' or '-' (at most 64), "
            "starting with a letter or digit"
        )
    if name == "auto":
        return "'auto' is the profile built from detected hardware at run time; choose another name"
    return None


def template_text(name: str, extends: str) -> str:
    """A profile that only extends ``extends``, with the hardware section to fill in."""
    return "\n".join(
        [
            modeline(),
            f"# {name}: say here which machine this is for and where each fact below comes from",
            "# (a data sheet, nvidia-smi -q, /proc/meminfo, a measurement).",
            f"name: {name}",
            'description: "describe the machine in one line"',
            f"extends: {extends}",
            "# hardware:                 # fill in what the machine has",
            "#   device: cuda            # cuda, cpu or mps",
            '#   gpu: ["NVIDIA GeForce RTX 2060"]',
            '#   compute_capability: "7.5"',
            "#   memory: 6GiB",
            "#   host_memory: 16GiB",
            "",
        ]
    )


def write_new(path: Path, text: str, *, force: bool) -> None:
    """Write ``text`` to ``path`` (folders made), refusing to replace a file unless ``force``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "w" if force else "x"
    with open(path, mode, encoding="utf-8") as handle:
        handle.write(text)
