"""The pack's own tests: every profile it ships, checked the way gemma-profiles checks its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma_profiles import testing

PROFILES = testing.pack_files(Path(__file__).parents[1] / "gemma_profiles_example_pack" / "profiles")
# The variants each profile says it runs (README of the pack); each must fit its own hardware.
PROMISES = {"rtx2060-6gb": ["2b", "1b", "2b-v2"]}


def test_the_pack_ships_profiles():
    assert [path.stem for path in PROFILES] == ["rtx2060-6gb"]


@pytest.mark.parametrize("path", PROFILES, ids=lambda path: path.stem)
def test_profile(path: Path):
    testing.assert_profile_ok(path, promises=PROMISES)
