"""Where profiles come from: bundled, the user directory, ``GEMMA_PROFILE_PATH``."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import platformdirs

import gemma_profiles.settings as settings
from gemma_profiles.errors import printable
from gemma_profiles.plugin.hookspecs import hookimpl
from gemma_profiles.plugin.types import ProfileSource

PATH_ENV = settings.PATH.name
USER_DIR_ENV = settings.USER_DIR.name

_said: set[tuple[str, str]] = set()


def expand(value: str, variable: str) -> Path | None:
    """``value`` of ``variable`` as a path with ``~`` expanded; None (after one warning) when it cannot be.

    ``~nosuchuser/x`` names a user this machine lacks, and ``~/x`` without a home directory
    cannot be expanded either: the entry is skipped, and the warning names the variable.
    """
    try:
        return Path(value).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory."
        user = value[1:].split("/", 1)[0].split(os.sep, 1)[0]
        why = f"there is no user '{printable(user)}' here" if user else "there is no home directory to expand '~' to"
        _say_once(variable, value, f"{variable} entry '{printable(value)}' is skipped: {why} (write the path out)")
        return None


def _say_once(variable: str, value: str, message: str) -> None:
    if (variable, value) in _said:
        return
    _said.add((variable, value))
    from gemma_profiles.log import logger

    logger.warning("{}", message)


def bundled_dir() -> Path:
    return Path(str(resources.files("gemma_profiles.profiles")))


def user_dir() -> Path | None:
    """``~/.config/gemma-profiles/profiles`` on Linux (platformdirs' user config dir), or
    ``GEMMA_PROFILE_USER_DIR``; None when that names a path that cannot be expanded."""
    override = os.environ.get(USER_DIR_ENV)
    if override:
        return expand(override, USER_DIR_ENV)
    return Path(platformdirs.user_config_dir("gemma-profiles")) / "profiles"


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
