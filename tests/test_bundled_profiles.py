"""Every bundled profile passes the contributor kit's checks (`gemma_profiles.testing`), the same ones a
profile pack runs on its own profiles; plus what only holds for the bundled set as a whole."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from gemma_profiles.hooks.sources import bundled_dir

from gemma_profiles import testing
from gemma_profiles.spec.registry import default_registry

# Collected from the folder itself, so a new profile file is tested without editing this list.
BUNDLED_FILES = testing.pack_files(bundled_dir())
BUNDLED_NAMES = [p.stem for p in BUNDLED_FILES]


def _declared_abstract(path: Path) -> bool:
    """``abstract: true`` in the file itself (abstractness is not inherited)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # test_bundled_profile_passes_the_kit_checks reports it
    return isinstance(data, dict) and data.get("abstract") is True


CONCRETE_NAMES = [p.stem for p in BUNDLED_FILES if not _declared_abstract(p)]


def test_bundled_folder_is_found():
    assert len(BUNDLED_FILES) >= 10
    assert {"pascal-5gb", "t4", "cpu-32gb", "base-cuda", "base-cpu"} <= set(BUNDLED_NAMES)


def test_registry_sees_every_bundled_file():
    index = default_registry().index()
    for path in BUNDLED_FILES:
        assert path.stem in index
        assert index[path.stem].source.label == "bundled"
        assert index[path.stem].path.resolve() == path.resolve()


@pytest.mark.parametrize("path", BUNDLED_FILES, ids=BUNDLED_NAMES)
def test_bundled_profile_passes_the_kit_checks(path: Path):
    testing.assert_profile_ok(path, registry=default_registry())


def test_enough_concrete_profiles():
    registry = default_registry()
    concrete = [name for name in BUNDLED_NAMES if not registry.load(name).model.abstract]
    assert concrete == CONCRETE_NAMES
    assert len(concrete) >= 8, concrete
    assert {"pascal-5gb", "t4", "cpu-32gb"} <= set(concrete)
    assert "base-cuda" not in concrete
    assert "base-cpu" not in concrete


# The kit's rules that test_contributor_kit.py's own cases leave out, each broken in a copy of a bundled profile.
T4 = (bundled_dir() / "t4.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("edit", "finding"),
    [
        (lambda text: text.replace("name: t4\n", ""), "write 'name:' in the file itself"),
        (lambda text: text.replace('  compute_capability: "7.5"\n', ""), "compute_capability"),
        (
            lambda text: text.split("extends:")[0] + "config:" + text.split("config:", 1)[1],  # nor base-cuda's
            "'hardware:' section",
        ),
        (
            lambda text: (
                text.replace("  7b: {config: {dtype: float32}, ", "  7b: {")
                + "compute: {allow_float16_overflow: true}\n"
            ),  # validate lets it through; the kit does not
            "7b: float16 compute overflows gemma1",
        ),
        (
            lambda text: text.replace("  gemma3: {config: {dtype: float32}}\n", ""),
            "float16 compute overflows for Gemma 3",
        ),
    ],
    ids=["name-not-written", "cuda-without-capability", "no-hardware", "fp16-7b", "fp16-gemma3"],
)
def test_a_broken_copy_of_a_bundled_profile_is_caught(
    write_profile: Callable[..., Path], edit: Callable[[str], str], finding: str
):
    broken = edit(T4)
    assert broken != T4, "the edit no longer applies to t4.yaml"
    path = write_profile("t4", broken)
    findings = [str(found) for found in testing.check_profile(path)]
    assert any(finding in found for found in findings), findings
    with pytest.raises(AssertionError):
        testing.assert_profile_ok(path)
