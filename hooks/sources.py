"""Where profiles come from: bundled, the user directory, ``GEMMA_PROFILE_PATH``."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import platformdirs

from gemma_profiles import hookimpl
from gemma_profiles.types import ProfileSource

PATH_ENV = "GEMMA_PROFILE_PATH"
USER_DIR_ENV = "GEMMA_PROFILE_USER_DIR"


def bundled_dir() -> Path:
    return Path(str(resources.files("gemma_profiles.profiles")))


def user_dir() -> Path:
    """``~/.config/gemma-profiles/profiles`` on Linux (platformdirs' user config dir)."""
    override = os.environ.get(USER_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_config_dir("gemma-profiles")) / "profiles"


@hookimpl
def gemma_profile_sources() -> list[ProfileSource]:
    sources = [ProfileSource(bundled_dir(), "bundled", 0), ProfileSource(user_dir(), "user", 20)]
    entries = [e for e in os.environ.get(PATH_ENV, "").split(os.pathsep) if e]
    # Leftmost entry wins, as with PATH.
    for rank, entry in enumerate(reversed(entries)):
        sources.append(ProfileSource(Path(entry).expanduser(), PATH_ENV, 30 + rank))
    return sources
