"""Checks for profile files: the ones bundled here and the ones a profile pack ships.

One mechanism for both: ``tests/test_bundled_profiles.py`` runs these on our profiles, and a
pack's own tests run them on its profiles::

    import pytest
    from gemma_profiles import testing

    PROFILES = testing.pack_files("my_profile_pack")

    @pytest.mark.parametrize("path", PROFILES, ids=lambda path: path.stem)
    def test_profile(path):
        testing.assert_profile_ok(path, promises={"rtx2060-6gb": ["2b", "1b"]})

What is checked, for every file (`check_profile`):

- everything ``gemma-profile validate`` checks: the schema, ``extends``, and the planner's
  rules for every gemma variant (sizes, the device map, dtype per compute capability);
- ``name:`` is written in the file and equals the file name; a description of its own; at least one
  comment that says where the facts come from (the evidence rule);
- a concrete profile states its compute dtype and its hardware (a CUDA one its compute
  capability);
- for every gemma variant: no bfloat16 below compute capability 8.0, no float16 compute for
  Gemma 2, Gemma 3 or Gemma 7b (their activations overflow it), even where
  ``compute: {allow_float16_overflow: true}`` would let a user's own profile through;
- the variants the profile promises (``promises=``) fit its own hardware.

Planning only: nothing here imports torch or builds a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from types import ModuleType

from gemma_profiles.planning.plan import NATIVE_BF16, make_plan, profile_problems
from gemma_profiles.plugin.types import ProfileSource
from gemma_profiles.spec.profile import Problem, Profile, load_profile
from gemma_profiles.spec.registry import PROFILE_SUFFIXES, Registry, default_registry
from gemma_profiles.spec.variants import VARIANTS, float16_unsafe

__all__ = ["Finding", "assert_profile_ok", "check_profile", "pack_files", "registry_with"]


#: One thing a reviewer would send back: where, and what (the `Problem` that ``validate`` reports).
Finding = Problem


def pack_files(source: str | Path | ModuleType) -> list[Path]:
    """The profile files in a folder, or in an importable package (its ``profiles/`` folder if it has one).

    Sorted by name, so a parametrized test's ids are stable.
    """
    if isinstance(source, ModuleType | str) and not Path(str(source)).is_dir():
        root = Path(str(resources.files(source if isinstance(source, str) else source.__name__)))
        folder = root / "profiles" if (root / "profiles").is_dir() else root
    else:
        folder = Path(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of profiles")
    return sorted(path for path in folder.iterdir() if path.suffix in PROFILE_SUFFIXES and path.is_file())


def registry_with(*folders: str | Path) -> Registry:
    """The installed registry plus ``folders`` above everything, for checking a pack before it is installed."""
    sources = list(default_registry().sources)
    top = max((source.precedence for source in sources), default=0)
    sources += [ProfileSource(Path(folder), "checked", top + 1 + rank) for rank, folder in enumerate(folders)]
    return Registry(sources)


def check_profile(
    path: str | Path, *, registry: Registry | None = None, promises: Mapping[str, Iterable[str]] | None = None
) -> list[Finding]:
    """Everything wrong with one profile file, as a reviewer would say it; empty when it is fine.

    :param registry: resolves ``extends`` (default: `registry_with` the file's own folder).
    :param promises: profile name -> the gemma variants it must fit on its own hardware.
    """
    path = Path(path)
    registry = registry or registry_with(path.parent)
    problems = profile_problems(path, registry.resolve_extends, cache=registry.resolved)
    if problems:
        return problems
    profile = load_profile(path, registry.resolve_extends, cache=registry.resolved)
    findings = _file_findings(path, profile)
    if not profile.model.abstract:
        findings += _concrete_findings(path, profile)
        findings += _variant_findings(path, profile, list((promises or {}).get(profile.name, ())))
    return findings


def assert_profile_ok(
    path: str | Path, *, registry: Registry | None = None, promises: Mapping[str, Iterable[str]] | None = None
) -> None:
    """`check_profile`, failing the calling test with every finding, one a line."""
    findings = check_profile(path, registry=registry, promises=promises)
    if findings:
        raise AssertionError("\n".join(str(finding) for finding in findings))


def _file_findings(path: Path, profile: Profile) -> list[Finding]:
    findings = []
    origin = profile.origin("name")
    if origin is None or origin.line is None or Path(origin.path).resolve() != path.resolve():
        findings.append(Finding(str(path), "write 'name:' in the file itself (it is how reviewers and 'list' name it)"))
    elif profile.name != path.stem:
        findings.append(Finding(str(origin), f"name '{profile.name}' differs from the file name '{path.stem}'"))
    described = profile.origin("description")
    if not profile.description.strip() or described is None or Path(described.path).resolve() != path.resolve():
        findings.append(Finding(str(path), "no description of its own: say in one line which machine this is for"))
    comments = [line.lstrip("# ") for line in path.read_text(encoding="utf-8").splitlines() if line.lstrip()[:1] == "#"]
    evidence = [line for line in comments if len(line.split()) >= 4 and "yaml-language-server" not in line]
    if not evidence:
        findings.append(
            Finding(str(path), "no comment saying where the facts come from (a data sheet, nvidia-smi, a measurement)")
        )
    return findings


def _concrete_findings(path: Path, profile: Profile) -> list[Finding]:
    findings = []
    if profile.model.config.dtype is None:
        findings.append(
            Finding(str(path), "set config.dtype: without it gemma uses its default, which differs per variant")
        )
    hardware = profile.model.hardware
    if hardware is None:
        findings.append(Finding(str(path), "describe the machine in a 'hardware:' section (device, memory)"))
    elif hardware.device == "cuda" and hardware.capability_tuple() is None:
        findings.append(
            Finding(str(profile.origin("hardware") or path), "a CUDA profile needs hardware.compute_capability")
        )
    return findings


def _variant_findings(path: Path, profile: Profile, promised: list[str]) -> list[Finding]:
    findings = []
    unknown = [variant for variant in promised if variant not in VARIANTS]
    if unknown:
        findings.append(Finding(str(path), f"promises unknown variants {unknown} (known: {', '.join(VARIANTS)})"))
    hardware = profile.model.hardware
    capability = hardware.capability_tuple() if hardware is not None else None
    for variant, shape in VARIANTS.items():
        plan = make_plan(profile, variant)
        where = plan.config["dtype"].origin if "dtype" in plan.config else str(path)
        below_bf16 = capability is not None and capability < NATIVE_BF16
        if hardware is not None and hardware.device == "cuda" and below_bf16 and plan.dtype == "bfloat16":
            findings.append(
                Finding(where, f"{variant}: bfloat16 on compute capability {hardware.compute_capability} (< 8.0)")
            )
        if plan.dtype == "float16" and float16_unsafe(variant, shape.family):
            findings.append(Finding(where, f"{variant}: float16 compute overflows {shape.family} activations"))
        findings += [Finding(str(path), f"{variant}: {warning}") for warning in plan.warnings if "float16" in warning]
        if variant in promised and plan.verdict is not None and not plan.verdict.fits:
            suggestion = f" (cheapest change that fits: {plan.verdict.suggestion})" if plan.verdict.suggestion else ""
            findings.append(Finding(str(path), f"{variant} is promised but {plan.verdict.message}{suggestion}"))
    return findings
