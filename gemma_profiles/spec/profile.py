"""YAML -> validated `Profile`: extends, variant overrides, and where each value came from.

A profile file is read with `yamlio` (plain data plus line numbers), merged with
the profiles it ``extends`` (parents first, the child wins), validated against
`schema.ProfileModel`, and every validation problem is reported as
``file:line: message`` with a suggestion for a misspelt key.

Resolving ``extends`` takes bounded time: each file is read and merged once per
load (or once per `ResolveCache`, which a registry shares between its loads), a
chain may be `MAX_EXTENDS_DEPTH` profiles deep, and one profile may bring in at
most `MAX_EXTENDS_FILES` files in all.  A profile's ``name:`` must be its file's
name (without ``.yaml``): names are how ``list``, ``apply`` and ``extends`` find
profiles, so a profile cannot be listed under one name and report another.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from gemma_profiles.errors import GemmaProfileError, ProfileError, did_you_mean
from gemma_profiles.spec import schema
from gemma_profiles.spec.variants import FAMILIES, VARIANTS
from gemma_profiles.spec.yamlio import Path_, SourcedDoc, read_yaml_file

MAX_EXTENDS_DEPTH = 16
#: The most profile files one profile may bring in through ``extends`` (itself included).
MAX_EXTENDS_FILES = 64

#: Resolve an ``extends:`` reference (name or relative path) seen in ``from_file``.
ExtendsResolver = Callable[[str, Path], Path]


@dataclass(frozen=True)
class Origin:
    """Where one value was written: file, line, and through what (extends, variant)."""

    path: str
    line: int | None = None
    via: str = ""

    def __str__(self) -> str:
        place = f"{self.path}:{self.line}" if self.line else self.path
        return f"{place} ({self.via})" if self.via else place


#: A file merged with its parents: data, origins, the files it brings in, and the most
#: files on one extends path from it (1 when it extends nothing).
_Merged = tuple[dict[str, Any], dict[Path_, Origin], tuple[Path, ...], int]
#: Files already merged with their parents, by resolved path: pass one to several
#: `load_profile` calls with the same resolver to read and merge each file once.
ResolveCache = dict[Path, _Merged]


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a profile file."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ProfileValidationError(ProfileError):
    """One or more problems in a profile; ``problems`` lists them all.

    Also takes the ``(message, where=, hint=)`` of every `GemmaProfileError` (one problem),
    so code that re-raises an error with more context works for this class too.
    """

    def __init__(self, problems: list[Problem] | str, *, where: str | None = None, hint: str | None = None):
        if isinstance(problems, str):
            text = f"{problems} ({hint})" if hint else problems
            problems = [Problem(where or "<profile>", text)]
        self.problems = problems
        first = problems[0]
        more = f" (and {len(problems) - 1} more problem(s); run 'gemma-profile validate')" if len(problems) > 1 else ""
        super().__init__(first.message + more, where=first.where)


@dataclass(frozen=True)
class Profile:
    """A validated profile with the origin of each value.

    ``model`` holds the values; ``origins`` maps a key path such as
    ``("config", "dtype")`` to the `Origin` that set it.  ``resolve`` folds the
    matching ``variants:`` overrides in.
    """

    model: schema.ProfileModel
    path: Path
    origins: Mapping[Path_, Origin] = field(default_factory=dict)
    chain: tuple[Path, ...] = ()  # this file, then the files it extends
    applied_overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def description(self) -> str:
        return self.model.description

    def origin(self, *key_path: str) -> Origin | None:
        probe: Path_ = tuple(key_path)
        while probe:
            if probe in self.origins:
                return self.origins[probe]
            probe = probe[:-1]
        return None

    def resolve(self, variant: str | None = None, family: str | None = None) -> Profile:
        """The profile as it applies to one model: family overrides, then variant ones.

        :param variant: a gemma variant name (``"2b"``, ``"9b"``...), if known.
        :param family: ``"gemma1"``/``"gemma2"``/``"gemma3"``; derived from the variant when omitted.
        """
        if family is None and variant in VARIANTS:
            family = VARIANTS[variant].family
        data = self.model.model_dump(exclude_unset=True)
        variants = data.pop("variants", {})
        origins = dict(self.origins)
        applied = []
        for key in (family, variant):
            if key is None or key not in variants:
                continue
            for sub_path, value in _leaves(variants[key]):
                _set_in(data, sub_path, value)
                source = self.origins.get(("variants", key, *sub_path)) or self.origins.get(("variants", key))
                if source is not None:
                    origins[sub_path] = Origin(source.path, source.line, f"variants.{key}")
            applied.append(key)
        model = schema.ProfileModel.model_validate(data)
        return Profile(model, self.path, origins, self.chain, tuple(applied))

    def values(self) -> Iterator[tuple[str, Any, Origin | None]]:
        """Every value set by the profile files as (dotted key, value, origin)."""
        data = self.model.model_dump(exclude_unset=True, exclude={"variants"})
        for key_path, value in _leaves(data):
            yield ".".join(map(str, key_path)), value, self.origin(*map(str, key_path))


def load_profile(
    path: str | Path, resolve_extends: ExtendsResolver | None = None, *, cache: ResolveCache | None = None
) -> Profile:
    """Load and validate one profile file, following ``extends``.

    :param path: the YAML file.
    :param resolve_extends: maps an ``extends`` name to a file; by default only
        paths relative to the extending file are understood.
    :param cache: files merged by earlier loads with the same resolver (filled in here).
    :raises ProfileError: with ``file:line`` for anything wrong.
    """
    resolver = resolve_extends or _relative_only
    file = Path(path)
    merged, origins, chain, _ = _load_merged(file, resolver, (), {} if cache is None else cache)
    merged.setdefault("name", file.stem)
    origins.setdefault(("name",), Origin(str(file)))
    problems = _precheck(merged, origins)
    name = merged.get("name")
    if isinstance(name, str) and name != file.stem and ("name",) in origins:
        problems.append(
            Problem(
                _where(origins, ("name",), str(file)),
                f"name '{name}' differs from the file name '{file.name}': profiles are found by file name "
                f"('list', 'apply', 'extends' would call it '{file.stem}'); rename the file to '{name}{file.suffix}' "
                f"or drop the name: line",
            )
        )
    try:
        model = schema.ProfileModel.model_validate(merged)
    except ValidationError as exc:
        problems += [
            _problem(err, origins, str(file))
            for err in exc.errors()
            if tuple(err["loc"]) != ("variants",) or not problems
        ]
    else:
        if not problems:
            return Profile(model, file, origins, chain)
    problems.sort(key=_line_of)
    raise ProfileValidationError(problems)


def _line_of(problem: Problem) -> int:
    tail = problem.where.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _relative_only(reference: str, from_file: Path) -> Path:
    try:
        candidate = (from_file.parent / reference).resolve()
        if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
            return candidate
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, a symlink loop
        pass
    raise ProfileError(
        f"cannot find the profile '{reference}' named in extends",
        hint="use a profile name known to 'gemma-profile list' or a path relative to this file",
    )


def _load_merged(file: Path, resolver: ExtendsResolver, seen: tuple[Path, ...], cache: ResolveCache) -> _Merged:
    """``file`` merged with what it extends; each file is merged once per ``cache``.

    A cached file's ancestry was resolved completely without a cycle, so reusing it
    cannot hide one: a cycle through it would have failed its own resolution.
    """
    try:
        key = file.resolve()
    except (OSError, RuntimeError):  # a loop of links: reading it says what is wrong
        key = file
    if key not in cache:
        cache[key] = _merge_file(file, resolver, seen, cache)
    data, origins, chain, height = cache[key]
    return dict(data), dict(origins), chain, height  # callers pop top-level keys and add origins


def _merge_file(file: Path, resolver: ExtendsResolver, seen: tuple[Path, ...], cache: ResolveCache) -> _Merged:
    doc = read_yaml_file(file)
    if doc.data is None:
        raise ProfileError("the file is empty", where=str(file), hint="a profile needs at least a description")
    if not isinstance(doc.data, dict):
        raise ProfileError("a profile must be a mapping of keys to values", where=doc.where(()))
    here_origins = {key_path: Origin(str(file), line) for key_path, line in doc.lines.items() if key_path}
    data = dict(doc.data)
    parents = data.get("extends")
    if parents is None:
        return data, here_origins, (file,), 1
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ProfileError("extends must be a profile name or a list of names", where=doc.where(("extends",)))
    if len(seen) >= MAX_EXTENDS_DEPTH:
        raise ProfileError(
            f"extends chain deeper than {MAX_EXTENDS_DEPTH} profiles",
            where=doc.where(("extends",)),
            hint="a profile extends a few bases; flatten the hierarchy",
        )
    merged: dict[str, Any] = {}
    origins: dict[Path_, Origin] = {}
    chain: list[Path] = [file]
    height = 1
    resolved_here = file.resolve()
    for index, parent in enumerate(parents):
        where = doc.where(("extends", index) if ("extends", index) in doc.lines else ("extends",))
        try:
            parent_file = resolver(parent, file)
        except GemmaProfileError as exc:
            raise ProfileError(exc.message, where=where, hint=exc.hint) from None
        stack = (*seen, resolved_here)
        if parent_file.resolve() in stack:
            names = " -> ".join(p.stem for p in (*stack, parent_file.resolve()))
            raise ProfileError(f"extends cycle: {names}", where=where, hint="remove one of the extends")
        parent_data, parent_origins, parent_chain, parent_height = _load_merged(parent_file, resolver, stack, cache)
        # As deep as the check above allows when the parent was merged at another depth (cached).
        if len(stack) + parent_height - 2 >= MAX_EXTENDS_DEPTH:
            raise ProfileError(
                f"extends chain deeper than {MAX_EXTENDS_DEPTH} profiles",
                where=where,
                hint="a profile extends a few bases; flatten the hierarchy",
            )
        height = max(height, parent_height + 1)
        parent_data.pop("abstract", None)  # abstractness is not inherited
        parent_data.pop("name", None)
        parent_data.pop("extends", None)
        via = {k: Origin(o.path, o.line, o.via or f"extends {parent}") for k, o in parent_origins.items()}
        _merge_into(merged, origins, parent_data, via)
        known = set(chain)
        chain.extend(p for p in parent_chain if p not in known)
        if len(chain) > MAX_EXTENDS_FILES:
            raise ProfileError(
                f"extends brings in more than {MAX_EXTENDS_FILES} profile files (at least {len(chain)})",
                where=where,
                hint="a profile extends a few bases; flatten the hierarchy",
            )
    _merge_into(merged, origins, data, here_origins)
    return merged, origins, tuple(chain), height


def _merge_into(
    base: dict[str, Any],
    base_origins: dict[Path_, Origin],
    over: dict[str, Any],
    over_origins: Mapping[Path_, Origin],
    prefix: Path_ = (),
) -> None:
    """Deep-merge ``over`` into ``base``: mappings merge, anything else replaces."""
    for key, value in over.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            if path in over_origins:
                base_origins[path] = over_origins[path]
            _merge_into(base[key], base_origins, value, over_origins, path)
            continue
        base[key] = copy.deepcopy(value)
        for stale in [p for p in base_origins if p[: len(path)] == path]:
            del base_origins[stale]
        base_origins.update({p: o for p, o in over_origins.items() if p[: len(path)] == path})


def _leaves(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in data.items():
        # max_memory and device_map are values in their own right, not sections.
        if isinstance(value, dict) and value and key not in ("max_memory", "device_map", "rope_wave_length"):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _set_in(data: dict[str, Any], key_path: tuple[str, ...], value: Any) -> None:
    node = data
    for key in key_path[:-1]:
        node = node.setdefault(key, {})
    node[key_path[-1]] = copy.deepcopy(value)


def _where(origins: Mapping[Path_, Origin], key_path: Path_, default: str) -> str:
    probe = tuple(key_path)
    while probe:
        if probe in origins:
            origin = origins[probe]
            return f"{origin.path}:{origin.line}" if origin.line else origin.path
        probe = probe[:-1]
    return default


def _model_for(key_path: Path_) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at ``key_path``."""
    sections: dict[str, type[BaseModel]] = {
        "config": schema.GemmaConfigOverrides,
        "placement": schema.Placement,
        "quantization": schema.Quantization,
        "hardware": schema.Hardware,
        "generation": schema.Generation,
        "loading": schema.Loading,
        "compute": schema.Compute,
    }
    if not key_path:
        return schema.ProfileModel
    if key_path[0] == "variants":
        if len(key_path) == 2:
            return schema.ProfileBody
        key_path = key_path[2:]
    return sections.get(str(key_path[0])) if len(key_path) == 1 else None


def _precheck(data: dict[str, Any], origins: Mapping[Path_, Origin]) -> list[Problem]:
    """Checks whose messages pydantic would word poorly: variant and device keys."""
    problems: list[Problem] = []
    file = next(iter(origins.values())).path if origins else "<profile>"
    variants = data.get("variants")
    if isinstance(variants, dict):
        for key in variants:
            if key not in schema.VARIANT_KEYS:
                problems.append(
                    Problem(
                        _where(origins, ("variants", key), file),
                        f"unknown variant '{key}'{did_you_mean(str(key), schema.VARIANT_KEYS)}; "
                        f"use a gemma variant ({', '.join(VARIANTS)}) or a family ({', '.join(FAMILIES)})",
                    )
                )
    return problems


def _problem(error: Any, origins: Mapping[Path_, Origin], file: str) -> Problem:
    loc: Path_ = tuple(error["loc"])
    where = _where(origins, loc, file)
    dotted = ".".join(map(str, loc))
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        model = _model_for(loc[:-1])
        valid = sorted(model.model_fields) if model else []
        section = ".".join(map(str, loc[:-1])) or "the top level"
        if model is schema.GemmaConfigOverrides:
            if key in schema.NOT_OVERRIDABLE:
                return Problem(where, f"config.{key} cannot be set from a profile: {schema.NOT_OVERRIDABLE[key]}")
            return Problem(
                where,
                f"unknown GemmaConfig field '{key}'{did_you_mean(key, valid)}; valid fields: {', '.join(valid)}",
            )
        return Problem(
            where, f"unknown key '{key}' in {section}{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}"
        )
    if kind == "missing":
        return Problem(where, f"missing required key '{dotted}'")
    message = str(error["msg"]).removeprefix("Value error, ")
    shown = error.get("input")
    if kind.endswith("_type") or kind.startswith("literal") or kind == "string_pattern_mismatch":
        return Problem(where, f"{dotted}: {message} (got {shown!r})")
    return Problem(where, f"{dotted}: {message}")


def problems_in(
    path: str | Path, resolve_extends: ExtendsResolver | None = None, *, cache: ResolveCache | None = None
) -> list[Problem]:
    """All problems loading one file finds (empty when it loads); ``validate`` adds the planner's checks."""
    try:
        load_profile(path, resolve_extends, cache=cache)
    except ProfileValidationError as exc:
        return exc.problems
    except ProfileError as exc:
        return [Problem(exc.where or str(path), exc.message + (f" ({exc.hint})" if exc.hint else ""))]
    return []


__all__ = [
    "Origin",
    "Problem",
    "Profile",
    "ProfileValidationError",
    "ResolveCache",
    "SourcedDoc",
    "load_profile",
    "problems_in",
]
