"""The pack's plugin: one hook, naming the folder its profiles are in."""

from __future__ import annotations

from pathlib import Path

import gemma_profiles
from gemma_profiles.plugin.types import ProfileSource


@gemma_profiles.hookimpl
def gemma_profile_sources() -> list[ProfileSource]:
    # precedence 10: above the bundled profiles (0), below the user's own folder (20)
    return [ProfileSource(Path(__file__).parent / "profiles", label="example-pack", precedence=10)]
