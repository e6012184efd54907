"""``gemma-profile``: list, show, validate, apply, current, reset, run, plugins.

Read commands never import torch.  A user's mistake prints one line on stderr
and exits non-zero (2; ``validate`` exits 1 when it finds problems).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

import gemma_profiles.log as log
import gemma_profiles.settings as settings
from gemma_profiles.cli.common import echo, emit_json, load_any, warn
from gemma_profiles.errors import GemmaProfileError, did_you_mean, printable
from gemma_profiles.spec.profile import Profile
from gemma_profiles.spec.registry import PROFILE_SUFFIXES, Registry, default_registry, looks_like_path, reserved_name
from gemma_profiles.spec.variants import VARIANTS


class _Group(click.Group):
    """Turns our errors into one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GemmaProfileError as exc:
            _fail(str(exc), exc.exit_code)


def _fail(message: str, code: int = 2) -> NoReturn:
    echo(f"gemma-profile: error: {message}", err=True)
    sys.exit(code)


#: Commands that only read: a broken plugin is skipped with one warning line instead of stopping them.
#: Building a model (bench, and the user's script that run starts) still refuses it.
READ_COMMANDS = frozenset({"list", "show", "validate", "current", "plugins", "detect", "plan"})


def _examples(*lines: str) -> str:
    """A command's help epilog: its examples, kept as written (click's ``\\b``)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def _variant_option(required: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--variant``/``-v``: one list of gemma variants for show, plan and bench."""
    return click.option("--variant", "-v", required=required, help=f"gemma variant: {', '.join(VARIANTS)}.")


def _check_variant(variant: str | None) -> None:
    if variant is not None and variant not in VARIANTS:
        raise GemmaProfileError(
            f"unknown variant '{variant}'{did_you_mean(variant, VARIANTS)}", hint=f"use one of {', '.join(VARIANTS)}"
        )


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=_examples(
        "gemma-profile detect                   # this machine, and the profile that fits it",
        "gemma-profile plan cpu-8gb --variant 2b",
        "gemma-profile run cpu-8gb -- python my_script.py",
        "gemma-profile COMMAND --help           # each command, with examples",
    ),
)
@click.version_option(package_name="gemma-profiles")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Hardware profiles for gemma_pytorch: dtype, quantization and placement, applied at runtime."""
    log.enable()
    if ctx.invoked_subcommand in READ_COMMANDS:
        from gemma_profiles.plugin import manager as plugins

        plugins.tolerate_broken_plugins(warn)
        ctx.call_on_close(lambda: plugins.tolerate_broken_plugins(None))


@cli.command(
    "list",
    epilog=_examples(
        "gemma-profile list",
        "gemma-profile list --all --json    # with the abstract base-* profiles",
        "(a broken profile file is one warning line and a 'broken' row; the others are listed; exit 0)",
    ),
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--all", "show_all", is_flag=True, help="Include abstract base profiles.")
def list_profiles(as_json: bool, show_all: bool) -> None:
    """List the profiles available here, with the hardware each is for."""
    from gemma_profiles.planning.auto import AUTO, AUTO_DESCRIPTION

    registry = default_registry()
    rows: list[dict[str, Any]] = [
        {
            "name": AUTO,
            "description": AUTO_DESCRIPTION,
            "device": None,
            "compute_capability": None,
            "memory": None,
            "host_memory": None,
            "dtype": None,
            "abstract": False,
            "source": "detected",
            "path": None,
            "problem": None,
        }
    ]
    for name, entry in registry.index().items():
        try:
            profile = registry.load(name)
        except GemmaProfileError as exc:  # one line, and the rest are still listed
            problem = str(exc)
            if "gemma-profile validate" not in problem:
                problem += f" ('gemma-profile validate {entry.path}' lists every problem)"
            warn(f"profile '{name}' ({entry.source.label}) is broken: {problem}")
            rows.append({"name": name, "source": entry.source.label, "path": str(entry.path), "problem": problem})
            continue
        if profile.model.abstract and not show_all:
            continue
        hardware = profile.model.hardware
        rows.append(
            {
                "name": name,
                "description": profile.description,
                "device": hardware.device if hardware else None,
                "compute_capability": hardware.compute_capability if hardware else None,
                "memory": hardware.memory if hardware else None,
                "host_memory": hardware.host_memory if hardware else None,
                "dtype": profile.model.config.dtype,
                "abstract": profile.model.abstract,
                "source": entry.source.label,
                "path": str(entry.path),
                "problem": None,
            }
        )
    for path, source, reason in registry.refused:  # auto.yaml: the registry has said why (a warning)
        rows.append({"name": path.stem, "source": source.label, "path": str(path), "problem": reason, "reserved": True})
    rows.sort(key=lambda row: (row["name"], row["path"] or ""))
    if as_json:
        emit_json(rows)
        return
    width = max((len(printable(r["name"])) for r in rows), default=4)
    source_width = max((len(printable(r["source"])) for r in rows), default=8)
    for row in rows:
        text = row["description"] if row["problem"] is None else "broken: see the warning above"
        if row.get("reserved"):
            text = f"{row['path']}: not used, the name is the detected profile's (see the warning above)"
        echo(f"{printable(row['name']):<{width}}  {printable(row['source']):<{source_width}}  {text}")


@cli.command(
    epilog=_examples(
        "gemma-profile show pascal-5gb",
        "gemma-profile show pascal-5gb --variant 7b   # with the 7b overrides folded in",
        "gemma-profile show auto                      # built from this machine; each value names its fact",
        "gemma-profile show ./my-profile.yaml --json",
    )
)
@click.argument("name")
@_variant_option(required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show(name: str, variant: str | None, as_json: bool) -> None:
    """Show a profile fully resolved, and where each value came from (--variant folds in its overrides).

    'auto' is built from this machine's detected hardware; its values say which fact they came from.
    """
    from gemma_profiles.planning.auto import AUTO, AUTO_PATH, is_auto
    from gemma_profiles.planning.plan import make_plan

    _check_variant(variant)
    registry = default_registry()
    profile = registry.load(name)
    shown = profile.resolve(variant) if variant else profile
    plan = make_plan(profile, variant, target=_detected_target(registry, profile) if is_auto(profile) else None)
    values = [{"key": k, "value": v, "from": str(o) if o else None} for k, v, o in shown.values()]
    variants = {
        key: [
            {"key": k, "value": v, "from": str(profile.origin("variants", key, *k.split(".")) or "")}
            for k, v in _flat(body)
        ]
        for key, body in profile.model.model_dump(exclude_unset=True).get("variants", {}).items()
    }
    data: dict[str, Any] = {
        "name": profile.name,
        "description": profile.description,
        "path": None if profile.path == AUTO_PATH else str(profile.path),
        "extends": [AUTO if p == AUTO_PATH else str(p) for p in profile.chain[1:]],
        "abstract": profile.model.abstract,
        "variant": variant,
        "overrides_applied": list(shown.applied_overrides),
        "compute_dtype": plan.dtype,
        "quantization": plan.quantization,
        "device": plan.device.value if plan.device else None,
        "values": values,
        "variants": variants if not variant else {},
        "warnings": list(plan.warnings),
    }
    if as_json:
        emit_json(data)
        return
    echo(f"{profile.name}: {profile.description}")
    detected = "built from this machine's detected hardware ('gemma-profile detect' shows the facts)"
    echo(f"  file: {profile.path}" if data["path"] else f"  file: none; {detected}")
    for parent in data["extends"]:
        echo(f"  extends: {parent}" + (f" ({detected})" if parent == AUTO else ""))
    if variant:
        echo(f"  variant: {variant} (overrides applied: {', '.join(shown.applied_overrides) or 'none'})")
    echo(
        f"  compute dtype: {plan.dtype or 'gemma default'}   weights: {plan.quantization}"
        f"   device: {data['device'] or 'script'}"
    )
    width = max(
        [len(v["key"]) for v in values] + [len(i["key"]) + 2 for items in data["variants"].values() for i in items],
        default=10,
    )
    shown_values = [_text(v["value"]) for v in values] + [
        _text(item["value"]) for items in data["variants"].values() for item in items
    ]
    # The "from" column starts where the longest value ends (up to _VALUE_COLUMN); a longer
    # value puts its "from" on the next line, in that column.
    column = max((n for n in map(len, map(printable, shown_values)) if n <= _VALUE_COLUMN), default=8)
    for item in values:
        _show_row("  ", item["key"], width, _text(item["value"]), column, item["from"] or "")
    for key, items in data["variants"].items():
        echo(f"  variants.{key}:")
        for item in items:
            _show_row("    ", item["key"], width - 2, _text(item["value"]), column, item["from"])
    for warning in plan.warnings:
        echo(f"  warning: {warning}")


_VALUE_COLUMN = 40


def _show_row(indent: str, key: str, width: int, value: str, column: int, origin: str) -> None:
    value = printable(value)
    if len(value) <= column:
        echo(f"{indent}{key:<{width}}  {value:<{column}}  {origin}".rstrip())
    else:
        echo(f"{indent}{key:<{width}}  {value}")
        echo(f"{indent}{'':<{width}}  {'':<{column}}  {origin}".rstrip())


def _flat(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict) and value and key not in ("max_memory", "device_map", "rope_wave_length"):
            out.extend(_flat(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


@cli.command(
    epilog=_examples(
        "gemma-profile validate my-profile.yaml",
        "gemma-profile validate ~/.config/gemma-profiles/profiles   # every profile in a folder",
    )
)
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def validate(paths: tuple[str, ...], as_json: bool) -> None:
    """Check profile files (or folders of them); exit 1 on any problem."""
    from gemma_profiles.spec.profile import Problem

    registry = default_registry()
    files: list[Path] = []
    unusable: dict[Path, str] = {}
    for raw in paths:
        path = Path(raw)
        try:
            if path.is_dir():
                files.extend(sorted(p for p in path.iterdir() if p.suffix in PROFILE_SUFFIXES))
                continue
            exists = path.exists()
        except OSError as exc:  # a name longer than the file system allows, a folder we may not list
            unusable[path] = f"cannot look this up: {exc.strerror}"
            exists = True
        files.append(path)
        if path not in unusable and not exists:
            unusable[path] = "file not found"
        elif path not in unusable and path.suffix not in PROFILE_SUFFIXES:
            # Never parsed: what a YAML parser makes of another file would be quoted in the problems.
            unusable[path] = "not a profile file (profile files are named *.yaml or *.yml); not read"
    results: list[dict[str, Any]] = []
    for file in files:
        if file in unusable:
            problems = [Problem(str(file), unusable[file])]
        elif reserved := reserved_name(file):
            problems = [Problem(str(file), reserved)]
        else:
            from gemma_profiles.planning.plan import (
                profile_problems,  # what show and plan refuse too, for every variant
            )

            problems = profile_problems(file, registry.resolve_extends, cache=registry.resolved)
        results.append(
            {
                "path": str(file),
                "ok": not problems,
                "problems": [{"where": p.where, "message": p.message} for p in problems],
            }
        )
    if as_json:
        emit_json(results)
    else:
        for result in results:
            if result["ok"]:
                echo(f"{result['path']}: ok")
            for problem in result["problems"]:
                echo(f"{problem['where']}: {problem['message']}", err=True)
    if not all(r["ok"] for r in results):
        sys.exit(1)


def _reference_for(registry: Registry, name: str) -> tuple[str, Profile | None]:
    """Load ``name``; return what to store (a name, or an absolute path) and the profile.

    ``auto`` is stored as the name and not built here: it is detected where the model is
    built (detection imports torch, and the machine is the same).
    """
    from gemma_profiles.planning.auto import AUTO

    if name == AUTO:
        return AUTO, None
    profile = registry.load(name)
    if profile.model.abstract:
        raise GemmaProfileError(
            f"profile '{profile.name}' is abstract (a base for extends)",
            hint="pick a concrete profile from 'gemma-profile list'",
        )
    return (str(Path(name).expanduser().resolve()) if looks_like_path(name) else name), profile


def _missing_cuda_device(profile: Profile, registry: Registry) -> str | None:
    """One line when ``profile`` runs on a CUDA device this machine lacks, naming the best profile here.

    The driver's files are looked at first (no torch); only when they show no such GPU is the
    machine detected (torch), to be sure and to find the profile that fits it.
    """
    from gemma_profiles.planning import auto
    from gemma_profiles.planning.plan import normalize_device

    device = profile.model.placement.device
    facts = profile.model.hardware
    if device is None:
        wanted = "cuda:0" if facts is not None and facts.device == "cuda" else None
    else:
        wanted = normalize_device(device) if device.startswith("cuda") else None
    if wanted is None:
        return None
    index = int(wanted.partition(":")[2] or 0)
    if len(auto.nvidia_gpus_visible()) > index:
        return None
    hardware = registry.hardware()
    if hardware.gpu(wanted) is not None:
        return None
    here = "no CUDA device" if not hardware.gpus else f"no {wanted} (it has {len(hardware.gpus)} CUDA device(s))"
    match = auto.best_match(hardware, registry)
    best = f"{match.name}, or auto" if match else "auto (no profile here matches it)"
    return (
        f"'{profile.name}' runs on {wanted} and this machine has {here}, so gemma models cannot run under it "
        f"here; 'gemma-profile detect' shows this machine and names the best profile for it: {best}"
    )


@cli.command(
    epilog=_examples(
        "gemma-profile apply cpu-8gb",
        "gemma-profile apply auto                # whatever this machine is, detected when a model is built",
        "gemma-profile apply ./my-profile.yaml",
        "(a CUDA profile on a machine without that device is applied with a warning)",
    )
)
@click.argument("name")
def apply(name: str) -> None:
    """Use profile NAME for every gemma model built in this Python environment."""
    from gemma_profiles.runtime.gemma_info import gemma_status
    from gemma_profiles.runtime.state import write_applied

    registry = default_registry()
    reference, profile = _reference_for(registry, name)
    missing = _missing_cuda_device(profile, registry) if profile is not None else None
    path = write_applied(reference)
    shown = profile.name if profile is not None else reference
    echo(f"applied '{shown}' to the environment {sys.prefix}")
    echo(f"  state: {path}")
    echo("  gemma models built by Python in this environment now use it; 'gemma-profile reset' undoes it")
    if missing:
        warn(missing)
    if settings.PROFILE.raw():
        echo(f"  note: {settings.PROFILE.name}={settings.PROFILE.raw()} is set here and takes precedence", err=True)
    status = gemma_status()
    if status.kind not in ("gemma_pytorch", "standin"):
        echo(f"  note: gemma is {status.describe()}", err=True)


@cli.command(
    epilog=_examples(
        "gemma-profile current",
        "GEMMA_PROFILE=t4 gemma-profile current --json",
        "GEMMA_PROFILE=auto gemma-profile current   # 'auto': built from this machine's hardware",
    )
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def current(as_json: bool) -> None:
    """Show the active profile and why (GEMMA_PROFILE, apply, or none)."""
    from gemma_profiles.errors import StateError
    from gemma_profiles.planning.auto import AUTO
    from gemma_profiles.runtime.gemma_info import gemma_status
    from gemma_profiles.runtime.state import ActiveReference, active_reference

    problem = None
    try:
        active = active_reference()
    except StateError as exc:  # a state file that is no state: models would fail to build, so say so
        active = ActiveReference(None, "applied", "the applied-profile state cannot be read")
        problem = str(exc)
    data: dict[str, Any] = {
        "profile": None,
        "reference": active.reference,
        "source": active.source,
        "detail": active.detail,
    }
    if active.reference == AUTO:  # built from this machine when a model is (detection imports torch)
        data["profile"] = AUTO
    elif active.reference is not None:
        try:
            loaded = default_registry().load(active.reference)
            data["profile"] = loaded.name
            if loaded.model.abstract:  # a model built under it is refused: say so here too
                problem = (
                    f"{active.detail}: profile '{loaded.name}' is abstract (a base for extends), not for a machine"
                    " (pick a concrete profile from 'gemma-profile list')"
                )
        except GemmaProfileError as exc:
            problem = f"{active.detail}: {exc}"  # says which setting chose the profile
    data["error"] = problem
    data["gemma"] = {"kind": (status := gemma_status()).kind, "location": status.location}
    if as_json:
        emit_json(data)
    else:
        echo(f"{data['profile'] or active.reference or 'none'} ({active.detail})")
        echo(f"gemma: {status.describe()}")
    if problem:
        _fail(problem)


@cli.command(epilog=_examples("gemma-profile reset"))
def reset() -> None:
    """Forget the profile applied to this environment."""
    from gemma_profiles.runtime.state import clear_applied

    echo("applied profile removed" if clear_applied() else "no profile was applied")


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    epilog=_examples(
        "gemma-profile run t4 -- python my_script.py",
        "gemma-profile run auto -- python my_script.py   # a profile built from this machine's hardware",
        "gemma-profile run ./my-profile.yaml -- python -m my_package",
        "(exit status: the command's; 127 when it is not found, 126 when it cannot be run)",
    ),
)
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND with profile NAME active: gemma-profile run t4 -- python my_script.py"""
    from gemma_profiles.runtime.gemma_info import require_gemma_pytorch

    reference, _ = _reference_for(default_registry(), name)
    require_gemma_pytorch()  # a profile for the JAX 'gemma', or for no gemma, would do nothing
    if command and command[0] == "--":  # click keeps the separator once NAME is read
        command = command[1:]
    if not command:
        raise GemmaProfileError("no command given", hint="gemma-profile run NAME -- python my_script.py")
    env = dict(os.environ, GEMMA_PROFILE=reference)
    try:
        completed = subprocess.run(list(command), env=env, check=False)
    except FileNotFoundError:  # exit statuses as a shell's: 127 not found, 126 found but not runnable
        _fail(f"command not found: {command[0]}", 127)
    except OSError as exc:  # not executable, not a program (no #! line), a directory
        _fail(f"cannot run {command[0]}: {exc.strerror}", 126)
    sys.exit(completed.returncode)


@cli.command(
    epilog=_examples(
        "gemma-profile plugins",
        "GEMMA_PROFILE_DISABLE_PLUGINS=my_plugin gemma-profile plugins   # without one",
    )
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json: bool) -> None:
    """List plugins: name, package and version, hooks; broken ones are listed as skipped."""
    from gemma_profiles.plugin.manager import BLOCK_ENV, get_plugin_manager

    manager = get_plugin_manager()
    infos = manager.plugins()
    if as_json:
        rows = [{**info.__dict__, "hooks": list(info.hooks), "skipped": None} for info in infos]
        rows += [{"name": s.name, "package": s.package, "hooks": [], "skipped": s.reason} for s in manager.skipped]
        emit_json(rows)
        return
    table = [("plugin", "package", "hooks")]
    table += [
        (info.name, "builtin" if info.builtin else f"{info.package} {info.version}", ", ".join(info.hooks))
        for info in infos
    ]
    table += [(s.name, s.package, "skipped: broken (see the warning above)") for s in manager.skipped]
    widths = [max(len(printable(row[i])) for row in table) for i in range(2)]
    for name, package, hooks in table:
        echo(f"{printable(name):<{widths[0]}}  {printable(package):<{widths[1]}}  {hooks}")
    if manager.blocked:
        echo(f"blocked by {BLOCK_ENV}: {', '.join(sorted(manager.blocked))}")


def _target_source(source: str) -> str:
    """Where a plan's target machine came from, as a phrase: the profile's ``hardware:`` section or detection."""
    from gemma_profiles.planning.plan import describe_source

    return describe_source(source)


def _detected_target(registry: Registry, profile: Profile, here: bool = False) -> Any:
    """This machine as the plan's target (`plan.Target`) when asked (``--here``), for ``auto`` and what
    extends it (their facts are this machine's), and for a profile without hardware facts; else None."""
    from gemma_profiles.planning.auto import is_auto
    from gemma_profiles.planning.plan import Target, normalize_device

    if not (here or is_auto(profile) or profile.model.hardware is None):
        return None
    device = profile.model.placement.device
    return Target.of_hardware(registry.hardware(), normalize_device(device) if device else None)


@cli.command(epilog=_examples("gemma-profile detect", "gemma-profile detect --json"))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def detect(as_json: bool) -> None:
    """Describe this machine, whether this torch has kernels for its GPUs, and the profile that fits it best."""
    import dataclasses

    from gemma_profiles.planning import auto
    from gemma_profiles.planning.hardware import LEGACY_TORCH_FIX
    from gemma_profiles.units import format_bytes

    registry = default_registry()
    hardware = registry.hardware()

    def broken(name: str, exc: GemmaProfileError) -> None:
        warn(f"profile '{name}' is broken and left out of the match: {exc}")

    match = auto.best_match(hardware, registry, on_broken=broken)
    kernels = {gpu.index: hardware.kernel_support(gpu) for gpu in hardware.gpus}
    unusable = [index for index, support in kernels.items() if support is not None and not support.ok]
    # Until torch is fixed, CUDA cannot run here: the best profile without the GPUs too.
    fallback = auto.best_match(dataclasses.replace(hardware, gpus=()), registry) if unusable else None
    unseen: list[str] = []
    if not hardware.gpus:
        unseen = auto.nvidia_gpus_visible()  # the driver shows a GPU that this torch does not
    torch_fix = ""
    if unseen:
        torch_fix = (
            f"this torch ({hardware.torch_version}) is a CPU build; install a CUDA build: {LEGACY_TORCH_FIX} for "
            "a Maxwell, Pascal or Volta GPU (cu126, the last line with their kernels), else pip install torch"
            if not hardware.cuda_version
            else f"this torch (CUDA {hardware.cuda_version}) sees no CUDA device; check the driver with nvidia-smi"
        )
    data = {
        "hardware": hardware.as_dict(),
        "torch_kernels": [
            {"device": f"cuda:{index}", **(dataclasses.asdict(support) if support is not None else {"ok": None})}
            for index, support in kernels.items()
        ],
        "gpus_torch_does_not_see": [{"name": name, "fix": torch_fix} for name in unseen],
        "best_profile": None if match is None else {"name": match.name, "reason": match.reason},
        "best_profile_until_torch_is_fixed": None
        if fallback is None
        else {"name": fallback.name, "reason": fallback.reason},
    }
    if as_json:
        emit_json(data)
        return
    cpu = hardware.cpu
    echo(f"torch {hardware.torch_version} (CUDA {hardware.cuda_version or 'none'})")
    echo(
        f"cpu: {cpu.name or '?'}; {cpu.cores} cores; ISA {cpu.isa_level} ({', '.join(cpu.isa) or 'none'}); "
        f"RAM {format_bytes(cpu.total_memory)} ({format_bytes(cpu.available_memory)} available)"
        + (f"; transparent huge pages: {cpu.huge_pages}" if cpu.huge_pages else "")
    )
    for gpu in hardware.gpus:
        bf16 = "native bf16" if gpu.native_bf16 else "no native bf16"
        free = f", {format_bytes(gpu.free_memory)} free" if gpu.free_memory is not None else ""
        echo(
            f"cuda:{gpu.index}: {gpu.name}; compute capability {gpu.compute_capability[0]}.{gpu.compute_capability[1]} "
            f"({bf16}); {format_bytes(gpu.total_memory)}{free}"
        )
        support = kernels[gpu.index]
        if support is None:
            echo("  torch kernels: unknown (the hardware plugin gave no arch list)")
        elif support.ok:
            echo(f"  torch kernels: {support.reason}")
        else:
            echo(f"  torch kernels: missing - {support.reason}")
            echo(f"  fix: {support.fix}")
    for name in unseen:
        echo(f"nvidia: {name} (seen by the driver, not by torch): {torch_fix}")
    if hardware.mps:
        echo("mps: available (gemma's complex RoPE does not run on MPS; profiles use the CPU)")
    if match:
        echo(f"best profile: {match.name} - {match.reason}")
    else:
        echo("best profile: none matches; GEMMA_PROFILE=auto builds one from these facts")
    if unusable:
        devices = ", ".join(f"cuda:{index}" for index in unusable)
        here = f"{fallback.name} ({fallback.reason})" if fallback else "GEMMA_PROFILE=auto on the CPU"
        echo(f"until torch is fixed, {devices} cannot run gemma: use {here}")


@cli.command(
    "plan",
    epilog=_examples(
        "gemma-profile plan pascal-5gb --variant 7b",
        "gemma-profile plan cpu-8gb -v 2b --here          # against this machine",
        "gemma-profile plan auto -v 1b --seq-len 4096 --json",
        "gemma-profile plan t4 --model google/gemma-3-1b-it   # a transformers checkpoint (folder or cache)",
    ),
)
@click.argument("name")
@_variant_option(required=False)
@click.option(
    "--model",
    "model_ref",
    metavar="DIR_OR_HUB_ID",
    help="A transformers checkpoint instead of --variant: its folder, config.json, or a Hub id already "
    "in the Hugging Face cache (never downloaded).",
)
@click.option("--batch", type=click.IntRange(min=1), help="Prompts per generate call (default: the profile's).")
@click.option("--seq-len", type=click.IntRange(min=1), help="Prompt + output tokens (default: the profile's, 1024).")
@click.option("--here", is_flag=True, help="Size against this machine instead of the profile's hardware facts.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan_command(
    name: str,
    variant: str | None,
    model_ref: str | None,
    batch: int | None,
    seq_len: int | None,
    here: bool,
    as_json: bool,
) -> None:
    """Memory table and placement for a variant (or a transformers checkpoint) under a profile; exit 1 when it
    does not fit."""
    from gemma_profiles.planning.plan import make_plan
    from gemma_profiles.units import format_bytes

    if (variant is None) == (model_ref is None):
        raise GemmaProfileError(
            "plan needs one model: --variant or --model", hint=f"gemma-profile plan {name} --variant 2b"
        )
    _check_variant(variant)
    registry = default_registry()
    profile = registry.load(name)
    target = _detected_target(registry, profile, here)
    if model_ref is not None:
        from gemma_profiles.planning import hf

        config = hf.read_config(model_ref)
        shape = hf.shape_of(config)
        variant = hf.variant_of(shape)
        label = hf.describe(config)
        plan = make_plan(profile, variant, shape.family, target=target, shape=shape, batch=batch, seq_len=seq_len)
    else:
        label = str(variant)
        plan = make_plan(profile, variant, target=target, batch=batch, seq_len=seq_len)
    if plan.verdict is None:
        raise GemmaProfileError(f"profile '{profile.name}' says nothing about the hardware", hint="use --here")
    if as_json:
        emit_json(plan.as_dict())
    else:
        assert plan.memory is not None and plan.target is not None
        dtype, quant = plan.config.get("dtype"), plan.config.get("quant")
        machine = " ".join(part for part in (plan.target.device, plan.target.name) if part)
        echo(
            f"{plan.profile} / {label}: batch {plan.batch}, {plan.seq_len} tokens; target {machine}"
            f" ({_target_source(plan.target.source)})"
        )
        echo(f"  compute dtype: {plan.dtype}  ({dtype.origin if dtype else ''})")
        echo(f"  weights: {plan.quantization}  ({quant.origin if quant else 'profile default'})")
        echo(f"  layers: {', '.join(f'{k} -> {v}' for k, v in plan.layers.items())}")
        rows = [(i.component, i.device, format_bytes(i.bytes), i.note) for i in plan.memory.items]
        budgets = {b.device: b for b in plan.budgets}
        for device, need in plan.memory.required.items():
            budget = budgets.get(device)
            limit = f"budget {format_bytes(budget.available)} ({budget.note})" if budget else "no budget known"
            rows.append(("= must fit", device, format_bytes(need), limit))
            rows.append(("= peak resident", device, format_bytes(plan.memory.peak[device]), "incl. checkpoint pages"))
        widths = [max(len(r[i]) for r in [*rows, ("component", "device", "size", "")]) for i in range(3)]
        echo(f"  {'component':<{widths[0]}}  {'device':<{widths[1]}}  {'size':>{widths[2]}}  note")
        for component, device, size, note in rows:
            echo(f"  {component:<{widths[0]}}  {device:<{widths[1]}}  {size:>{widths[2]}}  {note}")
        echo(f"verdict: {plan.verdict.message}")
        if plan.verdict.suggestion:
            echo(f"cheapest change that fits: {plan.verdict.suggestion}")
        for warning in plan.warnings:
            echo(f"warning: {warning}")
    if not plan.verdict.fits:
        sys.exit(1)


@cli.command(
    epilog=_examples(
        "gemma-profile bench cpu-8gb --variant 2b --ckpt gemma-2b.ckpt --tokenizer tokenizer.model",
        "gemma-profile bench auto ~/models/gemma-3-270m --tokens 64   # a 'gemma-profile import' folder",
        "gemma-profile bench cpu-32gb --model ./gemma-3-270m --json",
    )
)
@click.argument("name")
@click.argument("model_dir", metavar="[DIR]", required=False, type=click.Path())
@click.option("--model", "model_option", type=click.Path(), help="A 'gemma-profile import' folder (same as DIR).")
@_variant_option(required=False)
@click.option("--ckpt", type=click.Path(), help="Checkpoint file or sharded folder (with --variant).")
@click.option("--tokenizer", type=click.Path(), help="tokenizer.model (default: the model config's path).")
@click.option("--tokens", type=click.IntRange(min=1), default=32, show_default=True, help="Tokens to generate.")
@click.option("--prompt", default="The capital of France is", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def bench(
    name: str,
    model_dir: str | None,
    model_option: str | None,
    variant: str | None,
    ckpt: str | None,
    tokenizer: str | None,
    tokens: int,
    prompt: str,
    as_json: bool,
) -> None:
    """Load a model under profile NAME and time generation: tokens/s and peak memory.

    The model is gemma's --variant with its --ckpt, or a folder DIR written by 'gemma-profile import'.
    """
    from gemma_profiles.runtime.gemma_info import require_gemma_pytorch
    from gemma_profiles.tools.bench import run_bench

    _check_variant(variant)
    if model_dir and model_option and model_dir != model_option:
        raise GemmaProfileError("two model folders given (DIR and --model)", hint="give one")
    folder = model_dir or model_option
    if folder is not None and (variant or ckpt):
        raise GemmaProfileError(
            "--variant and --ckpt are for gemma's own checkpoints; an imported folder has its own "
            "(config.json, model.ckpt)",
            hint=f"gemma-profile bench {name} {folder}",
        )
    if folder is None and not (variant and ckpt):
        missing = " and ".join(o for o, v in (("--variant", variant), ("--ckpt", ckpt)) if not v)
        raise GemmaProfileError(
            f"{missing} missing: bench needs gemma's variant and checkpoint, or an imported folder",
            hint=f"gemma-profile bench {name} --variant 2b --ckpt PATH, or gemma-profile bench {name} DIR",
        )
    require_gemma_pytorch()
    profile = load_any(name)
    label = f"{profile.name} / {variant or folder}"
    bar: Any = None

    def progress(steps: int) -> None:
        # Shown from the first decode step: loading's log lines come before, each on its own line.
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=max(tokens - 1, 1), label=f"{label}: decoding", file=sys.stderr)
            bar.__enter__()
        bar.update(steps)

    try:
        result = run_bench(
            profile,
            variant,
            ckpt,
            tokenizer=tokenizer,
            tokens=tokens,
            prompt=prompt,
            progress=progress,
            model_dir=folder,
        )
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if as_json:
        emit_json(result)
        return
    echo(f"{label} on {result['device']}: {result['dtypes']}")
    echo(f"  load (construct + load_weights): {result['load_s']:.2f} s")
    echo(f"  prefill ({result['prompt_tokens']} tokens): {result['prefill_s']:.3f} s")
    echo(
        f"  decode: {result['tokens_per_s']:.2f} tokens/s (median {result['s_per_token'] * 1e3:.1f} ms/token "
        f"over {result['decode_steps']} steps)"
    )
    echo(f"  peak memory: {result['peak_memory_human']} ({result['peak_memory_kind']})")


from gemma_profiles.cli.contrib import new, schema_command  # noqa: E402  (the contributor's commands)
from gemma_profiles.cli.model import generate, import_command  # noqa: E402  (the GGUF commands, in their own module)

cli.add_command(import_command)
cli.add_command(generate)
cli.add_command(new)
cli.add_command(schema_command)


def main() -> None:
    cli(prog_name="gemma-profile")


if __name__ == "__main__":
    main()
