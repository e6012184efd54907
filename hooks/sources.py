"""Where profiles come from: bundled, the user directory, ``GEMMA_PROFILE_PATH``."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from gemma_profiles.plugin.hookspecs import hookimpl
from gemma_profiles.plugin.types import ProfileSource
from gemma_profiles.settings import PATH, expand, user_dir

PATH_ENV = PATH.name


def bundled_dir() -> Path:
    return Path(str(resources.files("gemma_profiles.profiles")))


@hookimpl
def gemma_profile_sources() -> list[ProfileSource]:
    sources = [ProfileSource(bundled_dir(), "bundled", 0)]
    user = user_dir()
    if user is not None:
        sources.append(ProfileSource(user, "user", 20))
    entries = [e for e in os.environ.get(PATH_ENV, "").split(os.pathsep) if e]
    # Leftmost entry wins, as with PATH.
    for rank, entry in enumerate(reversed(entries)):
        path = expand(entry, PATH_ENV)
        if path is not None:
            sources.append(ProfileSource(path, PATH_ENV, 30 + rank))
    return sources
