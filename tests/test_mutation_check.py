"""benchmarks/mutation_check.py: every mutation's text is in its file, once (a stale snippet
made a mutation silently test nothing: "int8 lookup x1.05" outlived the code it broke)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "mutation_check.py"


def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutation_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_mutation_targets_text_that_is_there_once() -> None:
    checker = script()
    assert checker.stale(checker.MUTATIONS) == []
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_a_stale_mutation_is_named_in_one_line(tmp_path: Path) -> None:
    checker = script()
    (tmp_path / "code.py").write_text("x = 1\nx = 1\n")
    (tmp_path / "test_code.py").write_text("")
    mutations = [
        checker.Mutation("gone", "code.py", "y = 2", "y = 3", ("test_code.py",), "moved"),
        checker.Mutation("twice", "code.py", "x = 1", "x = 2", ("test_code.py::test_x",), "ambiguous"),
        checker.Mutation("no tests", "code.py", "x = 1\nx = 1", "", ("test_missing.py",), "renamed"),
    ]
    problems = checker.stale(mutations, tmp_path)
    assert problems == [
        "stale mutation 'gone': its text occurs 0 times in code.py, expected once; "
        "update the snippet in benchmarks/mutation_check.py",
        "stale mutation 'twice': its text occurs 2 times in code.py, expected once; "
        "update the snippet in benchmarks/mutation_check.py",
        "stale mutation 'no tests': no test file test_missing.py",
    ]
