"""Profile loading: YAML -> validated `Profile`, extends, variant overrides, problems with file:line."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gemma_profiles import schema, yamlio
from gemma_profiles.errors import ProfileError
from gemma_profiles.plan import make_plan
from gemma_profiles.profile import ProfileValidationError, load_profile, problems_in
from gemma_profiles.registry import Registry
from gemma_profiles.types import ProfileSource
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


def test_plan_warns_for_float16_with_gemma2(write_profile):
    profile = load_profile(write_profile("fp16", "config: {dtype: float16}\n"))
    plan = make_plan(profile, "9b")
    assert plan.family == "gemma2"
    assert plan.dtype == "float16"
    assert len(plan.warnings) == 1
    assert "float16" in plan.warnings[0]
    assert "9b" in plan.warnings[0]
    assert make_plan(profile, "2b").warnings == ()
    assert make_plan(profile, "7b").warnings  # Gemma 1 7b gave NaN in fp16 too


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
