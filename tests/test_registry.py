"""Registry: precedence between sources, override logging, paths as names, not-found errors."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from gemma_profiles.hooks.sources import bundled_dir

from gemma_profiles.errors import GemmaProfileError, ProfileNotFoundError
from gemma_profiles.plugin.types import ProfileSource
from gemma_profiles.spec.profile import problems_in
from gemma_profiles.spec.registry import Registry, default_registry


@pytest.fixture
def user_dir(isolated_env: Path) -> Path:
    folder = Path(os.environ["GEMMA_PROFILE_USER_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def t4_variant(label: str) -> str:
    return f"""
    description: {label}
    extends: base-cuda
    hardware: {{device: cuda, compute_capability: "7.5"}}
    config: {{dtype: float32}}
    """


def test_bundled_profile_is_found_by_name():
    registry = default_registry()
    assert registry.find("t4").resolve() == (bundled_dir() / "t4.yaml").resolve()
    assert registry.index()["t4"].source.label == "bundled"
    assert {"t4", "pascal-5gb", "cpu-32gb"} <= set(registry.names())
    assert registry.names() == sorted(registry.names())


def test_user_dir_overrides_bundled(user_dir, write_profile, log_messages):
    mine = write_profile("t4", t4_variant("user t4"), user_dir)
    registry = default_registry()
    entry = registry.index()["t4"]
    assert entry.path == mine
    assert entry.source.label == "user"
    assert [shadowed.source.label for shadowed in entry.shadows] == ["bundled"]
    profile = registry.load("t4")
    assert profile.description == "user t4"
    # extends by name still reaches the bundled base
    assert profile.model.placement.device == "cuda"
    logged = [m for m in log_messages if "overrides" in m]
    assert len(logged) == 1
    assert "'t4'" in logged[0]
    assert str(mine) in logged[0]
    assert "user" in logged[0]
    assert "bundled" in logged[0]


def test_profile_path_overrides_user_dir_leftmost_wins(tmp_path, user_dir, write_profile, monkeypatch, log_messages):
    write_profile("t4", t4_variant("user t4"), user_dir)
    left = write_profile("t4", t4_variant("left t4"), tmp_path / "left")
    right = write_profile("t4", t4_variant("right t4"), tmp_path / "right")
    write_profile("only-right", t4_variant("only in right"), tmp_path / "right")
    monkeypatch.setenv("GEMMA_PROFILE_PATH", os.pathsep.join([str(left.parent), str(right.parent)]))

    registry = default_registry()
    assert registry.find("t4") == left
    assert registry.load("t4").description == "left t4"
    assert registry.load("only-right").description == "only in right"
    entry = registry.index()["t4"]
    assert entry.source.label == "GEMMA_PROFILE_PATH"
    assert [s.path for s in entry.shadows] == [bundled_dir() / "t4.yaml", user_dir / "t4.yaml", right]

    logged = [m for m in log_messages if "overrides" in m and "'t4'" in m]
    assert len(logged) == 3  # user over bundled, right over user, left over right
    assert str(left) in logged[-1]
    assert str(right) in logged[-1]
    assert all(m.startswith("INFO") for m in logged)


def test_profile_path_order_reversed(tmp_path, write_profile, monkeypatch):
    left = write_profile("t4", t4_variant("left t4"), tmp_path / "left")
    right = write_profile("t4", t4_variant("right t4"), tmp_path / "right")
    monkeypatch.setenv("GEMMA_PROFILE_PATH", os.pathsep.join([str(right.parent), str(left.parent)]))
    assert default_registry().find("t4") == right


def test_profile_path_may_name_a_single_file(tmp_path, write_profile, monkeypatch):
    single = write_profile("lonely", t4_variant("one file"), tmp_path / "files")
    monkeypatch.setenv("GEMMA_PROFILE_PATH", str(single))
    assert default_registry().find("lonely") == single


def test_missing_profile_path_entries_are_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_PROFILE_PATH", os.pathsep.join([str(tmp_path / "nope"), ""]))
    assert "t4" in default_registry().names()


def test_no_override_is_logged_without_a_clash(log_messages):
    default_registry().index()
    assert not [m for m in log_messages if "overrides" in m]


def test_precedence_follows_the_number_not_the_order(tmp_path, write_profile):
    low = write_profile("same", "description: low\n", tmp_path / "low")
    high = write_profile("same", "description: high\n", tmp_path / "high")
    registry = Registry([ProfileSource(high.parent, "high", 5), ProfileSource(low.parent, "low", 1)])
    assert registry.find("same") == high


# -- a path works wherever a name does ---------------------------------------------------


def test_absolute_path_works_like_a_name(tmp_path, write_profile):
    path = write_profile("elsewhere", t4_variant("by path"), tmp_path / "x")
    registry = default_registry()
    assert "elsewhere" not in registry.names()
    assert registry.find(str(path)) == path
    profile = registry.load(str(path))
    assert profile.name == "elsewhere"
    assert profile.description == "by path"
    assert profile.model.placement.device == "cuda"  # extends by name from a file outside the registry


def test_relative_yaml_file_name_works(tmp_path, write_profile, monkeypatch):
    write_profile("here", "description: relative\n", tmp_path / "cwd")
    monkeypatch.chdir(tmp_path / "cwd")
    assert default_registry().load("here.yaml").description == "relative"


def test_home_relative_path_works(tmp_path, write_profile, monkeypatch):
    write_profile("homely", "description: at home\n", tmp_path / "home")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_registry().load("~/homely.yaml").description == "at home"


def test_extends_by_relative_path(tmp_path, write_profile):
    write_profile("parent", "config: {dtype: float32, head_dim: 8}\n", tmp_path / "x" / "bases")
    child = write_profile("child", "extends: bases/parent.yaml\nconfig: {head_dim: 4}\n", tmp_path / "x")
    profile = default_registry().load(str(child))
    assert (profile.model.config.dtype, profile.model.config.head_dim) == ("float32", 4)


def test_missing_path_is_not_found(tmp_path):
    with pytest.raises(ProfileNotFoundError, match="does not exist"):
        default_registry().find(str(tmp_path / "absent.yaml"))


# -- not found ------------------------------------------------------------------------------


def test_unknown_name_suggests_and_lists():
    with pytest.raises(ProfileNotFoundError) as caught:
        default_registry().find("pascal-5g")
    message = str(caught.value)
    assert "no profile named 'pascal-5g'" in message
    assert "did you mean 'pascal-5gb'" in message
    available = message.split("available:", 1)[1]
    for name in ("t4", "cpu-32gb", "pascal-5gb", "h100-80gb"):
        assert name in available
    assert "\n" not in message


def test_unknown_name_far_from_everything_has_no_suggestion():
    with pytest.raises(ProfileNotFoundError) as caught:
        default_registry().load("zzzzzzzz")
    assert "did you mean" not in str(caught.value)
    assert "available:" in str(caught.value)


def test_unknown_name_with_no_sources():
    with pytest.raises(ProfileNotFoundError, match="available: none"):
        Registry([]).find("t4")


def test_extends_of_an_unknown_name_suggests(write_profile):
    path = write_profile("child", "extends: base-cudaa\n")
    with pytest.raises(GemmaProfileError) as caught:
        default_registry().load(str(path))
    assert "did you mean 'base-cuda'" in str(caught.value)


@pytest.mark.parametrize("reference", ["base-cudaa", "missing/parent.yaml"])
def test_extends_of_a_missing_profile_names_file_and_line(write_profile, reference):
    path = write_profile("child", f"description: x\nextends: {reference}\n")
    with pytest.raises(GemmaProfileError) as caught:
        default_registry().load(str(path))
    assert f"{path}:2" in str(caught.value)


def test_problems_in_reports_a_missing_extends_through_the_registry(write_profile):
    path = write_profile("child", "description: x\nextends: base-cudaa\n")
    problems = problems_in(path, default_registry().resolve_extends)
    assert [p.where for p in problems] == [f"{path}:2"]


# -- names and paths that are no profile (issue 13 item 11, issue 14 section 3 item 7) ----------------


def test_concrete_names_leave_out_abstract_bases(tmp_path, write_profile):
    write_profile("my-base", "description: b\nabstract: true\n", tmp_path)
    write_profile("my-box", "description: c\nextends: my-base\n", tmp_path)
    write_profile("broken", "description: [unclosed\n", tmp_path)  # unreadable: stays listed
    registry = Registry([ProfileSource(tmp_path, "t")])
    assert registry.names() == ["broken", "my-base", "my-box"]
    assert registry.concrete_names() == ["broken", "my-box"]
    with pytest.raises(ProfileNotFoundError) as caught:
        registry.find("my-bx")
    assert "(did you mean 'my-box'?)" in str(caught.value)
    assert "available: broken, my-box, and auto (built from this machine's detected hardware);" in str(caught.value)


@pytest.mark.parametrize("name", ["notes.txt", "config", "data.json"])
def test_a_path_that_is_no_profile_file_is_refused_unread(tmp_path, name):
    path = tmp_path / name
    path.write_text("secret: do-not-print-me\n", encoding="utf-8")
    with pytest.raises(GemmaProfileError) as caught:
        default_registry().load(str(path))
    message = str(caught.value)
    assert "is not a profile file: profile files are named *.yaml or *.yml" in message
    assert "do-not-print-me" not in message


def test_a_yml_file_is_a_profile_file(tmp_path, write_profile):
    path = tmp_path / "short.yml"
    path.write_text("description: yml\n", encoding="utf-8")
    assert default_registry().load(str(path)).description == "yml"


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("~nosuchuser-gp/p.yaml", "cannot be found: there is no user 'nosuchuser-gp' here"),
        ("/tmp/" + "n" * 300 + ".yaml", "cannot be looked up: File name too long"),
        ("/tmp/nul\x00.yaml", "is not a usable file name"),
    ],
    ids=["unknown-user", "too-long", "nul"],
)
def test_a_path_that_cannot_be_looked_up_says_why(reference, expected):
    with pytest.raises(ProfileNotFoundError) as caught:
        default_registry().find(reference)
    assert expected in str(caught.value)


def test_a_source_that_cannot_be_listed_is_skipped_with_one_warning(log_messages):
    from gemma_profiles.spec import registry as registry_module

    registry_module._unreadable.clear()
    too_long = Path("/tmp") / ("n" * 300)
    registry = Registry([ProfileSource(too_long, "GEMMA_PROFILE_PATH", 30), *default_registry().sources])
    assert "t4" in registry.names()
    Registry([ProfileSource(too_long, "GEMMA_PROFILE_PATH", 30)]).names()  # said once per process
    warnings = [m for m in log_messages if m.startswith("WARNING")]
    assert len(warnings) == 1, warnings
    assert "(GEMMA_PROFILE_PATH) are skipped: File name too long" in warnings[0]


@pytest.fixture
def short_tmp_path() -> Iterator[Path]:
    """A temp folder with a short path: a long one is shown elided in the warnings (pytest-xdist's
    workers add ``popen-gwN/`` to ``tmp_path``)."""
    folder = Path(tempfile.mkdtemp(prefix="gp-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_source_that_is_neither_folder_nor_profile_file_is_skipped_with_one_warning(short_tmp_path, log_messages):
    from gemma_profiles.spec import registry as registry_module

    tmp_path = short_tmp_path
    registry_module._unreadable.clear()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a profile\n", encoding="utf-8")
    sources = [ProfileSource(p, "GEMMA_PROFILE_PATH", 30) for p in (fifo, notes, tmp_path / "not-there")]
    assert Registry(sources).names() == []  # the FIFO is never opened: this would block otherwise
    warnings = sorted(m for m in log_messages if m.startswith("WARNING"))
    assert len(warnings) == 2, warnings  # a folder that does not exist is no profiles, without a word
    assert "fifo' (GEMMA_PROFILE_PATH) are skipped: neither a folder nor a regular file" in warnings[0]
    assert "notes.txt' (GEMMA_PROFILE_PATH) are skipped: a file not named *.yaml or *.yml" in warnings[1]
