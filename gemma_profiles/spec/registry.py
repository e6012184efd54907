"""Find profiles by name across all sources; a path works wherever a name does.

Sources, lowest precedence first (a later one wins a name clash, and the
override is logged):

1. the profiles bundled with gemma-profiles (``profiles/``)        precedence 0
2. plugins (``gemma_profile_sources`` hook)                          precedence 10 by default
3. the user directory (``platformdirs`` user config dir / profiles)  precedence 20
4. ``GEMMA_PROFILE_PATH`` directories, leftmost wins                 precedence 30+

One name is no file's: ``auto`` is the profile built from detected hardware
(`gemma_profiles.planning.auto`), wherever a name is taken, ``extends:`` included.  A file
called ``auto.yaml`` in any source is left out with one warning, and refused when
named by path, rather than silently shadowing it or being shadowed.
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gemma_profiles.errors import ProfileError, ProfileNotFoundError, did_you_mean, printable
from gemma_profiles.log import logger
from gemma_profiles.planning.auto import AUTO, AUTO_PATH
from gemma_profiles.plugin.types import ProfileSource
from gemma_profiles.spec.profile import Profile, ResolveCache, load_profile

if TYPE_CHECKING:
    from gemma_profiles.planning.hardware import Hardware

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
        self.resolved: ResolveCache = {}  # each file merged with its extends once per registry
        self._auto: Profile | None = None
        self._hardware: Hardware | None = None
        #: files left out of the index, with why: ``auto.yaml`` (the name is the detected profile's)
        self.refused: list[tuple[Path, ProfileSource, str]] = []

    def index(self) -> dict[str, Entry]:
        if self._index is None:
            index: dict[str, Entry] = {}
            for source in self.sources:
                for path in _profile_files(source):
                    name = path.stem
                    if name == AUTO:
                        self._refuse(path, source)
                        continue
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

    def _refuse(self, path: Path, source: ProfileSource) -> None:
        reason = _reserved(path)
        self.refused.append((path, source, reason))
        if (path, "auto") not in _unreadable:
            _unreadable.add((path, "auto"))
            logger.warning("{} ({}) is not used: {}", _short(printable(path)), printable(source.label), reason)

    def names(self) -> list[str]:
        """The names of the profile files (``auto``, which has none, is not among them)."""
        return list(self.index())

    def find(self, reference: str) -> Path:
        """A profile file for a name or a path (`AUTO_PATH`, which is no file, for ``auto``).

        :raises ProfileNotFoundError: with a did-you-mean and the available names.
        """
        if looks_like_path(reference):
            return _profile_file(reference)
        if reference == AUTO:
            return AUTO_PATH  # no file: `load` and `resolve_extends` build it from detected hardware
        entry = self.index().get(reference)
        if entry is None:
            names = [*self.names(), AUTO]
            raise ProfileNotFoundError(
                f"no profile named '{reference}'{did_you_mean(reference, names)}",
                hint=f"available: {', '.join(self.concrete_names()) or 'none'}, and auto (built from this "
                "machine's detected hardware); see 'gemma-profile list'",
            )
        return entry.path

    def concrete_names(self) -> list[str]:
        """Names of the profiles meant for a machine: ``abstract: true`` bases (``base-*``) left out.

        Reads each file's own top level only (abstractness is not inherited); a file that
        cannot be read stays in the list, for loading it to say what is wrong.
        """
        from gemma_profiles.spec.yamlio import read_yaml_file

        names = []
        for name, entry in self.index().items():
            try:
                data = read_yaml_file(entry.path).data
            except ProfileError:
                data = None
            if not (isinstance(data, dict) and data.get("abstract") is True):
                names.append(name)
        return names

    def load(self, reference: str) -> Profile:
        """Load a profile by name or path, resolving ``extends`` through this registry.

        ``auto`` is built from detected hardware (the builtin detector imports torch).
        """
        if reference == AUTO:
            return self.auto()
        return load_profile(self.find(reference), self.resolve_extends, cache=self.resolved)

    def auto(self) -> Profile:
        """The ``auto`` profile for this machine (detected once per registry)."""
        if self._auto is None:
            from gemma_profiles.planning.auto import auto_profile

            self._auto = auto_profile(self.hardware())
        return self._auto

    def hardware(self) -> Hardware:
        """This machine's facts, detected once per registry (for ``auto`` and ``extends: auto``)."""
        if self._hardware is None:
            from gemma_profiles.plugin.manager import detect_hardware

            self._hardware = detect_hardware()
        return self._hardware

    def resolve_extends(self, reference: str, from_file: Path) -> Path:
        """The file an ``extends:`` entry names; pass ``cache=self.resolved`` to `load_profile` with it.

        ``extends: auto`` resolves to `AUTO_PATH`, whose detected values are put in
        ``self.resolved``: a load with another cache would look for a file by that name.
        """
        if reference == AUTO:
            self._prime_auto()
            return AUTO_PATH
        if looks_like_path(reference):
            candidate = _existing_file(reference, from_file.parent)
            if candidate is not None:
                _require_profile_suffix(candidate, reference)
                _require_not_reserved(candidate, reference)
                return candidate
            raise ProfileNotFoundError(f"profile file '{reference}' named in extends does not exist")
        return self.find(reference)

    def _prime_auto(self) -> None:
        """Put ``auto``'s detected values in this registry's resolve cache, where ``extends: auto``
        finds them: `load_profile` consults the cache (by the resolved path) before reading a file."""
        from gemma_profiles.planning.auto import auto_parts

        keys = {AUTO_PATH}
        with contextlib.suppress(OSError, RuntimeError):  # a working directory that was removed
            keys.add(AUTO_PATH.resolve())  # how load_profile keys it (against the working directory)
        if all(key in self.resolved for key in keys):
            return
        data, origins = auto_parts(self.hardware())
        for key in keys:
            self.resolved[key] = (data, origins, (AUTO_PATH,), 1)


def _profile_file(reference: str) -> Path:
    """The file a path reference names, refused with one line when there is none or it is no profile.

    A file whose name does not end in ``.yaml``/``.yml`` is never read: an error quoting
    what a parser made of ``/etc/shadow`` would print a line of it.
    """
    shown = printable(reference)
    try:
        if "\x00" in reference:
            raise ValueError("embedded null byte")
        path = Path(reference).expanduser()
        exists = path.exists()
    except RuntimeError:  # pathlib: an unknown ~user, or no home directory
        user = reference[1:].split("/", 1)[0]
        why = f"there is no user '{printable(user)}' here" if user else "there is no home directory for '~'"
        raise ProfileNotFoundError(
            f"profile file '{shown}' cannot be found: {why}", hint="write the path out"
        ) from None
    except ValueError:  # a NUL byte
        raise ProfileNotFoundError(f"profile file '{shown}' is not a usable file name", hint="check the path") from None
    except OSError as exc:  # a name longer than the file system allows, a loop of links
        raise ProfileNotFoundError(
            f"profile file '{_short(shown)}' cannot be looked up: {exc.strerror}", hint=_os_hint(exc)
        ) from None
    if not exists:
        raise ProfileNotFoundError(f"profile file '{shown}' does not exist", hint="check the path")
    _require_profile_suffix(path, reference)
    _require_not_reserved(path, reference)
    return path


def reserved_name(path: Path) -> str | None:
    """Why ``path`` cannot be a profile file because of its name (``auto.yaml``), or None."""
    return _reserved(path) if path.stem == AUTO else None


def _reserved(path: Path) -> str:
    return (
        f"a profile file may not be named '{path.name}': 'auto' is the profile built from this machine's "
        f"detected hardware; rename the file (and its name: line), e.g. to 'my-{path.name}'"
    )


def _require_not_reserved(path: Path, reference: str) -> None:
    if path.stem == AUTO:
        raise ProfileNotFoundError(f"'{printable(reference)}': {_reserved(path)}")


def _require_profile_suffix(path: Path, reference: str) -> None:
    if path.suffix not in PROFILE_SUFFIXES:
        raise ProfileNotFoundError(
            f"'{printable(reference)}' is not a profile file: profile files are named *.yaml or *.yml, "
            "and nothing else is read",
            hint="name a profile from 'gemma-profile list', or a .yaml file",
        )


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 + 3 :]} ({len(text)} characters)"


def _os_hint(exc: OSError) -> str:
    if exc.errno == errno.ENAMETOOLONG:
        return "a name in a path may have at most 255 bytes; check the value"
    return "check the path"


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


def _profile_files(source: ProfileSource) -> list[Path]:
    """The profile files of one source; one warning (naming the source) and none when it cannot be read."""
    path = source.path
    try:
        if path.is_file():
            if path.suffix in PROFILE_SUFFIXES:
                return [path]
            _skip(source, "a file not named *.yaml or *.yml", "name a folder of profiles, or a profile file")
            return []
        if not path.is_dir():
            if path.exists():  # a pipe, a device: never opened
                _skip(source, "neither a folder nor a regular file", "name a folder of profiles, or a profile file")
            return []  # a folder that does not exist (yet) is no profiles, as with PATH
        return sorted(p for p in path.iterdir() if p.suffix in PROFILE_SUFFIXES and p.is_file())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        _skip(source, reason, _os_hint(exc) if isinstance(exc, OSError) else "check the path")
        return []


def _skip(source: ProfileSource, reason: str, hint: str) -> None:
    """One warning (once per process) that a source gives no profiles, naming it and where it came from."""
    if (source.path, source.label) in _unreadable:
        return
    _unreadable.add((source.path, source.label))
    logger.warning(
        "profiles in '{}' ({}) are skipped: {} ({})",
        _short(printable(source.path)),
        printable(source.label),
        reason,
        hint,
    )


_unreadable: set[tuple[Path, str]] = set()


def default_registry() -> Registry:
    """The registry over every source the loaded plugins (builtins included) name."""
    from gemma_profiles.plugin.manager import get_plugin_manager

    return Registry(get_plugin_manager().profile_sources())
