"""Find profiles by name across all sources; a path works wherever a name does.

Sources, lowest precedence first (a later one wins a name clash, and the
override is logged):

1. the profiles bundled with gemma-profiles (``profiles/``)        precedence 0
2. plugins (``gemma_profile_sources`` hook)                          precedence 10 by default
3. the user directory (``platformdirs`` user config dir / profiles)  precedence 20
4. ``GEMMA_PROFILE_PATH`` directories, leftmost wins                 precedence 30+
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from .errors import ProfileNotFoundError, did_you_mean
from .profile import Profile, load_profile
from .types import ProfileSource

PROFILE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Entry:
    """One profile name and the file that defines it."""

    name: str
    path: Path
    source: ProfileSource
    shadows: tuple[Entry, ...] = field(default=())


def looks_like_path(reference: str) -> bool:
    return reference.endswith(PROFILE_SUFFIXES) or "/" in reference or "\\" in reference


class Registry:
    """Profile names -> files, built from `ProfileSource` items."""

    def __init__(self, sources: list[ProfileSource]):
        self.sources = sorted(sources, key=lambda s: s.precedence)
        self._index: dict[str, Entry] | None = None

    def index(self) -> dict[str, Entry]:
        if self._index is None:
            index: dict[str, Entry] = {}
            for source in self.sources:
                for path in _profile_files(source.path):
                    name = path.stem
                    previous = index.get(name)
                    if previous is not None and previous.path.resolve() != path.resolve():
                        logger.info(
                            "profile '{}' from {} ({}) overrides the one from {} ({})",
                            name,
                            path,
                            source.label,
                            previous.path,
                            previous.source.label,
                        )
                        index[name] = Entry(name, path, source, (*previous.shadows, previous))
                    elif previous is None:
                        index[name] = Entry(name, path, source)
            self._index = dict(sorted(index.items()))
        return self._index

    def names(self) -> list[str]:
        return list(self.index())

    def find(self, reference: str) -> Path:
        """A profile file for a name or a path.

        :raises ProfileNotFoundError: with a did-you-mean and the available names.
        """
        if looks_like_path(reference):
            path = _existing_file(reference, any_kind=True)
            if path is not None:
                return path
            raise ProfileNotFoundError(f"profile file '{reference}' does not exist", hint="check the path")
        entry = self.index().get(reference)
        if entry is None:
            names = self.names()
            raise ProfileNotFoundError(
                f"no profile named '{reference}'{did_you_mean(reference, names)}",
                hint=f"available: {', '.join(names) or 'none'}; see 'gemma-profile list'",
            )
        return entry.path

    def load(self, reference: str) -> Profile:
        """Load a profile by name or path, resolving ``extends`` through this registry."""
        return load_profile(self.find(reference), self.resolve_extends)

    def resolve_extends(self, reference: str, from_file: Path) -> Path:
        if looks_like_path(reference):
            candidate = _existing_file(reference, from_file.parent)
            if candidate is not None:
                return candidate
            raise ProfileNotFoundError(f"profile file '{reference}' named in extends does not exist")
        return self.find(reference)


def _existing_file(reference: str, base: Path | None = None, *, any_kind: bool = False) -> Path | None:
    """``reference`` as a file (``~`` expanded, relative to ``base``), or None when there is none.

    :param any_kind: accept a directory or a pipe too, for the loader to say what it is.
    """
    try:
        path = Path(reference).expanduser()
        if base is not None and not path.is_absolute():
            path = base / path
        return path if (path.exists() if any_kind else path.is_file()) else None
    except (OSError, ValueError, RuntimeError):  # a name too long, a NUL byte, an unknown ~user
        return None


def _profile_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix in PROFILE_SUFFIXES else []
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.suffix in PROFILE_SUFFIXES and p.is_file())


def default_registry() -> Registry:
    """The registry over every source the loaded plugins (builtins included) name."""
    from .plugins import get_plugin_manager

    return Registry(get_plugin_manager().profile_sources())
