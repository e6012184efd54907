"""Every bad input a user can give gets one line: what, where, what to do - no traceback.

The README table "What you see when something is wrong" is this file's list.
Inputs tested elsewhere are not repeated here: a bad ``GEMMA_PROFILE`` value
(test_integration, test_cli), an ``extends`` cycle and hostile YAML
(test_profile), a plugin raising in a hook and the checkpoint path missing
(test_integration), bfloat16 on an old GPU and a plan that does not fit
(test_planner), atomic and corrupt state (test_state).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import gemma_profiles
from gemma_profiles.cli.main import cli
from gemma_profiles.errors import GemmaNotAvailableError, GemmaProfileError, PluginError
from gemma_profiles.planning.hardware import CpuInfo, GpuInfo, Hardware
from gemma_profiles.plugin import manager as plugins
from gemma_profiles.runtime import session
from gemma_profiles.runtime.gemma_info import gemma_status, require_gemma_pytorch
from gemma_profiles.runtime.state import read_applied, write_applied
from gemma_profiles.spec import yamlio
from gemma_profiles.units import format_bytes

pytestmark = pytest.mark.usefixtures("fresh_log_handler")

GiB = 2**30
HERE = Path(__file__).parent
CONSOLE_SCRIPT = Path(sys.executable).with_name("gemma-profile")


def error_line(result: Result | subprocess.CompletedProcess[str], code: int = 2, prefix: str = "gemma-profile") -> str:
    """The one line the user sees: exactly one non-empty stderr line, a non-zero exit, no traceback."""
    returncode = result.exit_code if isinstance(result, Result) else result.returncode
    stderr, stdout = result.stderr, result.stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == code, (returncode, stdout, stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prefix}: error: "), lines[0]
    assert "Traceback" not in stderr + stdout
    return lines[0]


def script_error(completed: subprocess.CompletedProcess[str]) -> str:
    """An uncaught error in a user's script: Python's own report, ending in our type and one line of text.

    (One-line errors without a traceback are the CLI's; inside a program the exception is the interface.)
    """
    assert completed.returncode == 1, (completed.returncode, completed.stdout, completed.stderr)
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("gemma_profiles.errors."), completed.stderr
    assert last.split(": ", 1)[0].rsplit(".", 1)[-1].endswith("Error"), last
    return last


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="gemma-profile")


def gemma_profile(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "gemma_profiles.cli.main"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env or dict(os.environ), timeout=60)


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def install_plugins(*named: tuple[str, object]) -> plugins.GemmaPluginManager:
    manager = plugins.GemmaPluginManager(load_entry_points=False)
    for name, plugin in named:
        manager.register(plugin, name, package=f"{name}-package")
    plugins.reset_plugin_manager(manager)
    return manager


def one_gpu_box(name: str = "Tesla T4", capability: tuple[int, int] = (7, 5)) -> Hardware:
    cpu = CpuInfo(8, 32 * GiB, 30 * GiB, ("avx2",), "Test CPU")
    return Hardware(cpu, (GpuInfo(0, name, capability, 16 * GiB, 16 * GiB),), False, "2.13.0", "12.4")


def build(gemma: Any, tokenizer_path: str, **changes: Any) -> Any:
    """run.py's construction step on a tiny 2b config (float32, as run.py forces); ``changes`` to its config."""
    from gemma_testing import build_tiny_model

    return build_tiny_model(gemma, tokenizer_path, **changes)


# -- profile names and files -----------------------------------------------------------------------


def test_unknown_profile_name_suggests_the_closest_and_lists_the_rest():
    line = error_line(invoke("show", "pascal5gb"))
    assert "no profile named 'pascal5gb' (did you mean 'pascal-5gb'?)" in line
    assert "available: " in line and "t4" in line and "gemma-profile list" in line


def test_bad_gemma_profile_value_in_current_names_the_variable(monkeypatch):
    monkeypatch.setenv("GEMMA_PROFILE", "pascal5gb")
    line = error_line(invoke("current"))
    assert line.startswith("gemma-profile: error: GEMMA_PROFILE=pascal5gb: no profile named 'pascal5gb'")
    assert "did you mean 'pascal-5gb'" in line


def test_missing_profile_file(tmp_path):
    line = error_line(invoke("apply", str(tmp_path / "nope.yaml")))
    assert f"profile file '{tmp_path / 'nope.yaml'}' does not exist (check the path)" in line
    assert read_applied() is None


def test_unreadable_profile_file(write_profile, monkeypatch):
    path = write_profile("locked", "description: locked\n")
    real_open = open

    def refuse(name: Any, *args: Any, **kwargs: Any) -> Any:
        if os.fspath(name) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(yamlio, "open", refuse, raising=False)  # tests run as root: chmod 000 would not stop us
    line = error_line(invoke("show", str(path)))
    assert f"{path}: cannot read: Permission denied (check that the file exists and you may read it)" in line


def test_directory_given_as_a_profile(tmp_path):
    folder = tmp_path / "mine.yaml"
    folder.mkdir()
    line = error_line(invoke("show", str(folder)))
    assert f"{folder}: is a directory, not a profile file" in line


def test_pipe_given_as_a_profile_is_refused_not_read(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    completed = gemma_profile("show", str(fifo))  # reading it would block until the timeout
    assert "not a regular file" in error_line(completed)


def test_extends_cycle_through_the_cli(write_profile):
    write_profile("ring-a", "description: a\nextends: ./ring-b.yaml\n")
    b = write_profile("ring-b", "description: b\nextends: ./ring-a.yaml\n")
    line = error_line(invoke("show", str(b)))
    assert f"{b.with_name('ring-a.yaml')}:2: extends cycle: ring-b -> ring-a -> ring-b" in line
    assert "remove one of the extends" in line


def test_unknown_gemma_config_field(write_profile):
    path = write_profile("typo", "description: typo\nconfig:\n  dtpye: float16\n")
    line = error_line(invoke("show", str(path)))
    assert f"{path}:3: unknown GemmaConfig field 'dtpye' (did you mean 'dtype'?); valid fields:" in line


def test_bad_max_memory_string(write_profile):
    path = write_profile("mem", "description: mem\nplacement:\n  max_memory: {cpu: 12 gigs}\n")
    line = error_line(invoke("plan", str(path), "--variant", "2b"))
    assert f"{path}:3: placement.max_memory.cpu: bad memory size '12 gigs'" in line
    assert "'4.5GiB'" in line


def test_huge_memory_string_is_out_of_range_not_a_crash(write_profile):
    path = write_profile("huge", "description: huge\nhardware: {device: cpu, host_memory: '" + "9" * 400 + "GiB'}\n")
    assert "out of range (0 to 1PiB)" in error_line(invoke("show", str(path)))


def test_control_character_names_its_line(tmp_path):
    path = tmp_path / "bell.yaml"
    path.write_text("description: fine\nconfig: {dtype: \x07float16}\n", encoding="utf-8")
    line = error_line(invoke("show", str(path)))
    assert f"{path}:2: invalid YAML: character #x0007 is not allowed" in line


def test_a_line_break_in_a_quoted_key_stays_one_line(write_profile):
    path = write_profile("nl", 'description: x\n"bad\\nkey": 1\n')
    line = error_line(invoke("show", str(path)))
    assert "unknown key 'bad\\nkey'" in line


# -- hardware the profile wants but this machine lacks ---------------------------------------------


def test_bf16_forced_on_an_old_gpu_stops_construction(gemma, tokenizer_path, write_profile, fake_hardware):
    fake_hardware(one_gpu_box("Quadro P2200", (6, 1)))
    path = write_profile("bf16", "description: x\nplacement: {device: cuda}\nconfig:\n  dtype: bfloat16\n")
    with gemma_profiles.use(str(path)), pytest.raises(GemmaProfileError) as caught:
        build(gemma, tokenizer_path)
    assert caught.value.where == f"{path}:4"
    assert "Quadro P2200 (compute capability 6.1) has no native bfloat16" in caught.value.message
    assert "float16" in (caught.value.hint or "")


def test_bf16_on_an_old_gpu_through_plan(write_profile):
    path = write_profile(
        "bf16-plan", "description: x\nhardware: {device: cuda, compute_capability: '6.1'}\nconfig: {dtype: bfloat16}\n"
    )
    line = error_line(invoke("plan", str(path), "--variant", "2b"))
    assert f"{path}:3: cuda:0 (compute capability 6.1) has no native bfloat16" in line


def test_device_index_this_box_does_not_have(gemma, tokenizer_path, write_profile, monkeypatch, fake_hardware):
    import torch

    fake_hardware(one_gpu_box())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    path = write_profile("gpu3", "description: x\nconfig: {dtype: float32}\nplacement:\n  device: cuda:3\n")
    with gemma_profiles.use(str(path)), pytest.raises(GemmaProfileError) as caught:
        build(gemma, tokenizer_path)  # stopped at construction, before any weight is read
    error = caught.value
    assert error.where == f"{path}:4"
    assert "profile 'gpu3' runs the model on 'cuda:3', but this machine has 1 CUDA device(s): cuda:0..cuda:0" in (
        error.message
    )
    assert "GEMMA_PROFILE=off" in (error.hint or "")


def test_cuda_profile_with_a_cpu_only_torch(gemma, tokenizer_path, write_profile, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write_profile("gpu", "description: x\nconfig: {dtype: float32}\nplacement: {device: cuda}\n")
    with (
        gemma_profiles.use(str(path)),
        pytest.raises(GemmaProfileError, match=r"runs the model on 'cuda', but this torch .* sees no CUDA device"),
    ):
        build(gemma, tokenizer_path)  # stopped at construction, before any weight is read


def test_plan_that_does_not_fit_stops_a_script_with_one_line(gemma, write_profile):
    path = write_profile("small", "description: x\nplacement:\n  device: cpu\n  max_memory: {cpu: 1GiB}\n")
    code = "from gemma import config, model\nmodel.GemmaForCausalLM(config.get_model_config('9b'))\n"
    completed = run_python(code, {**os.environ, "GEMMA_PROFILE": str(path)})
    line = script_error(completed)
    assert f"{path}: 9b under profile 'small' does not fit: cpu needs" in line
    assert "but has 1.00 GiB (placement.max_memory)" in line
    assert "short by" in line and "gemma-profile plan small --variant 9b" in line


def test_plan_that_does_not_fit_through_the_cli(write_profile):
    result = invoke("plan", "cpu-8gb", "--variant", "9b")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    verdicts = [line for line in result.stdout.splitlines() if line.startswith(("verdict:", "cheapest change"))]
    assert verdicts[0].startswith("verdict: does not fit: cpu needs") and "short by" in verdicts[0]


# -- which gemma is installed ------------------------------------------------------------------------


@pytest.fixture
def fake_jax_gemma(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DeepMind's JAX ``gemma`` in shape: a ``gemma`` package with no gemma_pytorch config.py."""
    package = tmp_path / "site" / "gemma"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""JAX gemma, faked."""\n', encoding="utf-8")
    (package / "model.py").write_text('"""No GemmaForCausalLM here."""\nTransformer = object\n', encoding="utf-8")
    for name in [m for m in sys.modules if m == "gemma" or m.startswith("gemma.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(package.parent))
    return package


def test_gemma_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma", None)  # what find_spec answers for a missing package
    assert gemma_status().kind == "missing"
    with pytest.raises(GemmaNotAvailableError) as caught:
        require_gemma_pytorch()
    assert caught.value.where == sys.prefix
    line = error_line(invoke("run", "cpu-32gb", "--", sys.executable, "-c", "pass"))
    assert "gemma_pytorch is not installed in this Python environment" in line
    assert "pip install --no-deps" in line
    current = invoke("current")
    assert current.exit_code == 0 and "gemma: not installed" in current.stdout


def test_jax_gemma_installed_instead(fake_jax_gemma):
    status = gemma_status()
    assert (status.kind, status.location) == ("jax", str(fake_jax_gemma))
    line = error_line(invoke("run", "cpu-32gb", "--", sys.executable, "-c", "pass"))
    assert f"{fake_jax_gemma}: the installed 'gemma' is DeepMind's JAX library, not gemma_pytorch" in line
    assert "pip uninstall gemma" in line
    current = invoke("current")
    assert f"gemma: DeepMind's JAX 'gemma' from PyPI (not gemma_pytorch) at {fake_jax_gemma}" in current.stdout
    applied = invoke("apply", "cpu-32gb")
    assert applied.exit_code == 0 and "note: gemma is DeepMind's JAX 'gemma'" in applied.stderr


def test_jax_gemma_imported_with_a_profile_active(fake_jax_gemma):
    env = {**os.environ, "GEMMA_PROFILE": "cpu-32gb", "PYTHONPATH": str(fake_jax_gemma.parent)}
    completed = run_python("import gemma.model\n", env)
    line = script_error(completed)
    assert f"the 'gemma' package at {fake_jax_gemma / 'model.py'} is not gemma_pytorch" in line
    assert "pip uninstall gemma" in line


# -- plugins ------------------------------------------------------------------------------------------


def broken_distribution(folder: Path) -> None:
    """An installed distribution 'broken-plugin' whose entry point fails to import."""
    (folder / "broken_gp_plugin.py").write_text("import frobnicator  # not installed\n", encoding="utf-8")
    info = folder / "broken_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text("[gemma_profiles]\nbroken = broken_gp_plugin\n", encoding="utf-8")


def test_plugin_that_fails_to_import(tmp_path, monkeypatch):
    broken_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # importlib.metadata finds the distribution there
    listed = invoke("list")  # a read command goes on without it, after one warning line
    assert listed.exit_code == 0 and "t4" in listed.stdout, listed.stderr
    (line,) = listed.stderr.splitlines()
    assert line.startswith("gemma-profile: warning: skipping a broken plugin: ")
    assert "plugin 'broken' from package 'broken-plugin' failed to import: ModuleNotFoundError" in line
    assert "frobnicator" in line
    assert "fix or uninstall broken-plugin, or set GEMMA_PROFILE_DISABLE_PLUGINS=broken" in line
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "broken")
    plugins.reset_plugin_manager()
    blocked = invoke("list")
    assert blocked.exit_code == 0 and "t4" in blocked.stdout


def test_plugin_that_fails_to_import_in_a_script(tmp_path, gemma, tokenizer_path):
    broken_distribution(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "GEMMA_PROFILE": "cpu-32gb"}
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
        "from gemma_testing import tiny_config\n"
        "from gemma import config, model\n"
        f"model.GemmaForCausalLM(tiny_config(config, '2b', {tokenizer_path!r}))\n"
    )
    line = script_error(run_python(code, env))
    assert "plugin 'broken' from package 'broken-plugin' failed to import" in line


# -- a failed activation leaves gemma exactly as it was -------------------------------------------------


def every_class_attribute(gemma: Any) -> dict[str, dict[str, Any]]:
    """``vars()`` of every class in gemma's model modules, and of torch's nn.Module."""
    import importlib

    import torch

    snapshot = {"torch.nn.Module": dict(vars(torch.nn.Module))}
    for module_name in ("gemma.model", "gemma.gemma3_model"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == module_name:
                snapshot[f"{module_name}.{name}"] = dict(vars(value))
    return snapshot


def left_by_us(snapshot: dict[str, dict[str, Any]]) -> list[str]:
    """Attributes that are gemma-profiles' own (a wrapper whose code is in the package, or the patch marker)."""
    package = Path(gemma_profiles.__file__).parent
    found = []
    for cls, attributes in snapshot.items():
        for name, value in attributes.items():
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            if name == "__gemma_profiles_patched__" or (code and Path(code.co_filename).is_relative_to(package)):
                found.append(f"{cls}.{name}")
    return found


def assert_same(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> None:
    # Also absolute, not only before == after: an earlier test's leftover (an inherited `to` wrapper
    # not deleted) would be in `before` too, and the comparison alone passed or failed by test order.
    assert left_by_us(before) == [] and left_by_us(after) == []
    assert after.keys() == before.keys()
    for cls, attributes in before.items():
        assert after[cls].keys() == attributes.keys(), f"{cls}: {set(after[cls]) ^ set(attributes)}"
        for name, value in attributes.items():
            assert after[cls][name] is value, f"{cls}.{name} not restored"


def test_deactivate_after_a_failed_activation_restores_every_attribute(gemma, tokenizer_path):
    before = every_class_attribute(gemma)
    session.activate("pascal5gb", source="env", lazy=True)  # what the autoload does with a bad GEMMA_PROFILE
    assert gemma.model.GemmaForCausalLM.__init__ is not before["gemma.model.GemmaForCausalLM"]["__init__"]
    with pytest.raises(GemmaProfileError, match=r"GEMMA_PROFILE='pascal5gb': no profile named"):
        build(gemma, tokenizer_path)
    gemma_profiles.deactivate()
    assert_same(before, every_class_attribute(gemma))


def test_deactivate_after_a_plugin_fails_in_construction_restores_every_attribute(gemma, tokenizer_path, cpu_fp32):
    class Broken:
        @gemma_profiles.hookimpl
        def gemma_profile_model_built(self, model: Any, plan: Any) -> None:
            raise RuntimeError("half way")

    before = every_class_attribute(gemma)
    install_plugins(("broken", Broken()))
    gemma_profiles.activate(str(cpu_fp32))
    with pytest.raises(PluginError, match=r"plugin 'broken' \(package 'broken-package'\) raised RuntimeError"):
        build(gemma, tokenizer_path)
    gemma_profiles.deactivate()
    assert_same(before, every_class_attribute(gemma))


# -- checkpoints -----------------------------------------------------------------------------------------


class RunsCode:
    """Pickles to a call of ``os.system``: what a hostile checkpoint would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch '{self.marker}'",)


def test_a_checkpoint_holding_code_is_refused_not_run(gemma, tokenizer_path, cpu_fp32, tmp_path):
    import torch

    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.ckpt"
    torch.save({"model_state_dict": {"embedder.weight": RunsCode(marker)}}, hostile)
    with gemma_profiles.use(str(cpu_fp32)):
        model = build(gemma, tokenizer_path)
        with pytest.raises(
            GemmaProfileError, match=r"refused: the checkpoint holds Python objects.*GLOBAL posix.system"
        ) as caught:
            model.load_weights(str(hostile))  # weights_only=True: torch refuses the object
    assert str(caught.value).splitlines() == [str(caught.value)]
    assert not marker.exists()


# -- out of memory while loading ----------------------------------------------------------------------


@pytest.fixture
def cpu_fp32(write_profile: Callable[..., Path]) -> Path:
    return write_profile("cpu-fp32", "description: x\nplacement: {device: cpu}\nconfig: {dtype: float32}\n")


@pytest.fixture
def checkpoint(gemma: Any, tokenizer_path: str, tmp_path: Path) -> str:
    import torch
    from gemma_testing import write_random_checkpoint

    path = tmp_path / "tiny.ckpt"
    write_random_checkpoint(build(gemma, tokenizer_path), str(path), torch.float32)
    return str(path)


class RaisingLoader:
    def __init__(self, error: BaseException):
        self.error = error

    @gemma_profiles.hookimpl(tryfirst=True)
    def gemma_profile_load_weights(self, model: Any, path: str, plan: Any, gemma_loader: Any) -> bool:
        raise self.error


def oom_errors() -> list[BaseException]:
    import errno

    import torch

    return [
        MemoryError(),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 4.00 GiB total capacity)"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried"),
        OSError(errno.ENOMEM, "Cannot allocate memory"),
    ]


@pytest.mark.parametrize("index", range(4), ids=["MemoryError", "torch.OutOfMemoryError", "cpu-allocator", "ENOMEM"])
def test_out_of_memory_while_loading_gives_the_plan_and_a_way_out(gemma, tokenizer_path, checkpoint, cpu_fp32, index):
    error = oom_errors()[index]
    install_plugins(("raising-loader", RaisingLoader(error)))
    with gemma_profiles.use(str(cpu_fp32)):
        model = build(gemma, tokenizer_path)
        with pytest.raises(GemmaProfileError) as caught:
            model.load_weights(checkpoint)
    text = str(caught.value)
    assert text.splitlines() == [text]
    assert caught.value.where == checkpoint
    assert "out of memory while loading weights into" in text and "profile 'cpu-fp32'" in text
    assert type(error).__name__ in text
    assert "the plan needs cpu " in text and " of " in text, text  # required against the budget
    assert "gemma-profile plan cpu-fp32" in text and "int8" in text
    assert caught.value.__cause__ is error


def test_out_of_memory_in_gemmas_own_loader(gemma, tokenizer_path, checkpoint, cpu_fp32, monkeypatch):
    import torch

    def no_memory(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    with gemma_profiles.use(str(cpu_fp32)):
        model = build(gemma, tokenizer_path)
        monkeypatch.setattr(torch, "load", no_memory)
        with pytest.raises(GemmaProfileError, match=r"out of memory while loading weights .* the plan needs cpu"):
            model.load_weights(checkpoint)


def test_out_of_memory_names_the_cheapest_change_when_the_plan_did_not_fit(tmp_path):
    from gemma_profiles.hooks.oom import out_of_memory_error

    from gemma_profiles.planning.plan import make_plan
    from gemma_profiles.spec.registry import default_registry

    plan = make_plan(default_registry().load("cpu-8gb"), "9b")
    assert plan.verdict is not None and not plan.verdict.fits and plan.memory is not None
    error = out_of_memory_error(MemoryError(), plan, "while loading weights into", str(tmp_path / "9b.ckpt"))
    assert f"cheapest change that fits: {plan.verdict.suggestion}" in (error.hint or "")
    need = format_bytes(plan.memory.required["cpu"])
    assert f"the plan needs cpu {need} of " in error.message and "cpu-8gb's hardware: section" in error.message


def test_other_loader_errors_are_not_called_out_of_memory(gemma, tokenizer_path, checkpoint, cpu_fp32):
    install_plugins(("raising-loader", RaisingLoader(RuntimeError("shape mismatch"))))
    with gemma_profiles.use(str(cpu_fp32)):
        model = build(gemma, tokenizer_path)
        with pytest.raises(PluginError, match=r"plugin 'raising-loader' .* raised RuntimeError .*: shape mismatch"):
            model.load_weights(checkpoint)


def test_the_oom_plugin_is_listed_and_can_be_blocked(monkeypatch):
    rows = {line.split()[0]: line for line in invoke("plugins").stdout.splitlines()}
    assert "gemma_profile_load_weights" in rows["oom"] and "builtin" in rows["oom"]
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "oom")
    plugins.reset_plugin_manager()
    assert "oom" not in {line.split()[0] for line in invoke("plugins").stdout.splitlines()}


# -- applied state under a killed or concurrent writer ----------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from gemma_profiles.runtime.state import write_applied

    print("ready", flush=True)
    while True:
        for value in sys.argv[1:]:
            write_applied(value)
    """
)


def test_a_killed_writer_leaves_the_old_or_the_new_state():
    values = ("t4", "cpu-32gb", "/a/much/longer/reference/to/a/profile/" + "x" * 200 + ".yaml")
    write_applied("t4")
    for delay in (0.0, 0.05, 0.2):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, *values], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
        )
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        assert read_applied() in values


def test_two_concurrent_applies_leave_one_of_the_two():
    env = dict(os.environ)
    command = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "gemma_profiles.cli.main"]
    children = [
        subprocess.Popen([*command, "apply", name], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name in ("t4", "cpu-32gb")
    ]
    for child in children:
        child.communicate(timeout=60)
        assert child.returncode == 0
    assert read_applied() in ("t4", "cpu-32gb")


def test_missing_tokenizer_is_one_line_before_construction(gemma, tokenizer_path, cpu_fp32, tmp_path):
    missing = str(tmp_path / "no-such" / "tokenizer.model")
    with (
        gemma_profiles.use(str(cpu_fp32)),
        pytest.raises(GemmaProfileError, match="tokenizer file not found") as caught,
    ):
        build(gemma, tokenizer_path, tokenizer=missing)
    assert str(caught.value).splitlines() == [str(caught.value)]
