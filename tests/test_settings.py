"""One place for the ``GEMMA_PROFILE*`` variables (issue 16, item 4): `gemma_profiles.settings`.

The code reads no variable settings does not declare, docs/settings.md shows the table
settings makes, every switch follows one on/off rule, the ``.pth`` module's copy of the
profile's off words agrees with the package's, and the test fixture clears every variable.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import gemma_profiles_autoload as autoload
from gemma_profiles import settings

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    *sorted((ROOT / "gemma_profiles").rglob("*.py")),
    *sorted((ROOT / "hooks").rglob("*.py")),
    ROOT / "gemma_profiles_autoload.py",
]
NAME = re.compile(r"\bGEMMA_PROFILE(?:_[A-Z][A-Z0-9_]*[A-Z0-9])?\b")
#: The variables the fixture sets itself (to folders of the test's own).
SET_BY_FIXTURE = {settings.STATE_DIR.name, settings.USER_DIR.name}


def test_every_variable_the_code_names_is_declared():
    declared = {variable.name for variable in settings.VARIABLES}
    named = {
        (name, path.relative_to(ROOT).as_posix())
        for path in SOURCES
        for name in NAME.findall(path.read_text(encoding="utf-8"))
    }
    undeclared = sorted(f"{name} in {where}" for name, where in named if name not in declared)
    assert not undeclared, f"declare these in gemma_profiles/settings.py: {undeclared}"


def test_each_variable_has_a_line_of_its_own():
    names = [variable.name for variable in settings.VARIABLES]
    assert len(names) == len(set(names))
    for variable in settings.VARIABLES:
        assert variable.name.startswith("GEMMA_PROFILE"), variable
        assert variable.takes and variable.default and variable.doc, variable
        assert "|" not in variable.takes + variable.default + variable.doc, "it would break the table"


def test_the_docs_table_is_the_settings_table():
    page = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- settings table[^>]*-->\n(.*?)<!-- end of settings table -->", page, re.S)
    assert match, "docs/settings.md lost its table markers"
    assert match.group(1) == settings.markdown_table(), (
        "docs/settings.md is out of date: paste `python -m gemma_profiles.settings` between the markers"
    )


@pytest.mark.parametrize(
    ("value", "default", "expected"),
    [
        ("0", True, False),
        (" OFF ", True, False),
        ("False", True, False),
        ("no", True, False),
        ("1", False, True),
        ("TRUE", False, True),
        (" yes", False, True),
        ("on", False, True),
        ("", True, True),
        ("", False, False),
        ("maybe", True, True),
        ("maybe", False, False),
        ("\x1b[31m 0 \u202e", True, True),
        ("none", True, True),  # a profile's off word, not a switch's
    ],
)
def test_one_on_off_rule(value, default, expected):
    assert settings.parse_switch(value, default) is expected


@pytest.mark.parametrize("variable", [settings.NATIVE, settings.HUGEPAGES, settings.OFFLOAD_STREAM_CPU])
def test_switches_read_the_environment(variable, monkeypatch):
    default = variable.default == "on"
    assert settings.switch(variable) is default
    monkeypatch.setenv(variable.name, "off" if default else "on")
    assert settings.switch(variable) is not default
    monkeypatch.setenv(variable.name, "junk")
    assert settings.switch(variable) is default


def test_a_variable_that_is_no_switch_is_refused():
    with pytest.raises(ValueError, match="GEMMA_PROFILE_PATH is not a switch"):
        settings.switch(settings.PATH)


def test_the_autoload_keeps_the_same_off_words():
    """The .pth module cannot import the package at interpreter start; its copy must agree."""
    assert settings.PROFILE.name == autoload.ENV_VAR
    assert settings.STATE_DIR.name == autoload.STATE_DIR_ENV
    assert set(autoload.OFF_VALUES) == set(settings.PROFILE_OFF_WORDS)


@pytest.mark.parametrize("value", ["off", "OFF", " none ", "0", "false", "No", "t4", "auto", "offf", "1", "on"])
def test_the_autoload_and_the_package_agree_on_gemma_profile(value, monkeypatch):
    monkeypatch.setenv(settings.PROFILE.name, value)
    assert autoload.wanted() is not settings.profile_off(value)


def test_the_fixture_clears_every_variable():
    """Run inside the isolation fixture: nothing from the caller's environment is left."""
    left = {v.name: os.environ[v.name] for v in settings.VARIABLES if v.name in os.environ}
    assert set(left) <= SET_BY_FIXTURE, left
    for name in SET_BY_FIXTURE:
        assert "gemma-profiles-outer" not in left[name]


def test_the_fixture_clears_variables_set_by_the_caller(tmp_path):
    """The same check in a pytest run whose environment sets every variable to a value of its own."""
    env = dict(os.environ)
    env.update({v.name: f"/tmp/gemma-profiles-outer/{v.name}" for v in settings.VARIABLES})
    env["GEMMA_PROFILE_LOG"] = "ERROR"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{__file__}::test_the_fixture_clears_every_variable",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


# -- the .pth module's copies of the package's facts (it may import nothing of ours at start) ------


def test_the_autoload_finds_the_state_file_the_runtime_reads(monkeypatch, tmp_path):
    from gemma_profiles.errors import StateError
    from gemma_profiles.runtime import state

    monkeypatch.setenv("HOME", str(tmp_path))
    values = ["", "   ", "/abs/olute", "/a/./b//c/../d", "~", "~/a/../st", "relative", "./x", "~nosuchuser-gp/x"]
    values += ["\u202e/x", "/tmp/\x1b[2J", "~root/x", "//double"]  # (a NUL cannot be in the environment)
    for value in values:
        monkeypatch.setenv(settings.STATE_DIR.name, value)
        found = autoload.state_file()
        try:
            expected = str(state.state_path())
        except StateError:
            assert found is None, value
        else:
            assert found == expected, value
    assert state.STATE_FILE_NAME == autoload.STATE_FILE_NAME


def test_the_autoload_arms_on_the_runtimes_modules_and_is_known_by_its_mark():
    from gemma_profiles.runtime import session

    assert autoload.PATCHED_MODULES == session.PATCHED_MODULES
    assert autoload.ARM_ON == session.ARM_ON
    assert getattr(autoload.ArmOnGemmaImport, session.ARMING_FINDER) is True
    finder = autoload.ArmOnGemmaImport()
    sys.meta_path.insert(0, finder)
    try:
        assert session.arming_pending() and autoload.pending()
        session.deactivate()  # the program chose: the environment's choice is not armed later
        assert finder not in sys.meta_path and not autoload.pending()
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)


def test_the_patched_modules_are_the_patchs_targets():
    source = (ROOT / "gemma_profiles" / "runtime" / "patch.py").read_text(encoding="utf-8")
    match = re.search(r"^TARGETS = (\{.*\})$", source, re.M)
    assert match, "runtime/patch.py lost its TARGETS"
    from gemma_profiles.runtime import session

    assert tuple(eval(match.group(1))) == session.PATCHED_MODULES  # patch imports torch; read, not imported


def test_without_the_pth_importing_the_runtime_arms_the_environments_choice(tmp_path):
    """``python -S`` (no .pth ran): importing the session decides what the .pth would have."""
    env = dict(os.environ, GEMMA_PROFILE="cpu-fp32", GEMMA_PROFILE_STATE_DIR=str(tmp_path))
    code = (
        "import sys; assert 'gemma_profiles_autoload' not in sys.modules; "
        "sys.path[:0] = [p for p in __import__('json').loads(sys.argv[1])]; "
        "from gemma_profiles.runtime import session; s = session.current(); "
        "print(s.reference if s else None, 'gemma_profiles_autoload' in sys.modules)"
    )
    import json

    completed = subprocess.run(
        [sys.executable, "-S", "-c", code, json.dumps(sys.path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["cpu-fp32", "False"]
