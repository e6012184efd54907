"""Profile loading: YAML -> validated `Profile`, extends, variant overrides, problems with file:line."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gemma_profiles.errors import GemmaProfileError, ProfileError
from gemma_profiles.planning.plan import make_plan
from gemma_profiles.plugin.types import ProfileSource
from gemma_profiles.spec import profile as profile_module
from gemma_profiles.spec import schema, yamlio
from gemma_profiles.spec.profile import ProfileValidationError, load_profile, problems_in
from gemma_profiles.spec.registry import Registry
from gemma_profiles.units import MAX_BYTES, parse_memory


def line_of(path: Path, needle: str) -> int:
    """1-based line of the first line of ``path`` containing ``needle``."""
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if needle in text:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def only_problem(path: Path) -> str:
    problems = problems_in(path)
    assert len(problems) == 1, [str(p) for p in problems]
    return str(problems[0])


# -- valid profiles ----------------------------------------------------------------


def test_valid_profile_loads(write_profile):
    path = write_profile(
        "laptop",
        """
        # a test profile
        name: laptop
        description: a laptop
        hardware: {device: cuda, compute_capability: "8.6", memory: 12GiB, host_memory: 16GiB}
        config: {dtype: bfloat16, max_position_embeddings: 4096}
        placement: {device: "cuda:0", max_memory: {"cuda:0": 11GiB, cpu: 12GiB}}
        quantization: {weights: int8}
        variants:
          9b: {config: {dtype: float32}}
        """,
    )
    profile = load_profile(path)
    assert profile.name == "laptop"
    assert profile.description == "a laptop"
    assert profile.model.config.dtype == "bfloat16"
    assert profile.model.config.max_position_embeddings == 4096
    assert profile.model.placement.device == "cuda:0"
    assert profile.model.placement.max_memory == {"cuda:0": "11GiB", "cpu": "12GiB"}
    assert profile.model.quantization.weights == "int8"
    assert profile.model.hardware is not None
    assert profile.model.hardware.capability_tuple() == (8, 6)
    assert profile.origin("config", "dtype").line == line_of(path, "config:")
    assert problems_in(path) == []


def test_unquoted_compute_capability_is_read_as_text(write_profile):
    path = write_profile("cc", "hardware: {device: cuda, compute_capability: 7.5}\n")
    assert load_profile(path).model.hardware.compute_capability == "7.5"


def test_name_defaults_to_the_file_stem(write_profile):
    path = write_profile("nameless", "config: {dtype: float32}\n")
    assert load_profile(path).name == "nameless"


# -- extends -------------------------------------------------------------------------


@pytest.fixture
def three_levels(write_profile):
    grand = write_profile(
        "grand",
        """
        name: grand
        description: grandparent
        config:
          dtype: bfloat16
          vocab_size: 50
          head_dim: 64
        placement:
          device: cpu
        """,
    )
    parent = write_profile(
        "parent",
        """
        name: parent
        extends: grand.yaml
        config:
          dtype: float16
          vocab_size: 100
        """,
    )
    child = write_profile(
        "child",
        """
        name: child
        extends: parent.yaml
        config:
          dtype: float32
        """,
    )
    return child, parent, grand


def test_extends_three_levels_child_wins(three_levels):
    child, _, _ = three_levels
    profile = load_profile(child)
    config = profile.model.config
    assert (config.dtype, config.vocab_size, config.head_dim) == ("float32", 100, 64)
    assert profile.model.placement.device == "cpu"
    assert profile.name == "child"
    assert profile.description == "grandparent"  # inherited, not reset
    assert [p.name for p in profile.chain] == ["child.yaml", "parent.yaml", "grand.yaml"]


def test_extends_origins_point_at_the_defining_file_and_line(three_levels):
    child, parent, grand = three_levels
    profile = load_profile(child)

    dtype = profile.origin("config", "dtype")
    assert Path(dtype.path).name == "child.yaml"
    assert dtype.line == line_of(child, "dtype")
    assert "extends" not in dtype.via

    vocab = profile.origin("config", "vocab_size")
    assert Path(vocab.path).name == "parent.yaml"
    assert vocab.line == line_of(parent, "vocab_size")
    assert "extends" in vocab.via

    head_dim = profile.origin("config", "head_dim")
    assert Path(head_dim.path).name == "grand.yaml"
    assert head_dim.line == line_of(grand, "head_dim")
    assert "extends" in head_dim.via
    assert re.search(r"grand\.yaml:\d+ \(extends", str(head_dim))

    device = profile.origin("placement", "device")
    assert Path(device.path).name == "grand.yaml"
    assert device.line == line_of(grand, "device: cpu")


def test_extends_by_name_through_a_registry(tmp_path, write_profile):
    folder = tmp_path / "named"
    write_profile("g", "config: {dtype: bfloat16, head_dim: 32}\n", folder)
    write_profile("p", "extends: g\nconfig: {head_dim: 16}\n", folder)
    write_profile("c", "extends: p\nconfig: {dtype: float32}\n", folder)
    profile = Registry([ProfileSource(folder, "test", 0)]).load("c")
    assert (profile.model.config.dtype, profile.model.config.head_dim) == ("float32", 16)
    assert Path(profile.origin("config", "head_dim").path).name == "p.yaml"
    assert profile.origin("config", "head_dim").via == "extends p"


def test_abstract_is_not_inherited(write_profile):
    write_profile("base", "abstract: true\nconfig: {dtype: float32}\n")
    child = write_profile("concrete", "extends: base.yaml\n")
    assert load_profile(child).model.abstract is False


def test_extends_cycle_is_reported_with_file_and_line(write_profile):
    a = write_profile("a", "name: a\nextends: b.yaml\n")
    write_profile("b", "name: b\n# loops back\nextends: a.yaml\n")
    with pytest.raises(ProfileError) as caught:
        load_profile(a)
    message = str(caught.value)
    assert "cycle" in message
    assert re.search(r"b\.yaml:3\b", message), message
    assert "a -> b -> a" in message


def test_extends_cycle_by_name(tmp_path, write_profile):
    folder = tmp_path / "cyc"
    write_profile("a", "extends: b\n", folder)
    write_profile("b", "extends: a\n", folder)
    with pytest.raises(ProfileError, match=r"cycle") as caught:
        Registry([ProfileSource(folder, "test", 0)]).load("a")
    assert re.search(r"b\.yaml:1\b", str(caught.value))


def test_extends_of_a_missing_profile_names_the_line(write_profile):
    path = write_profile("orphan", "name: orphan\nextends: nowhere.yaml\n")
    with pytest.raises(ProfileError, match=r"nowhere") as caught:
        load_profile(path)
    assert re.search(r"orphan\.yaml:2\b", str(caught.value))


# -- extends in bounded time ------------------------------------------------------------


def fan_out(folder: Path, levels: int, width: int = 10) -> list[str]:
    """``levels`` x ``width`` profiles, each extending every profile of the next level by name."""
    names = []
    for level in range(levels):
        for index in range(width):
            parents = [f"f{level + 1}-{j}" for j in range(width)] if level < levels - 1 else []
            text = f"description: level {level}\nconfig: {{head_dim: {2 * (level + 1)}}}\n"
            text += f"extends: [{', '.join(parents)}]\n" if parents else ""
            (folder / f"f{level}-{index}.yaml").write_text(text)
            names.append(f"f{level}-{index}")
    return names


@pytest.fixture
def counted_reads(monkeypatch):
    """Counts profile file reads; stops a runaway resolution instead of letting it run for hours."""
    reads: list[Path] = []
    real = profile_module.read_yaml_file

    def read(path, *args, **kwargs):
        reads.append(Path(path))
        if len(reads) > 5000:
            raise AssertionError("extends resolution is not bounded: 5000 file reads")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(profile_module, "read_yaml_file", read)
    return reads


def test_extends_fan_out_reads_each_file_once(tmp_path, counted_reads):
    """60 profiles, each extending the 10 of the next level: 10^5 paths, 51 files for the top one."""
    folder = tmp_path / "fan"
    folder.mkdir()
    names = fan_out(folder, 6)
    registry = Registry([ProfileSource(folder, "test", 0)])
    top = registry.load("f0-0")
    assert len(counted_reads) == 51 and len(set(counted_reads)) == 51
    assert len(top.chain) == 51 and top.model.config.head_dim == 2
    for name in names:  # list and validate load every name through one registry: no file read twice
        registry.load(name)
    assert len(counted_reads) == 60
    assert len(set(map(str, counted_reads))) == 60
    assert len(load_profile(folder / "f0-0.yaml", registry.resolve_extends).chain) == 51  # its own cache


def test_extends_fan_out_of_160_files_is_refused_quickly(tmp_path, counted_reads):
    """The red team's fan-out (16 levels of 10): the profiles that bring in too many files say so."""
    folder = tmp_path / "fan"
    folder.mkdir()
    names = fan_out(folder, 16)
    registry = Registry([ProfileSource(folder, "test", 0)])
    outcomes = {}
    for name in names:
        try:
            outcomes[name] = len(registry.load(name).chain)
        except ProfileError as exc:
            outcomes[name] = str(exc)
    assert len(counted_reads) <= 5 * len(names), len(counted_reads)  # failures are not cached: a few re-reads
    assert outcomes["f15-0"] == 1 and outcomes["f9-3"] == 61
    refused = outcomes["f0-0"]
    assert isinstance(refused, str)
    assert f"extends brings in more than {profile_module.MAX_EXTENDS_FILES} profile files" in refused
    assert re.search(r"f8-\d\.yaml:3\b", refused), refused  # the extends line that went past the bound
    assert all(isinstance(outcomes[f"f{level}-{i}"], str) for level in range(9) for i in range(10))


def test_extends_depth_is_the_same_whatever_was_loaded_before(tmp_path):
    """A file merged (and cached) at a shallow depth still counts its full depth when reached deeper."""
    folder = tmp_path / "deep"
    folder.mkdir()
    for index in range(19):
        (folder / f"d{index}.yaml").write_text(f"description: d\nextends: d{index + 1}\n" if index < 18 else "x: 1\n")
    (folder / "d18.yaml").write_text("description: the root\n")
    alone = Registry([ProfileSource(folder, "test", 0)])
    with pytest.raises(ProfileError, match="deeper than 16") as first:
        alone.load("d0")
    warmed = Registry([ProfileSource(folder, "test", 0)])
    warmed.load("d2")  # caches d2..d18 at depth 0
    with pytest.raises(ProfileError, match="deeper than 16") as second:
        warmed.load("d0")
    assert "d" in str(first.value) and "d" in str(second.value)


# -- name and file name ------------------------------------------------------------------


def test_name_must_match_the_file_name(write_profile):
    """list shows the file's name: a different name: would make list, show and apply disagree."""
    path = write_profile("foo", "description: x\nname: bar\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}:2: "), problem
    assert "name 'bar' differs from the file name 'foo.yaml'" in problem
    assert "rename the file to 'bar.yaml'" in problem
    assert load_profile(write_profile("same", "name: same\n")).name == "same"


def test_validation_error_takes_the_common_error_arguments():
    """Code that re-raises an error with context (runtime.Session) builds it as (message, where=, hint=)."""
    error = ProfileValidationError("GEMMA_PROFILE='x': bad", where="x.yaml:3", hint="fix it")
    assert str(error) == "x.yaml:3: GEMMA_PROFILE='x': bad (fix it)"
    assert [str(p) for p in error.problems] == ["x.yaml:3: GEMMA_PROFILE='x': bad (fix it)"]


# -- config values refused at validate time ----------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_hidden_layers", 2_000_000),
        ("max_position_embeddings", 2_000_000_000),
        ("hidden_size", 10_000_000),
        ("intermediate_size", 4_000_000_000),
        ("vocab_size", 3_000_000_000),
        ("num_attention_heads", 100_000),
        ("num_key_value_heads", 100_000),
        ("head_dim", 1_000_000),
        ("sliding_window_size", 10**12),
        ("query_pre_attn_scalar", 10**9),
    ],
)
def test_absurd_config_sizes_are_refused_with_field_line_and_limit(write_profile, field, value):
    path = write_profile("big", f"description: x\nconfig:\n  dtype: float32\n  {field}: {value}\n")
    problem = only_problem(path)
    limit, largest = schema.SIZE_LIMITS[field]
    assert problem.startswith(f"{path}:4: config.{field}: {value:,} is beyond any sane model"), problem
    assert f"the limit is {limit:,}" in problem and f"the largest Gemma has {largest:,}" in problem
    at_limit = write_profile("edge", f"config:\n  {field}: {limit}\n")
    assert problems_in(at_limit) == [] or field == "head_dim"


def test_size_limits_are_above_every_gemma_variant():
    from gemma_profiles.spec.variants import VARIANTS

    for field, (limit, largest) in schema.SIZE_LIMITS.items():
        values = [getattr(v, field) for v in VARIANTS.values() if isinstance(getattr(v, field, None), int)]
        assert not values or max(values) <= largest <= limit / 8, field


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("head_dim: 255", "255 is odd"),
        ("tokenizer: ''", "config.tokenizer: is empty"),
        ('tokenizer: "a\\0b"', "control character"),
        ("tokenizer: 42", "valid string"),
        ("tokenizer: [a, b]", "valid string"),
        ("tokenizer: ~/tokenizer.model", "does not expand"),
        ("tokenizer: /models/", "not a folder"),
        ("attn_types: []", "at least 1 item"),
        ("attn_types: [GLOBAL, SLIDING]", "LOCAL_SLIDING"),
        ("architecture: GEMMA_4", "'GEMMA_1', 'GEMMA_2' or 'GEMMA_3'"),
        ("architecture: 2", "'GEMMA_1', 'GEMMA_2' or 'GEMMA_3'"),
        ("architecture: gemma_2", "'GEMMA_1', 'GEMMA_2' or 'GEMMA_3'"),
    ],
)
def test_tokenizer_architecture_and_shape_values_are_checked_at_their_line(write_profile, body, needle):
    path = write_profile("p", f"description: x\nconfig:\n  {body}\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}:3: "), problem
    assert needle in problem


def test_a_plain_tokenizer_path_is_accepted(write_profile):
    path = write_profile("p", "config: {tokenizer: tokenizer/tokenizer.model}\n")
    assert load_profile(path).model.config.tokenizer == "tokenizer/tokenizer.model"


def test_architecture_names_are_gemmas_own(gemma):
    """The schema's architecture names are the members of this gemma's Architecture enum."""
    import typing

    names = set(typing.get_args(schema.ArchitectureName))
    assert names == {member.name for member in gemma.config.Architecture}


# -- problems: file:line and did-you-mean ----------------------------------------------


def test_unknown_top_level_key(write_profile):
    path = write_profile("p", "name: p\nhardwre: {device: cpu}\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}:2: ")
    assert "hardwre" in problem
    assert "did you mean 'hardware'" in problem


def test_unknown_placement_key(write_profile):
    path = write_profile("p", "name: p\nplacement:\n  device: cpu\n  max_memroy: {cpu: 1GB}\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}:4: ")
    assert "did you mean 'max_memory'" in problem


def test_misspelt_gemma_config_field_lists_valid_fields(write_profile):
    path = write_profile("p", "name: p\nconfig:\n  dtpye: float16\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}:3: ")
    assert "GemmaConfig" in problem
    assert "did you mean 'dtype'" in problem
    listed = problem.split("valid fields:", 1)[1]
    for name in schema.GemmaConfigOverrides.model_fields:
        assert name in listed


def test_problem_inside_a_variant_names_its_line(write_profile):
    path = write_profile("p", "name: p\nvariants:\n  9b:\n    config:\n      dtpye: float32\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}:5: ")
    assert "did you mean 'dtype'" in problem


@pytest.mark.parametrize(
    ("body", "line", "needles"),
    [
        ("config:\n  dtype: float8\n", 3, ["config.dtype", "float8", "bfloat16"]),
        ('placement:\n  max_memory: {"cuda:0": 12GBs}\n', 3, ["12GBs", "4.5GiB"]),
        ("placement:\n  max_memory: {gpu: 1GB}\n", 3, ["'gpu'", "cuda:N"]),
        ("placement:\n  device: gpu\n", 3, ["'gpu'", "cuda:N"]),
        ("hardware:\n  device: gpu\n", 3, ["hardware.device", "gpu"]),
        ("variants:\n  7B: {config: {dtype: float32}}\n", 3, ["7B", "did you mean '7b'"]),
        ("config:\n  vision_config: {}\n", 3, ["vision_config", "cannot be set"]),
        ("quantization:\n  weights: int4\n", 3, ["quantization.weights", "int4"]),
        ('config:\n  quant: "yes"\n', 3, ["config.quant"]),
    ],
    ids=[
        "dtype",
        "max_memory-value",
        "max_memory-key",
        "placement-device",
        "hardware-device",
        "variant",
        "vision",
        "quant-weights",
        "quant-type",
    ],
)
def test_bad_values_are_reported_at_their_line(write_profile, body, line, needles):
    path = write_profile("p", "name: p\n" + body)
    problem = only_problem(path)
    assert problem.startswith(f"{path}:{line}: "), problem
    for needle in needles:
        assert needle in problem


def test_all_problems_are_reported_in_line_order(write_profile):
    path = write_profile(
        "many",
        """
        name: many
        hardwre: {device: cpu}
        config:
          dtpye: float16
        placement:
          device: gpu
        """,
    )
    problems = problems_in(path)
    lines = [int(p.where.rsplit(":", 1)[1]) for p in problems]
    assert lines == [2, 4, 6]
    with pytest.raises(ProfileValidationError) as caught:
        load_profile(path)
    assert len(caught.value.problems) == 3
    assert "2 more problem(s)" in str(caught.value)


def test_invalid_yaml_names_the_line(write_profile):
    path = write_profile("p", "name: p\nconfig: [unclosed\n")
    problem = only_problem(path)
    assert re.match(rf"{re.escape(str(path))}:\d+: invalid YAML", problem)


def test_duplicate_key_is_refused(write_profile):
    path = write_profile("p", "name: p\nconfig: {dtype: float16}\nconfig: {dtype: float32}\n")
    assert "duplicate key 'config'" in only_problem(path)


# -- hostile or broken files -------------------------------------------------------------


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: latin1\ndescription: caf\xe9\n")
    with pytest.raises(ProfileError, match="UTF-8") as caught:
        load_profile(path)
    assert f"{path}:2" in str(caught.value)


def test_python_object_tag_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: evil\ndescription: !!python/object/apply:os.system [\"touch '{marker}'\"]\n")
    with pytest.raises(ProfileError, match="not allowed") as caught:
        load_profile(path)
    assert f"{path}:2" in str(caught.value)
    assert not marker.exists()


def test_python_tag_on_a_scalar_is_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/name:os.system x\n")
    with pytest.raises(ProfileError, match="not allowed"):
        load_profile(path)


def test_billion_laughs_is_refused_quickly(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ProfileError, match="alias bomb"):
        load_profile(path)
    assert time.perf_counter() - start < 1.0


def test_file_larger_than_the_limit_is_refused(tmp_path):
    head = "name: big\n# "
    path = tmp_path / "big.yaml"
    path.write_text(head + "x" * (yamlio.MAX_FILE_BYTES + 1 - len(head)))
    assert path.stat().st_size == yamlio.MAX_FILE_BYTES + 1
    with pytest.raises(ProfileError, match="larger than"):
        load_profile(path)


def test_file_at_the_limit_is_accepted(tmp_path):
    head = "name: big\n# "
    path = tmp_path / "big.yaml"
    path.write_text(head + "x" * (yamlio.MAX_FILE_BYTES - len(head)))
    assert path.stat().st_size == yamlio.MAX_FILE_BYTES
    assert load_profile(path).name == "big"


def test_deep_nesting_is_refused(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("description: " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(ProfileError, match="deep"):
        load_profile(path)


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ProfileError, match="empty") as caught:
        load_profile(path)
    assert str(path) in str(caught.value)


def test_top_level_list_is_a_clear_error(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- name: x\n- name: y\n")
    with pytest.raises(ProfileError, match="must be a mapping") as caught:
        load_profile(path)
    assert f"{path}:1" in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "absent.yaml")


# -- variant overrides ----------------------------------------------------------------------


@pytest.fixture
def layered(write_profile):
    return write_profile(
        "layered",
        """
        name: layered
        config: {dtype: float16, head_dim: 8}
        quantization: {weights: none}
        variants:
          gemma2:
            config: {dtype: float32, head_dim: 16}
          9b:
            config: {dtype: bfloat16}
            quantization: {weights: int8}
        """,
    )


def test_resolve_applies_family_then_variant(layered):
    profile = load_profile(layered)
    resolved = profile.resolve("9b")
    assert resolved.applied_overrides == ("gemma2", "9b")
    assert resolved.model.config.dtype == "bfloat16"  # variant beats family
    assert resolved.model.config.head_dim == 16  # family beats the base
    assert resolved.model.quantization.weights == "int8"

    dtype = resolved.origin("config", "dtype")
    assert dtype.via == "variants.9b"
    assert dtype.line == line_of(layered, "dtype: bfloat16")
    head_dim = resolved.origin("config", "head_dim")
    assert head_dim.via == "variants.gemma2"
    assert head_dim.line == line_of(layered, "head_dim: 16")
    assert resolved.origin("quantization", "weights").via == "variants.9b"

    # the unresolved profile is unchanged
    assert profile.model.config.dtype == "float16"
    assert profile.origin("config", "dtype").via == ""


def test_resolve_family_only_and_no_override(layered):
    profile = load_profile(layered)
    two_b_v2 = profile.resolve("2b-v2")
    assert two_b_v2.applied_overrides == ("gemma2",)
    assert two_b_v2.model.config.dtype == "float32"
    two_b = profile.resolve("2b")
    assert two_b.applied_overrides == ()
    assert (two_b.model.config.dtype, two_b.model.config.head_dim) == ("float16", 8)


def test_resolve_with_family_but_no_variant(layered):
    resolved = load_profile(layered).resolve(None, "gemma2")
    assert resolved.applied_overrides == ("gemma2",)
    assert resolved.model.config.dtype == "float32"


# -- plan ----------------------------------------------------------------------------------


def test_plan_sets_quant_only_when_quantization_is_explicit(write_profile):
    silent = load_profile(write_profile("silent", "config: {dtype: float32}\n"))
    assert "quant" not in make_plan(silent, "2b").config

    int8 = load_profile(write_profile("int8", "quantization: {weights: int8}\n"))
    setting = make_plan(int8, "2b").config["quant"]
    assert setting.value is True
    assert re.search(r"int8\.yaml:1\b", setting.origin)
    assert make_plan(int8, "2b").quantization == "int8"

    none = load_profile(write_profile("none", "quantization: {weights: none}\n"))
    assert make_plan(none, "2b").config["quant"].value is False


def test_plan_explicit_quantization_wins_over_the_automatic_choice(write_profile):
    machine = "hardware: {device: cpu, host_memory: 5.1GiB}\nplacement: {device: cpu}\nconfig: {dtype: bfloat16}\n"
    # 2b needs 4.81 GiB in bfloat16 and 4.43 GiB in int8 (gemma's CPU dequantization
    # holds two bf16 copies of the embedder); the budget is 5.1 GiB - 512 MiB = 4.6 GiB.
    automatic = make_plan(load_profile(write_profile("auto", machine)), "2b")
    assert automatic.config["quant"].value is True
    assert automatic.config["quant"].origin.startswith("auto:")
    explicit = load_profile(write_profile("explicit", machine + "quantization: {weights: none}\n"))
    plan = make_plan(explicit, "2b")
    assert plan.config["quant"].value is False
    assert plan.quantization == "none"
    assert re.search(r"explicit\.yaml:4\b", plan.config["quant"].origin)


def test_plan_quant_from_a_variant(layered):
    profile = load_profile(layered)
    assert make_plan(profile, "9b").config["quant"].value is True
    assert "variants.9b" in make_plan(profile, "9b").config["quant"].origin
    assert make_plan(profile, "2b").config["quant"].value is False


@pytest.mark.parametrize(
    ("variant", "model"),
    [("9b", "Gemma 2"), ("2b-v2", "Gemma 2"), ("1b", "Gemma 3"), ("27b_v3", "Gemma 3"), ("7b", "Gemma 1 7b")],
)
def test_plan_refuses_float16_for_models_it_overflows(write_profile, variant, model):
    """Explicit float16 for Gemma 2/3 (and 7b) returns empty text on a real model: refused, not warned about."""
    path = write_profile("fp16", "description: x\nconfig: {dtype: float16}\n")
    profile = load_profile(path)
    assert make_plan(profile, "2b").dtype == "float16"  # Gemma 1 2b: float16 is fine
    with pytest.raises(GemmaProfileError) as caught:
        make_plan(profile, variant)
    message = str(caught.value)
    assert f"float16 compute overflows for {model} " in message
    assert f"{path}:2:" in message and "'fp16'" in message
    assert "float32" in message and "int8" in message and "bfloat16" in message
    assert "allow_float16_overflow" in message


def test_plan_float16_for_gemma3_by_architecture_override(write_profile):
    """A config rewritten to Gemma 3 is held to Gemma 3's rules, whatever variant it started from."""
    profile = load_profile(write_profile("arch", "config: {dtype: float16, architecture: GEMMA_3}\n"))
    with pytest.raises(GemmaProfileError, match="overflows for Gemma 3"):
        make_plan(profile, "2b")


def test_plan_keeps_float16_when_the_profile_allows_the_overflow(write_profile):
    path = write_profile(
        "fp16-on-purpose",
        "config: {dtype: float16}\nvariants:\n  gemma3: {compute: {allow_float16_overflow: true}}\n",
    )
    profile = load_profile(path)
    plan = make_plan(profile, "1b")
    assert plan.dtype == "float16"
    assert len(plan.warnings) == 1 and "Gemma 3" in plan.warnings[0] and "allow_float16_overflow" in plan.warnings[0]
    assert make_plan(profile, "2b").warnings == ()
    with pytest.raises(GemmaProfileError, match="overflows for Gemma 2"):  # allowed for Gemma 3 only
        make_plan(profile, "9b")


def test_allow_float16_overflow_must_be_a_boolean(write_profile):
    path = write_profile("p", "compute:\n  allow_float16_overflow: yes please\n")
    problem = only_problem(path)
    assert problem.startswith(f"{path}:2: ") and "compute.allow_float16_overflow" in problem
    path = write_profile("q", "compute:\n  allow_float16: true\n")
    assert "did you mean 'allow_float16_overflow'" in only_problem(path)


def test_plan_has_no_warning_when_the_family_override_fixes_dtype(layered):
    plan = make_plan(load_profile(layered), "2b-v2")
    assert plan.dtype == "float32"
    assert plan.warnings == ()


# -- units -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4.5GiB", int(4.5 * 2**30)),
        ("500MB", 500 * 10**6),
        ("16GB", 16 * 10**9),
        ("12 GB", 12 * 10**9),
        ("1kib", 1024),
        ("100", 100),
        (0, 0),
        (123456, 123456),
        ("1TiB", 2**40),
    ],
)
def test_parse_memory_accepts(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize(
    "text",
    ["4.5 GiBs", "12GBs", "-1GB", "", "GiB", "1.2.3GB", "4,5GiB", "1PiB", "1025TiB", -1, 2**50 + 1, True, False],
)
def test_parse_memory_rejects(text):
    with pytest.raises(ValueError):
        parse_memory(text)


def test_parse_memory_bound_is_one_pib():
    assert parse_memory(MAX_BYTES) == 2**50
    assert parse_memory("1024TiB") == 2**50
    with pytest.raises(ValueError, match="out of range"):
        parse_memory("1024.001TiB")


_MULTIPLIERS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


@given(number=st.integers(min_value=0, max_value=999_999), unit=st.sampled_from(sorted(_MULTIPLIERS)))
def test_parse_memory_integer_sizes(number, unit):
    assert parse_memory(f"{number}{unit}") == number * _MULTIPLIERS[unit]
    assert parse_memory(f" {number} {unit.lower()} ") == number * _MULTIPLIERS[unit]
