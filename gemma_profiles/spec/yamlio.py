"""Safe YAML reading that remembers where every value came from.

Only plain data is accepted (mappings with string keys, sequences, strings,
numbers, booleans, null): no Python tags, no custom tags.  Files, nesting and
alias expansion are bounded, so a hostile profile is refused quickly instead of
exhausting memory (a "billion laughs" alias bomb expands past ``MAX_NODES`` and
stops there).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Any

import yaml

from gemma_profiles.errors import ProfileError

MAX_FILE_BYTES = 256 * 1024
MAX_DEPTH = 32
MAX_NODES = 20_000

Path_ = tuple[str | int, ...]

_PLAIN_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PLAIN_HINT = "profiles hold plain strings, numbers, booleans, lists and mappings"


@dataclass
class SourcedDoc:
    """YAML data plus the line (1-based) each key or item was written on."""

    data: Any
    path: str
    lines: dict[Path_, int] = field(default_factory=dict)

    def line_of(self, key_path: Path_) -> int | None:
        """Line of ``key_path`` or of its nearest ancestor that has one."""
        probe = tuple(key_path)
        while probe:
            if probe in self.lines:
                return self.lines[probe]
            probe = probe[:-1]
        return self.lines.get((), None)

    def where(self, key_path: Path_ = ()) -> str:
        line = self.line_of(key_path)
        return f"{self.path}:{line}" if line else self.path


def read_yaml_file(path: str | os.PathLike[str]) -> SourcedDoc:
    """Read and parse a profile file, refusing what is not plain, bounded data."""
    name = os.fspath(path)
    try:
        mode = os.stat(name).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(name)
        if not stat.S_ISREG(mode):  # reading a pipe would block, a device might never end
            raise ProfileError("not a regular file (a pipe or a device?)", where=name, hint="name a .yaml file")
        with open(name, "rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ProfileError("file not found", where=name, hint="check the path") from None
    except IsADirectoryError:
        raise ProfileError("is a directory, not a profile file", where=name, hint="name a .yaml file") from None
    except OSError as exc:
        raise ProfileError(
            f"cannot read: {exc.strerror}", where=name, hint="check that the file exists and you may read it"
        ) from None
    except ValueError:  # a NUL byte in the name
        raise ProfileError("not a usable file name", where=repr(name), hint="check the path") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ProfileError(
            f"file is larger than {MAX_FILE_BYTES // 1024} KiB; a profile is a few dozen lines",
            where=name,
            hint="check that this is the profile you meant",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ProfileError("not valid UTF-8 text", where=f"{name}:{line}", hint="save the file as UTF-8") from None
    return parse_yaml(text, name)


def parse_yaml(text: str, path: str = "<string>") -> SourcedDoc:
    """Parse YAML text into plain data with line numbers."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ProfileError(f"invalid YAML: {problem}", where=f"{path}{line}") from None
    except yaml.reader.ReaderError as exc:
        # No mark, a position: libyaml counts UTF-8 bytes, the pure-Python reader characters.
        if _Loader is yaml.SafeLoader:
            row = text[: exc.position].count("\n") + 1
        else:
            row = text.encode("utf-8", "replace")[: exc.position].count(b"\n") + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "\0")
        raise ProfileError(
            f"invalid YAML: character #x{code:04x} is not allowed: {exc.reason}",
            where=f"{path}:{row}",
            hint="a profile is plain text; remove the character",
        ) from None
    except UnicodeEncodeError:
        raise ProfileError("not valid UTF-8 text", where=path, hint="save the file as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"invalid YAML: {exc}", where=path) from None
    except RecursionError:
        raise ProfileError("YAML nested too deeply", where=path) from None
    doc = SourcedDoc(data=None, path=path)
    if node is None:
        return doc
    doc.lines[()] = node.start_mark.line + 1
    builder = _Builder(doc)
    doc.data = builder.build(node, (), 0)
    return doc


class _Builder:
    def __init__(self, doc: SourcedDoc):
        self.doc = doc
        self.nodes = 0
        self.scalars = yaml.SafeLoader("")

    def fail(self, node: yaml.Node, message: str, hint: str | None = None) -> ProfileError:
        return ProfileError(message, where=f"{self.doc.path}:{node.start_mark.line + 1}", hint=hint)

    def build(self, node: yaml.Node, key_path: Path_, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.fail(
                node,
                f"document expands to more than {MAX_NODES} values (alias bomb?)",
                hint="write the values out plainly",
            )
        if depth > MAX_DEPTH:
            raise self.fail(node, f"nested deeper than {MAX_DEPTH} levels", hint="a profile is a few levels deep")
        if isinstance(node, yaml.MappingNode):
            if node.tag != "tag:yaml.org,2002:map":
                raise self.fail(node, f"tag {node.tag!r} is not allowed in a profile", hint=_PLAIN_HINT)
            result: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise self.fail(key_node, "YAML merge keys ('<<') are not supported; use extends:")
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                    key_text = getattr(key_node, "value", "?")
                    raise self.fail(key_node, f"key {key_text!r} must be a string", hint="quote it")
                key = key_node.value
                if key in result:
                    raise self.fail(key_node, f"duplicate key '{key}'")
                child = (*key_path, key)
                self.doc.lines[child] = key_node.start_mark.line + 1
                result[key] = self.build(value_node, child, depth + 1)
            return result
        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                raise self.fail(node, f"tag {node.tag!r} is not allowed in a profile", hint=_PLAIN_HINT)
            items = []
            for index, item in enumerate(node.value):
                child = (*key_path, index)
                self.doc.lines[child] = item.start_mark.line + 1
                items.append(self.build(item, child, depth + 1))
            return items
        if node.tag not in _PLAIN_TAGS:
            raise self.fail(
                node,
                f"tag {node.tag!r} is not allowed in a profile",
                hint=_PLAIN_HINT,
            )
        try:
            return self.scalars.construct_object(node)
        except (ValueError, OverflowError, yaml.YAMLError) as exc:
            raise self.fail(node, f"bad value {node.value!r}: {exc}") from None
