"""Property-based fuzzing of the profile loader, the resolver and the planner.

Whatever it is given - generated profiles full of wrong types, unknown keys,
huge numbers and bad memory strings; random text and bytes (non-UTF-8, control
characters, Python tags, anchors and aliases); alias bombs and deep documents;
folders of profiles that ``extends`` each other in long chains and cycles - the
loader gives either a valid `Profile`, which then resolves and plans for every
gemma variant, or a `GemmaProfileError` that says where: the file, and for
YAML and validation problems ``:<line>``, on one line.  Any other exception is
a bug.

CI runs ``GEMMA_PROFILE_FUZZ_EXAMPLES`` (default 40) examples per property, seven
properties.  The full run quoted in the README ("Fuzzing"):

    GEMMA_PROFILE_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py -q -p no:cacheprovider \\
        --hypothesis-show-statistics
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gemma_profiles.errors import GemmaProfileError, ProfileNotFoundError
from gemma_profiles.planning.plan import Target, make_plan
from gemma_profiles.plugin.types import ProfileSource
from gemma_profiles.spec import schema, yamlio
from gemma_profiles.spec.profile import MAX_EXTENDS_DEPTH, Profile, load_profile
from gemma_profiles.spec.registry import Registry
from gemma_profiles.spec.variants import FAMILIES, VARIANTS

EXAMPLES = int(os.environ.get("GEMMA_PROFILE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)

LINE = re.compile(r":\d+\b")
# Problems about a whole file, which have no line to point at.
WHOLE_FILE = (
    "the file is empty",
    "larger than",
    "cannot read",
    "not found",
    "is a directory",
    "not a regular file",
    "not a usable file name",
)


# -- what every outcome must satisfy -------------------------------------------------------------


def check_error(exc: GemmaProfileError, folder: Path) -> None:
    """A located, one-line error: ``where`` names a file (ours, or one an ``extends`` reached), with a line."""
    text = str(exc)
    assert text.splitlines() == [text], f"not one line: {text!r}"
    where = exc.where or ""
    assert where, f"no location: {text!r}"
    file = where.split(" (", 1)[0]
    file = LINE.sub("", file) if LINE.search(file) else file
    assert str(folder) in where or os.path.exists(file), f"location {where!r} is not a file: {text!r}"
    if not any(phrase in exc.message for phrase in WHOLE_FILE):
        assert LINE.search(where), f"no line in {where!r}: {text!r}"


TARGETS = st.one_of(
    st.none(),
    st.builds(
        Target,
        device=st.sampled_from(["cpu", "cuda:0", "cuda:1", "mps"]),
        name=st.sampled_from(["", "Quadro P2200", "NVIDIA A100"]),
        compute_capability=st.one_of(st.none(), st.tuples(st.integers(0, 12), st.integers(0, 9))),
        memory=st.one_of(st.none(), st.integers(0, 2**45)),
        host_memory=st.one_of(st.none(), st.integers(0, 2**45)),
        cpu_isa=st.sampled_from([(), ("avx2",), ("avx512f",)]),
        source=st.just("fuzz"),
    ),
)


def check_profile(profile: Profile, folder: Path, target: Target | None) -> None:
    """A valid profile resolves for every variant and family, and plans (or fails with a location)."""
    assert isinstance(profile, Profile)
    for variant in (*VARIANTS, None):
        resolved = profile.resolve(variant)
        assert resolved.name == profile.name
        try:
            plan = make_plan(profile, variant)
            assert plan.profile == profile.name
            if target is not None:
                make_plan(profile, variant, target=target)
        except GemmaProfileError as exc:
            check_error(exc, folder)
    for family in FAMILIES:
        profile.resolve(None, family)


def outcome(load: Callable[[], Profile], folder: Path, target: Target | None = None) -> Profile | GemmaProfileError:
    """Run ``load``; a profile is checked further, an error for its location.  Anything else propagates."""
    try:
        profile = load()
    except GemmaProfileError as exc:
        check_error(exc, folder)
        event(f"refused: {type(exc).__name__}")
        return exc
    check_profile(profile, folder, target)
    event("loaded: a valid profile")
    return profile


def registry(folder: Path) -> Registry:
    return Registry([ProfileSource(folder, "fuzz", 0)])


# -- (a) profile-shaped data ----------------------------------------------------------------------

HUGE_INTS = st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64 + 1, 10**30, 10**400, -(10**400)])
MEMORY_STRINGS = st.one_of(
    st.from_regex(r"\A\s?-?\d{0,6}(\.\d{0,3})?\s?([KMGTkmgt][Ii]?[Bb]|[Bb]|[A-Za-z]{1,3})?\s?\Z"),
    st.sampled_from(
        [
            "4.5GiB",
            "500MB",
            "16GB",
            "1PiB",
            "1e3GB",
            "1" * 400 + "GiB",
            "9" * 320,
            "-1GB",
            "4,5GiB",
            "GiB",
            "",
            "٣GiB",
            "1.5.5GB",
        ]
    ),
)
DEVICE_STRINGS = st.one_of(
    st.sampled_from(["cpu", "cuda", "cuda:0", "cuda:3", "mps", "gpu", "CUDA", "cuda:-1", "cuda:" + "9" * 40, ""]),
    st.from_regex(r"\A(cpu|cuda|mps|disk|cuda:\d{1,4}|\d{1,2}|[a-z:]{0,6})\Z"),
)
SHORT_TEXT = st.text(max_size=16)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    HUGE_INTS,
    st.floats(),
    SHORT_TEXT,
    MEMORY_STRINGS,
    DEVICE_STRINGS,
    st.sampled_from(["float16", "bfloat16", "float32", "float", "int8", "none", "GEMMA_2", "GLOBAL", "auto"]),
)
JUNK_KEYS = st.one_of(
    SHORT_TEXT,
    st.sampled_from(["dtpye", "devcie", "vision_config", "max_memory", "2b", "gemma4", "10b", "<<", "name"]),
    st.integers(-3, 3),
    st.booleans(),
    st.none(),
)
JUNK = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(JUNK_KEYS, children, max_size=4),
    max_leaves=10,
)


def often(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes junk."""
    return st.one_of(good, good, JUNK)


POSITIVE = st.one_of(st.integers(1, 2**16), st.integers(-2, 2**70), HUGE_INTS)
CONFIG_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "architecture": st.sampled_from(["GEMMA_1", "GEMMA_2", "GEMMA_3", "GEMMA_4", "gemma_2", 2]),
    "dtype": st.sampled_from(["float32", "float", "float16", "bfloat16", "int8", "fp16"]),
    "quant": st.booleans(),
    "tokenizer": SHORT_TEXT,
    "attn_types": st.lists(st.sampled_from(["GLOBAL", "LOCAL_SLIDING", "local"]), max_size=4),
    "rope_wave_length": st.dictionaries(st.sampled_from(["GLOBAL", "LOCAL_SLIDING", "X"]), POSITIVE, max_size=2),
    "rms_norm_eps": st.floats(),
    "final_logit_softcapping": st.floats(),
    "attn_logit_softcapping": st.floats(),
    "use_pre_ffw_norm": st.booleans(),
    "use_post_ffw_norm": st.booleans(),
    "use_qk_norm": st.booleans(),
}
SECTION_VALUES: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "config": {
        name: CONFIG_VALUES.get(name, POSITIVE) for name in [*schema.GemmaConfigOverrides.model_fields, "vision_config"]
    },
    "placement": {
        "device": DEVICE_STRINGS,
        "device_map": st.one_of(st.just("auto"), st.dictionaries(SHORT_TEXT, DEVICE_STRINGS, max_size=3)),
        "max_memory": st.dictionaries(DEVICE_STRINGS, st.one_of(MEMORY_STRINGS, POSITIVE), max_size=3),
        "offload": st.sampled_from(["none", "cpu", "disk", "gpu"]),
        "offload_folder": SHORT_TEXT,
    },
    "quantization": {"weights": st.sampled_from(["none", "int8", "int4", "INT8"])},
    "generation": {"batch": POSITIVE, "seq_len": POSITIVE},
    "hardware": {
        "device": st.sampled_from(["cpu", "cuda", "mps", "tpu"]),
        "gpu": st.lists(SHORT_TEXT, max_size=2),
        "compute_capability": st.one_of(
            st.sampled_from(["6.1", "7.5", "8.0", "8.9", "10.0", "6", "x.y"]), st.floats(0, 20)
        ),
        "memory": st.one_of(MEMORY_STRINGS, POSITIVE),
        "host_memory": st.one_of(MEMORY_STRINGS, POSITIVE),
        "cpu_cores": POSITIVE,
    },
}


def section(name: str) -> st.SearchStrategy[Any]:
    """A section with a random subset of its keys, mostly plausible values, sometimes unknown keys."""
    known = st.fixed_dictionaries({}, optional={key: often(value) for key, value in SECTION_VALUES[name].items()})
    extra = st.one_of(st.just({}), st.just({}), st.dictionaries(JUNK_KEYS, JUNK, max_size=2))
    return often(st.builds(lambda a, b: {**b, **a}, known, extra))


BODY = st.fixed_dictionaries(
    {}, optional={key: section(key) for key in ("config", "placement", "quantization", "generation")}
)
# Names and paths that once made pathlib raise (a NUL byte, an unknown ~user, a name too long).
ODD_REFERENCES = st.sampled_from(
    [
        "nosuch",
        "./nosuch.yaml",
        "/no/such.yaml",
        "~nosuchuser/p.yaml",
        "~\x00/p.yaml",
        "a\x00b",
        "\x00",
        "x" * 300 + ".yaml",
        "x" * 5000,
        "///",
        ".",
        "..",
        "~",
    ]
)
VARIANT_KEYS = st.one_of(st.sampled_from([*schema.VARIANT_KEYS, "10b", "gemma4", "2B"]), SHORT_TEXT)
NAMES = st.one_of(st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,10}\Z"), SHORT_TEXT, st.just("x" * 70))
PROFILE_DATA = st.builds(
    lambda top, body, extra: {**extra, **body, **top},
    st.fixed_dictionaries(
        {},
        optional={
            "name": often(NAMES),
            "description": often(SHORT_TEXT),
            "extends": often(st.one_of(ODD_REFERENCES, SHORT_TEXT)),
            "abstract": often(st.booleans()),
            "hardware": section("hardware"),
            "variants": often(st.dictionaries(VARIANT_KEYS, often(BODY), max_size=3)),
        },
    ),
    BODY,
    st.one_of(st.just({}), st.just({}), st.dictionaries(JUNK_KEYS, JUNK, max_size=2)),
)


def dump(data: Any, flow: bool | None, unicode: bool) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=flow, allow_unicode=unicode, width=60)


@FUZZ
@given(
    data=st.one_of(PROFILE_DATA, PROFILE_DATA, PROFILE_DATA, JUNK),
    flow=st.sampled_from([None, False, True]),
    unicode=st.booleans(),
    target=TARGETS,
)
def test_generated_profiles_load_or_fail_with_a_location(data: Any, flow: bool | None, unicode: bool, target: Any):
    with tempfile.TemporaryDirectory(prefix="gp-fuzz-") as tmp:
        folder = Path(tmp)
        path = folder / "fuzzed.yaml"
        path.write_text(dump(data, flow, unicode), encoding="utf-8")
        direct = outcome(lambda: load_profile(path), folder, target)
        named = outcome(lambda: registry(folder).load("fuzzed"), folder, target)
        if not (isinstance(data, dict) and "extends" in data):
            assert isinstance(direct, Profile) == isinstance(named, Profile), (direct, named)


# -- (b) raw text and bytes ---------------------------------------------------------------------

FRAGMENTS = st.sampled_from(
    [
        "name: fuzz",
        "description: ok",
        "config: {dtype: float16}",
        "config:\n  dtype: bfloat16",
        "placement: {device: cuda:0, max_memory: {cuda:0: 4GiB}}",
        "hardware: {device: cuda, compute_capability: 6.1, memory: 5GiB}",
        "variants: {9b: {config: {dtype: float32}}}",
        "description: !!python/object/apply:os.system ['echo pwned']",
        "x: !!python/name:os.system",
        "!!python/object:collections.OrderedDict {}",
        "y: !!binary aGVsbG8=",
        "z: !!timestamp 2001-12-14",
        "s: !!set {a, b}",
        "o: !!omap [a: 1]",
        "c: !custom 1",
        "a: &anchor [1, 2, 3]",
        "b: *anchor",
        "b: *undefined",
        "<<: *anchor",
        "<<: {dtype: float16}",
        "? [complex, key]\n: 1",
        "? {a: 1}\n: 2",
        "1: integer key",
        "null: null key",
        "- item",
        "  - indented item",
        "key: 'unterminated",
        'key: "bad \\escape"',
        "{unclosed: 1",
        "[1, 2",
        "%YAML 1.1\n---",
        "%TAG ! tag:example.com,2000:\n---",
        "---",
        "...",
        "---\nsecond: document",
        "\t tabbed: 1",
        "key: value # comment",
        "big: " + "9" * 5000,
        "huge: 1e999",
        "key: |\n  block\n  text",
        "name: name\nname: duplicate",
        "\ufeffbom: 1",
        "nul: a\x00b",
        "bell: a\x07b",
        "nel: a\x85b",
    ]
)
YAML_TEXT = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(FRAGMENTS, FRAGMENTS, st.text(max_size=12)), max_size=12).map("\n".join),
    st.builds(
        lambda head, tail: head + "\n" + "\n".join(tail),
        st.sampled_from(["name: fuzz", "name: fuzz\ndescription: d", "config:"]),
        st.lists(FRAGMENTS, max_size=6),
    ),
)


@FUZZ
@given(text=YAML_TEXT, target=TARGETS)
def test_generated_yaml_text_loads_or_fails_with_a_location(text: str, target: Any):
    with tempfile.TemporaryDirectory(prefix="gp-fuzz-") as tmp:
        folder = Path(tmp)
        path = folder / "fuzz.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        marker = folder / "pwned"
        outcome(lambda: load_profile(path), folder, target)
        outcome(lambda: registry(folder).load("fuzz"), folder, target)
        assert not marker.exists()


RAW_BYTES = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda head, junk, tail: head + junk + tail,
        st.sampled_from([b"name: fuzz\ndescription: ", b"\xef\xbb\xbf", b"", b"name: fuzz\n"]),
        st.binary(min_size=1, max_size=40),
        st.sampled_from([b"", b"\n", b"\nconfig: {dtype: float16}\n"]),
    ),
    st.sampled_from(
        [b"\xff\xfe" + "name: utf16".encode("utf-16-le"), b"description: caf\xe9\n", b"\xc0\xaf", b"\xed\xa0\x80"]
    ),
)


@FUZZ
@given(raw=RAW_BYTES)
def test_random_bytes_load_or_fail_with_a_location(raw: bytes):
    with tempfile.TemporaryDirectory(prefix="gp-fuzz-") as tmp:
        folder = Path(tmp)
        path = folder / "bytes.yaml"
        path.write_bytes(raw)
        result = outcome(lambda: load_profile(path), folder)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            assert isinstance(result, GemmaProfileError) and "UTF-8" in result.message


@st.composite
def hostile_documents(draw: st.DrawFn) -> tuple[str, str]:
    """(kind, text): an alias bomb, a deeply nested document, or a very large one."""
    kind = draw(st.sampled_from(["bomb", "flow-depth", "block-depth", "large", "many-keys"]))
    if kind == "bomb":
        width, depth = draw(st.integers(2, 12)), draw(st.integers(2, 12))
        lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
        return kind, "\n".join(lines) + "\n"
    if kind == "flow-depth":
        n = draw(st.integers(1, 20_000))
        return kind, "description: " + "[" * n + "]" * n + "\n"
    if kind == "block-depth":
        n = draw(st.integers(1, 300))
        return kind, "".join(f"{'  ' * i}k{i}:\n" for i in range(n)) + "  " * n + "v\n"
    if kind == "large":
        size = draw(st.integers(1, 2 * yamlio.MAX_FILE_BYTES))
        return kind, "name: large\n# " + "x" * size + "\n"
    n = draw(st.integers(1, 30_000))
    return kind, "description: many\nvariants: {" + ", ".join(f"k{i}: {i}" for i in range(n)) + "}\n"


@FUZZ
@given(document=hostile_documents())
def test_bombs_deep_and_large_documents_are_refused_quickly(document: tuple[str, str]):
    kind, text = document
    with tempfile.TemporaryDirectory(prefix="gp-fuzz-") as tmp:
        folder = Path(tmp)
        path = folder / "hostile.yaml"
        path.write_text(text, encoding="utf-8")
        # CPU time, not wall time: a bomb's cost is work done, and a busy machine stretches
        # wall time without it (3.2 s wall was seen at a load of 8 on 2 cores).
        start = time.process_time()
        result = outcome(lambda: load_profile(path), folder)
        elapsed = time.process_time() - start
    # A bomb costs exponentially more; the 256 KiB cap keeps linear work near 1 s of CPU
    # (19 000 keys on a quiet box), which contention on 2 shared cores has stretched to 2.5 s.
    assert elapsed < 5.0, f"{kind}: {elapsed:.2f} s of CPU"
    if len(text.encode()) > yamlio.MAX_FILE_BYTES:
        assert isinstance(result, GemmaProfileError) and "larger than" in result.message
    if kind == "bomb" and isinstance(result, GemmaProfileError) and "alias bomb" not in result.message:
        assert "larger than" in result.message or "unknown" in result.message or "extra" in result.message


# -- (c) folders of profiles that extend each other -----------------------------------------------

VALID_BODY = st.fixed_dictionaries(
    {},
    optional={
        "description": SHORT_TEXT,
        "config": st.fixed_dictionaries(
            {},
            optional={
                "dtype": st.sampled_from(["float32", "float16", "bfloat16"]),
                "max_position_embeddings": st.integers(1, 10**6),
                "rms_norm_eps": st.floats(1e-9, 1.0),
            },
        ),
        "placement": st.fixed_dictionaries(
            {},
            optional={
                "device": st.sampled_from(["cpu", "cuda", "cuda:1", "mps"]),
                "max_memory": st.dictionaries(
                    st.sampled_from(["cpu", "cuda:0", "disk"]), st.sampled_from(["1GiB", "500MB", "64GiB"]), max_size=2
                ),
                "offload": st.sampled_from(["none", "cpu"]),
            },
        ),
        "quantization": st.fixed_dictionaries({"weights": st.sampled_from(["none", "int8"])}),
        "hardware": st.fixed_dictionaries(
            {"device": st.sampled_from(["cpu", "cuda"])},
            optional={
                "compute_capability": st.sampled_from(["6.1", "7.5", "8.0"]),
                "memory": st.sampled_from(["5GiB", "16GB", "80GiB"]),
                "host_memory": st.sampled_from(["8GiB", "32GB"]),
            },
        ),
        "variants": st.dictionaries(
            st.sampled_from(list(schema.VARIANT_KEYS)),
            st.fixed_dictionaries(
                {}, optional={"config": st.fixed_dictionaries({"dtype": st.sampled_from(["float32", "bfloat16"])})}
            ),
            max_size=2,
        ),
    },
)


@st.composite
def extends_graphs(draw: st.DrawFn) -> dict[str, Any]:
    """Up to six profiles whose ``extends`` point anywhere: each other, themselves, missing names, junk."""
    count = draw(st.integers(1, 6))
    names = [f"p{i}" for i in range(count)]
    reference = st.one_of(
        st.sampled_from(names),
        st.sampled_from([f"./{name}.yaml" for name in names]),
        st.sampled_from(["missing", "../p0.yaml", "sub/p0.yaml", "base-cuda"]),
        ODD_REFERENCES,
        SHORT_TEXT,
    )
    files: dict[str, Any] = {}
    for name in names:
        body = dict(draw(st.one_of(VALID_BODY, VALID_BODY, VALID_BODY, PROFILE_DATA)))
        parents = draw(st.one_of(st.none(), reference, st.lists(reference, max_size=3), JUNK))
        if parents is not None:
            body["extends"] = parents
        else:
            body.pop("extends", None)
        files[name] = body
    return files


@FUZZ
@given(files=extends_graphs(), flow=st.sampled_from([None, False]), target=TARGETS)
def test_extends_graphs_resolve_or_fail_with_a_location(files: dict[str, Any], flow: bool | None, target: Any):
    with tempfile.TemporaryDirectory(prefix="gp-fuzz-") as tmp:
        folder = Path(tmp)
        for name, body in files.items():
            (folder / f"{name}.yaml").write_text(dump(body, flow, True), encoding="utf-8")
        found = registry(folder)
        for name in files:
            outcome(lambda name=name: found.load(name), folder, target)
            outcome(lambda name=name: load_profile(folder / f"{name}.yaml"), folder, target)


@st.composite
def chains(draw: st.DrawFn) -> tuple[list[dict[str, Any]], int | None]:
    """p0 extends p1 extends ... p(n-1), which may close a cycle back to p(k): (bodies, k or None)."""
    length = draw(st.integers(1, MAX_EXTENDS_DEPTH + 8))
    back = draw(st.one_of(st.none(), st.integers(0, length - 1)))
    by_path = draw(st.lists(st.booleans(), min_size=length, max_size=length))
    bodies = []
    for index in range(length):
        body = dict(draw(VALID_BODY))
        parent = index + 1 if index + 1 < length else back
        if parent is not None:
            body["extends"] = f"./p{parent}.yaml" if by_path[index] else f"p{parent}"
        bodies.append(body)
    return bodies, back


@FUZZ
@given(chain=chains(), target=TARGETS)
def test_deep_extends_chains_and_cycles(chain: tuple[list[dict[str, Any]], int | None], target: Any):
    bodies, back = chain
    with tempfile.TemporaryDirectory(prefix="gp-fuzz-") as tmp:
        folder = Path(tmp)
        for index, body in enumerate(bodies):
            (folder / f"p{index}.yaml").write_text(dump(body, None, True), encoding="utf-8")
        result = outcome(lambda: registry(folder).load("p0"), folder, target)
    # File k is read with k files above it; one that extends further fails past the limit.
    last_extending = len(bodies) - 1 if back is not None else len(bodies) - 2
    if last_extending >= MAX_EXTENDS_DEPTH:
        assert isinstance(result, GemmaProfileError) and "deeper than" in result.message, result
    elif back is not None:
        assert isinstance(result, GemmaProfileError) and "extends cycle" in result.message, result
    else:
        assert isinstance(result, Profile), result
        assert [p.name for p in result.chain] == [f"p{i}.yaml" for i in range(len(bodies))]


# -- names and paths, as GEMMA_PROFILE or a CLI argument gives them --------------------------------


@FUZZ
@given(
    reference=st.one_of(st.text(max_size=40), ODD_REFERENCES, st.from_regex(r"\A[~./a-z0-9\x00-]{0,20}(\.ya?ml)?\Z"))
)
def test_any_reference_is_found_or_not_found(reference: str):
    with tempfile.TemporaryDirectory(prefix="gp-fuzz-") as tmp:
        folder = Path(tmp)
        (folder / "real.yaml").write_text("description: real\n", encoding="utf-8")
        found = registry(folder)
        try:
            path = found.find(reference)
        except ProfileNotFoundError as exc:
            assert str(exc).splitlines() == [str(exc)]
            assert exc.hint, exc
            event("refused: ProfileNotFoundError")
        else:  # a file, or something else there for the loader to name (a directory, a pipe)
            assert path.exists()
            outcome(lambda: found.load(reference), folder)
            event("found")
        with contextlib.suppress(ProfileNotFoundError):
            found.resolve_extends(reference, folder / "real.yaml")
