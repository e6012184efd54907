"""Every bundled profile: valid, documented, and numerically safe for every gemma variant."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from gemma_profiles.hooks.sources import bundled_dir

from gemma_profiles.planning.plan import make_plan
from gemma_profiles.spec.profile import Profile, problems_in
from gemma_profiles.spec.registry import default_registry
from gemma_profiles.spec.variants import VARIANTS

# Collected from the folder itself, so a new profile file is tested without editing this list.
BUNDLED_FILES = sorted(p for p in bundled_dir().iterdir() if p.suffix in (".yaml", ".yml"))
BUNDLED_NAMES = [p.stem for p in BUNDLED_FILES]


def _declared_abstract(path: Path) -> bool:
    """``abstract: true`` in the file itself (abstractness is not inherited)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # test_bundled_profile_validates reports it
    return isinstance(data, dict) and data.get("abstract") is True


CONCRETE_NAMES = [p.stem for p in BUNDLED_FILES if not _declared_abstract(p)]
NATIVE_BF16 = (8, 0)
# docs/design.md: Gemma 2/3 activations overflow float16; Gemma 1 7b gave NaN (gemma_pytorch #10).
FLOAT16_UNSAFE_FAMILIES = {"gemma2", "gemma3"}
FLOAT16_UNSAFE_VARIANTS = {"7b"}


def load_bundled(name: str) -> Profile:
    registry = default_registry()
    entry = registry.index()[name]
    assert entry.source.label == "bundled", f"{name} comes from {entry.source.label}, expected the bundled one"
    return registry.load(name)


def test_bundled_folder_is_found():
    assert len(BUNDLED_FILES) >= 10
    assert {"pascal-5gb", "t4", "cpu-32gb", "base-cuda", "base-cpu"} <= set(BUNDLED_NAMES)


def test_registry_sees_every_bundled_file():
    index = default_registry().index()
    for path in BUNDLED_FILES:
        assert path.stem in index
        assert index[path.stem].path.resolve() == path.resolve()


@pytest.mark.parametrize("path", BUNDLED_FILES, ids=BUNDLED_NAMES)
def test_bundled_profile_validates(path: Path):
    assert [str(p) for p in problems_in(path, default_registry().resolve_extends)] == []


@pytest.mark.parametrize("path", BUNDLED_FILES, ids=BUNDLED_NAMES)
def test_name_equals_file_stem(path: Path):
    profile = load_bundled(path.stem)
    assert profile.name == path.stem
    origin = profile.origin("name")
    # written in the file itself, not defaulted from the file name
    assert origin is not None and origin.line is not None
    assert Path(origin.path).resolve() == path.resolve()


@pytest.mark.parametrize("path", BUNDLED_FILES, ids=BUNDLED_NAMES)
def test_profile_cites_its_facts_in_a_comment(path: Path):
    comments = [line for line in path.read_text(encoding="utf-8").splitlines() if line.lstrip().startswith("#")]
    assert comments, f"{path.name} has no comment saying where its facts come from"
    assert any(len(line.lstrip("# ").split()) >= 4 for line in comments), f"{path.name}: comments say too little"


@pytest.mark.parametrize("path", BUNDLED_FILES, ids=BUNDLED_NAMES)
def test_profile_has_a_description(path: Path):
    assert load_bundled(path.stem).description.strip()


def test_enough_concrete_profiles():
    concrete = [name for name in BUNDLED_NAMES if not load_bundled(name).model.abstract]
    assert concrete == CONCRETE_NAMES
    assert len(concrete) >= 8, concrete
    assert {"pascal-5gb", "t4", "cpu-32gb"} <= set(concrete)
    assert "base-cuda" not in concrete
    assert "base-cpu" not in concrete


@pytest.mark.parametrize("name", CONCRETE_NAMES)
def test_concrete_profile_sets_dtype_explicitly(name: str):
    profile = load_bundled(name)
    assert profile.model.config.dtype is not None, f"{name} leaves dtype to gemma's default (bfloat16)"
    origin = profile.origin("config", "dtype")
    assert origin is not None and origin.line is not None
    assert Path(origin.path).resolve() in {p.resolve() for p in profile.chain}


@pytest.mark.parametrize("name", CONCRETE_NAMES)
def test_concrete_profile_describes_its_hardware(name: str):
    profile = load_bundled(name)
    hardware = profile.model.hardware
    assert hardware is not None
    if hardware.device == "cuda":
        # without it the bfloat16 rule below cannot be checked
        assert hardware.capability_tuple() is not None, f"{name}: cuda profile without compute_capability"


@pytest.mark.parametrize("name", CONCRETE_NAMES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resolved_dtype_is_safe(name: str, variant: str):
    profile = load_bundled(name)
    plan = make_plan(profile, variant)
    dtype = plan.dtype
    hardware = profile.model.hardware
    capability = hardware.capability_tuple() if hardware is not None else None
    if hardware is not None and hardware.device == "cuda" and capability is not None and capability < NATIVE_BF16:
        assert dtype != "bfloat16", f"{name} {variant}: bfloat16 on compute capability {hardware.compute_capability}"
    if VARIANTS[variant].family in FLOAT16_UNSAFE_FAMILIES or variant in FLOAT16_UNSAFE_VARIANTS:
        assert dtype != "float16", f"{name} {variant}: float16 compute overflows ({plan.config['dtype'].origin})"
    assert not [w for w in plan.warnings if "float16" in w], plan.warnings
