"""What a new user hit on the first day (issue 14): ``auto`` as a profile name everywhere, ``list``
and ``detect`` past a broken profile, ``apply`` of a CUDA profile without the device, ``detect``'s
torch-kernel verdict, and ``bench`` (an imported folder, the tokenizer hint, the progress line)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from gemma_profiles.cli.main import cli
from gemma_profiles.planning import auto
from gemma_profiles.planning.hardware import LEGACY_TORCH_INDEX, CpuInfo, GpuInfo, Hardware

pytestmark = pytest.mark.usefixtures("fresh_log_handler")

GiB = 2**30
CPU = CpuInfo(cores=8, total_memory=24 * GiB, available_memory=20 * GiB, isa=("avx2",), name="Test CPU")
P2200 = GpuInfo(0, "Quadro P2200", (6, 1), 5 * GiB, 4 * GiB)
#: ``torch.cuda.get_arch_list()`` of PyPI's default (CUDA 13) torch, and of a cu126 build.
CU130 = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120")
CU126 = ("sm_50", "sm_60", "sm_61", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="gemma-profile")


def cpu_box(**changes: Any) -> Hardware:
    return Hardware(CPU, torch_version="2.9.0+cpu", **changes)


def p2200_box(arch_list: tuple[str, ...] = CU126) -> Hardware:
    return Hardware(CPU, (P2200,), torch_version="2.9.0", cuda_version="12.6", cuda_arch_list=arch_list)


@pytest.fixture
def no_nvidia_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's files show no GPU (as on this CPU machine), whatever machine runs the test."""
    monkeypatch.setattr(auto, "nvidia_gpus_visible", lambda *args: [])


# -- auto is a profile name everywhere ---------------------------------------------------------


def test_current_with_gemma_profile_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: exit 2, "GEMMA_PROFILE=auto: no profile named 'auto'".
    monkeypatch.setenv("GEMMA_PROFILE", "auto")
    result = invoke("current")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "auto (GEMMA_PROFILE=auto)"
    data = json.loads(invoke("current", "--json").stdout)
    assert data["profile"] == "auto" and data["error"] is None


def test_show_auto_says_which_detected_fact_each_value_came_from(fake_hardware: Callable[..., None]) -> None:
    # Before: exit 2, "no profile named 'auto'".
    fake_hardware(p2200_box())
    result = invoke("show", "auto")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "auto: built from detected hardware: Quadro P2200 (cc 6.1, 5.00 GiB)"
    assert lines[1].startswith("  file: none; built from this machine's detected hardware")
    rows = {line.split()[0]: line for line in lines[2:] if line.strip()}
    assert rows["hardware.compute_capability"].endswith("detected: cuda:0's compute capability")
    assert rows["hardware.gpu"].endswith("detected: cuda:0's name")
    assert rows["placement.device"].split()[1:2] == ["cuda:0"]
    data = json.loads(invoke("show", "auto", "--json").stdout)
    assert data["path"] is None and data["device"] == "cuda:0"
    assert {v["key"]: v["from"] for v in data["values"]}["hardware.memory"] == "detected: cuda:0's memory"


def test_show_auto_on_a_cpu_machine(fake_hardware: Callable[..., None]) -> None:
    fake_hardware(cpu_box())
    data = json.loads(invoke("show", "auto", "--json").stdout)
    values = {v["key"]: (v["value"], v["from"]) for v in data["values"]}
    assert values["placement.device"] == ("cpu", "detected: no CUDA device: the CPU")
    assert values["hardware.host_memory"] == (str(24 * GiB), "detected: this machine's RAM")


@pytest.mark.parametrize("variant", ["2b", "7b", "27b"])
def test_show_auto_plans_as_plan_auto_does(fake_hardware: Callable[..., None], variant: str) -> None:
    """Both size auto against this machine (its ISA and free memory too), so they agree."""
    fake_hardware(p2200_box())
    shown = json.loads(invoke("show", "auto", "--variant", variant, "--json").stdout)
    planned = json.loads(invoke("plan", "auto", "--variant", variant, "--json").stdout)
    assert (shown["compute_dtype"], shown["quantization"]) == (planned["dtype"], planned["quantization"])


def test_apply_auto_then_current(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: exit 2, nothing applied.
    applied = invoke("apply", "auto")
    assert applied.exit_code == 0, applied.output
    assert applied.stdout.startswith("applied 'auto' to the environment")
    current = invoke("current")
    assert current.exit_code == 0 and current.stdout.startswith("auto (applied in ")


def test_run_auto_sets_it_for_the_command() -> None:
    # Before: exit 2 before the command ran.
    import subprocess

    code = "import os, sys; print(os.environ['GEMMA_PROFILE']); sys.exit(3)"
    command = [sys.executable, "-m", "gemma_profiles.cli.main", "run", "auto", "--", sys.executable, "-c", code]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == "auto" and done.stderr == ""


def test_plan_auto_and_a_profile_extending_auto_size_against_this_machine(
    fake_hardware: Callable[..., None], write_profile: Callable[..., Path]
) -> None:
    fake_hardware(p2200_box())
    child = write_profile("my-model", "description: my model here\nextends: auto\nconfig: {num_hidden_layers: 4}\n")
    for name in ("auto", str(child)):
        result = invoke("plan", name, "--variant", "2b", "--json")
        assert result.exit_code == 0, result.output
        plan = json.loads(result.stdout)
        assert plan["target"]["source"] == "detected", name
        assert plan["target"]["device"] == "cuda:0"


def test_extends_auto_takes_the_detected_facts_with_their_origins(
    fake_hardware: Callable[..., None], write_profile: Callable[..., Path]
) -> None:
    # Before: "cannot find the profile 'auto' named in extends".
    import gemma_profiles

    fake_hardware(p2200_box())
    child = write_profile("my-model", "description: my model here\nextends: auto\nconfig: {num_hidden_layers: 4}\n")
    profile = gemma_profiles.load_profile(str(child))
    assert profile.model.hardware is not None and profile.model.hardware.compute_capability == "6.1"
    assert profile.model.placement.device == "cuda:0"
    assert profile.model.config.num_hidden_layers == 4
    assert str(profile.origin("hardware", "compute_capability")) == (
        "detected: cuda:0's compute capability (extends auto)"
    )
    assert str(profile.origin("config", "num_hidden_layers")) == f"{child}:3"
    shown = invoke("show", str(child))
    assert shown.exit_code == 0, shown.output
    assert "  extends: auto (built from this machine's detected hardware" in shown.stdout
    assert invoke("validate", str(child)).exit_code == 0


@pytest.mark.integration
def test_a_model_builds_under_a_profile_extending_auto(
    gemma: Any, tokenizer_path: str, write_profile: Callable[..., Path]
) -> None:
    from gemma_testing import build_tiny_model

    import gemma_profiles
    from gemma_profiles.runtime import session as runtime

    child = write_profile("my-model", "description: my model here\nextends: auto\nconfig: {dtype: float32}\n")
    with gemma_profiles.use(str(child)):
        model = build_tiny_model(gemma, tokenizer_path, dtype=None)  # the profile's dtype, not the test's
        session = runtime.current()
        assert session is not None and session.profile().name == "my-model"
    assert {str(p.dtype) for p in model.parameters()} <= {"torch.float32"}


def test_new_extends_auto_validates(fake_hardware: Callable[..., None], tmp_path: Path) -> None:
    # Before the registry's cache was passed: "<detected hardware>: file not found".
    fake_hardware(cpu_box())
    result = invoke("new", "my-box", "--extends", "auto", "-o", str(tmp_path / "my-box.yaml"))
    assert result.exit_code == 0, result.output
    assert "it validates" in result.stdout


def test_a_file_named_auto_is_refused_everywhere(
    isolated_env: Path, fake_hardware: Callable[..., None], write_profile: Callable[..., Path], tmp_path: Path
) -> None:
    """auto.yaml neither shadows the detected profile nor is shadowed silently: it is refused, saying why."""
    fake_hardware(cpu_box())
    user_dir = isolated_env / "user-profiles"
    mine = write_profile("auto", "description: mine\nhardware: {device: cpu, host_memory: 8GB}\n", user_dir)
    listed = invoke("list")
    assert listed.exit_code == 0
    (warning,) = [line for line in listed.stderr.splitlines() if "auto.yaml" in line]
    assert "a profile file may not be named 'auto.yaml'" in warning and "rename the file" in warning
    assert any(line.startswith("auto ") and "detected" in line for line in listed.stdout.splitlines())
    shown = json.loads(invoke("show", "auto", "--json").stdout)
    assert shown["description"].startswith("built from detected hardware")  # not the file's
    by_path = invoke("show", str(mine))
    assert by_path.exit_code == 2 and "may not be named 'auto.yaml'" in by_path.stderr
    validated = invoke("validate", str(mine))
    assert validated.exit_code == 1 and "may not be named 'auto.yaml'" in validated.stderr
    child = write_profile("child", "description: c\nextends: ./auto.yaml\n", user_dir)
    assert "may not be named 'auto.yaml'" in invoke("validate", str(child)).stderr


def test_an_unknown_name_offers_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke("show", "atuo")
    (line,) = result.stderr.splitlines()
    assert "no profile named 'atuo' (did you mean 'auto'?)" in line
    assert "and auto (built from this machine's detected hardware)" in line


def test_list_shows_auto_without_detecting(monkeypatch: pytest.MonkeyPatch) -> None:
    def detect() -> None:
        raise AssertionError("list detected the hardware (that imports torch)")

    monkeypatch.setattr("gemma_profiles.plugin.manager.detect_hardware", detect)
    rows = {row["name"]: row for row in json.loads(invoke("list", "--json").stdout)}
    assert rows["auto"]["source"] == "detected" and rows["auto"]["path"] is None


# -- list and detect go past a broken profile --------------------------------------------------

BROKEN_TYPO = "description: typo\nconfig:\n  dtyp: float16\n"
BROKEN_YAML = "description: [\n"


@pytest.fixture
def broken_profiles(tmp_path: Path, write_profile: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "mixed"
    write_profile("typo", BROKEN_TYPO, folder)
    write_profile("unparsable", BROKEN_YAML, folder)
    write_profile("fine", "description: a fine one\nhardware: {device: cpu, host_memory: 8GB}\n", folder)
    monkeypatch.setenv("GEMMA_PROFILE_PATH", str(folder))
    return folder


def test_list_goes_past_broken_profiles_one_line_each(broken_profiles: Path) -> None:
    # Before: exit 2 with the first broken file's error, nothing listed.
    result = invoke("list")
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"fine", "t4", "cpu-8gb", "auto", "typo", "unparsable"} <= set(names)
    warnings = result.stderr.splitlines()
    assert len(warnings) == 2, warnings
    typo = next(line for line in warnings if "'typo'" in line)
    assert typo.startswith(f"gemma-profile: warning: profile 'typo' (GEMMA_PROFILE_PATH) is broken: {broken_profiles}")
    assert "typo.yaml:3: unknown GemmaConfig field 'dtyp' (did you mean 'dtype'?)" in typo
    assert typo.endswith(f"('gemma-profile validate {broken_profiles / 'typo.yaml'}' lists every problem)")
    assert any("unparsable.yaml:" in line and "invalid YAML" in line for line in warnings)
    assert "broken: see the warning above" in next(line for line in result.stdout.splitlines() if "typo" in line)
    rows = {row["name"]: row for row in json.loads(invoke("list", "--json").stdout)}
    assert rows["fine"]["problem"] is None and "dtyp" in rows["typo"]["problem"]


def test_detect_goes_past_broken_profiles(broken_profiles: Path, fake_hardware: Callable[..., None]) -> None:
    # Before: exit 2 with the first broken file's error.
    fake_hardware(cpu_box())
    result = invoke("detect")
    assert result.exit_code == 0, result.output
    assert "best profile: cpu-16gb" in result.stdout
    assert len(result.stderr.splitlines()) == 2
    assert all("is broken and left out of the match" in line for line in result.stderr.splitlines())


def test_list_goes_past_a_broken_profile_and_a_broken_plugin(
    broken_profiles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both at once: each is one line naming the file (or the package), the rest is listed."""
    package = tmp_path / "site"
    (package / "typo_pack_mod.py").parent.mkdir(parents=True)
    (package / "typo_pack_mod.py").write_text(
        "from gemma_profiles import hookimpl\n\n@hookimpl\ndef gemma_profile_source():\n    return []\n"
    )
    info = package / "typo_pack-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: typo-pack\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[gemma_profiles]\ntypo = typo_pack_mod\n")
    monkeypatch.syspath_prepend(str(package))
    try:
        result = invoke("list")
        assert result.exit_code == 0, result.output
        assert "fine" in result.stdout and "t4" in result.stdout
        warnings = result.stderr.splitlines()
        assert len(warnings) == 3, warnings
        plugin = next(line for line in warnings if "plugin" in line)
        assert "plugin 'typo' from package 'typo-pack'" in plugin
        assert "(did you mean 'gemma_profile_sources'?)" in plugin
        assert "GEMMA_PROFILE_DISABLE_PLUGINS=typo" in plugin
    finally:
        sys.modules.pop("typo_pack_mod", None)


# -- apply of a CUDA profile on a machine without that device ---------------------------------


@pytest.mark.usefixtures("no_nvidia_driver")
def test_apply_a_cuda_profile_without_cuda_warns_and_applies(fake_hardware: Callable[..., None]) -> None:
    # Before: applied without a word; models then failed after loading the weights.
    fake_hardware(cpu_box())
    result = invoke("apply", "t4")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("applied 't4' to the environment")
    (warning,) = result.stderr.splitlines()
    assert warning.startswith("gemma-profile: warning: 't4' runs on cuda:0 and this machine has no CUDA device")
    assert "'gemma-profile detect'" in warning and "cpu-16gb" in warning
    assert invoke("current").stdout.startswith("t4 (applied")


@pytest.mark.usefixtures("no_nvidia_driver")
def test_apply_a_cuda_profile_with_the_device_says_nothing(fake_hardware: Callable[..., None]) -> None:
    fake_hardware(p2200_box())
    result = invoke("apply", "pascal-5gb")
    assert result.exit_code == 0 and result.stderr == ""


def test_apply_does_not_detect_when_the_driver_shows_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auto, "nvidia_gpus_visible", lambda *args: ["Tesla T4"])

    def detect() -> None:
        raise AssertionError("detected (imports torch) though the driver shows the GPU")

    monkeypatch.setattr("gemma_profiles.plugin.manager.detect_hardware", detect)
    result = invoke("apply", "t4")
    assert result.exit_code == 0 and result.stderr == "", result.output


@pytest.mark.usefixtures("no_nvidia_driver")
def test_apply_a_cpu_profile_never_detects(monkeypatch: pytest.MonkeyPatch) -> None:
    def detect() -> None:
        raise AssertionError("detected for a CPU profile")

    monkeypatch.setattr("gemma_profiles.plugin.manager.detect_hardware", detect)
    result = invoke("apply", "cpu-8gb")
    assert result.exit_code == 0 and result.stderr == "", result.output


def test_nvidia_gpus_visible_reads_the_driver_files(tmp_path: Path) -> None:
    proc, dev = tmp_path / "gpus", tmp_path / "dev"
    dev.mkdir()
    assert auto.nvidia_gpus_visible(proc, dev) == []
    (dev / "nvidiactl").touch()
    (dev / "nvidia0").touch()
    assert auto.nvidia_gpus_visible(proc, dev) == ["?"]
    (proc / "0000:01:00.0").mkdir(parents=True)
    (proc / "0000:01:00.0" / "information").write_text("Model: \t\t Quadro P2200\nIRQ:   130\n")
    assert auto.nvidia_gpus_visible(proc, dev) == ["Quadro P2200"]


# -- detect: does this torch carry kernels for the GPU? ----------------------------------------


def test_detect_says_a_cu130_torch_has_no_kernels_for_pascal_and_the_fix(fake_hardware: Callable[..., None]) -> None:
    # Before: detect printed the GPU and pascal-5gb; CUDA then failed mid-run ("no kernel image").
    fake_hardware(p2200_box(CU130))
    result = invoke("detect")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    gpu = lines.index(next(line for line in lines if line.startswith("cuda:0: Quadro P2200")))
    assert lines[gpu + 1].startswith("  torch kernels: missing - this torch (built for sm_75 ")
    assert lines[gpu + 2] == (
        f"  fix: pip install torch --index-url {LEGACY_TORCH_INDEX} "
        "(cu126 is the last PyTorch CUDA line with Maxwell/Pascal/Volta kernels)"
    )
    assert "best profile: pascal-5gb" in result.stdout
    assert lines[-1].startswith("until torch is fixed, cuda:0 cannot run gemma: use cpu-16gb")
    data = json.loads(invoke("detect", "--json").stdout)
    (kernels,) = data["torch_kernels"]
    assert kernels["device"] == "cuda:0" and kernels["ok"] is False and LEGACY_TORCH_INDEX in kernels["fix"]
    assert data["best_profile_until_torch_is_fixed"]["name"] == "cpu-16gb"


def test_detect_says_a_cu126_torch_has_pascal_kernels(fake_hardware: Callable[..., None]) -> None:
    fake_hardware(p2200_box(CU126))
    result = invoke("detect")
    assert "  torch kernels: this torch has sm_61 kernels for compute capability 6.1" in result.stdout.splitlines()
    assert "fix:" not in result.stdout and "until torch is fixed" not in result.stdout
    data = json.loads(invoke("detect", "--json").stdout)
    assert data["torch_kernels"][0]["ok"] is True and data["best_profile_until_torch_is_fixed"] is None


def test_detect_counts_ptx_for_a_newer_gpu(fake_hardware: Callable[..., None]) -> None:
    blackwell = GpuInfo(0, "NVIDIA RTX PRO 6000", (12, 1), 96 * GiB)
    fake_hardware(Hardware(CPU, (blackwell,), torch_version="2.9.0", cuda_version="13.0", cuda_arch_list=CU130))
    kernels = json.loads(invoke("detect", "--json").stdout)["torch_kernels"][0]
    assert kernels["ok"] is True  # sm_120 machine code runs on 12.1
    fake_hardware(
        Hardware(CPU, (blackwell,), torch_version="2.9.0", cuda_version="13.0", cuda_arch_list=("sm_90", "compute_90"))
    )
    kernels = json.loads(invoke("detect", "--json").stdout)["torch_kernels"][0]
    assert kernels["ok"] is True and kernels["jit"] is True and kernels["match"] == "compute_90"


def test_detect_names_a_gpu_a_cpu_torch_cannot_see(
    fake_hardware: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hardware(cpu_box())
    monkeypatch.setattr(auto, "nvidia_gpus_visible", lambda *args: ["Quadro P2200"])
    result = invoke("detect")
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("nvidia:")]
    assert line.startswith(
        "nvidia: Quadro P2200 (seen by the driver, not by torch): this torch (2.9.0+cpu) is a CPU build"
    )
    assert LEGACY_TORCH_INDEX in line


# -- bench ---------------------------------------------------------------------------------------


def test_bench_without_a_tokenizer_names_the_tokenizer_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: "... (set model_config.tokenizer, or config.tokenizer in the profile, ...)" - bench has no model_config.
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)  # gemma's default tokenizer/tokenizer.model is not here
    result = invoke("bench", "cpu-32gb", "--variant", "2b", "--ckpt", str(tmp_path / "x.ckpt"))
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert "tokenizer file not found: tokenizer/tokenizer.model (gemma's default for 2b" in line
    assert "pass --tokenizer PATH/tokenizer.model" in line and "model_config" not in line
    wrong = invoke("bench", "cpu-32gb", "-v", "2b", "--ckpt", "x.ckpt", "--tokenizer", "nope.model")
    assert "tokenizer file not found: nope.model (--tokenizer)" in wrong.stderr


def test_bench_says_what_it_needs(tmp_path: Path) -> None:
    result = invoke("bench", "cpu-32gb")
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert "--variant and --ckpt missing" in line and "gemma-profile bench cpu-32gb DIR" in line
    both = invoke("bench", "cpu-32gb", str(tmp_path), "--variant", "2b")
    assert both.exit_code == 2 and "an imported folder has its own" in both.stderr


def imported_folder(gemma: Any, tokenizer_path: str, folder: Path) -> Path:
    """A folder as 'gemma-profile import' leaves it: config.json, model.ckpt, tokenizer.model (tiny Gemma 3)."""
    import shutil

    import torch
    from gemma_testing import tiny_config, write_random_checkpoint

    config = tiny_config(gemma.config, "1b", tokenizer_path, dtype="float32")
    fields = {}
    for key, value in vars(config).items():
        if key in ("vision_config", "tokenizer"):
            continue
        if hasattr(value, "name"):
            value = value.name
        elif isinstance(value, list):
            value = [getattr(v, "name", v) for v in value]
        elif isinstance(value, dict):
            value = {getattr(k, "name", k): v for k, v in value.items()}
        fields[key] = value
    fields["tokenizer"] = "tokenizer.model"
    folder.mkdir(parents=True)
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    (folder / "config.json").write_text(json.dumps({"gemma_config": fields}), encoding="utf-8")
    previous = torch.get_default_dtype()
    model = gemma.model.GemmaForCausalLM(config)
    torch.set_default_dtype(previous)
    write_random_checkpoint(model, folder / "model.ckpt", torch.float32)
    return folder


@pytest.mark.integration
def test_bench_an_imported_folder(gemma: Any, tokenizer_path: str, tmp_path: Path) -> None:
    # Before: bench took only --variant and --ckpt (gemma's own configs): an imported model could not be timed.
    folder = imported_folder(gemma, tokenizer_path, tmp_path / "imported")
    for args in ([str(folder)], ["--model", str(folder)]):
        result = invoke("bench", "auto", *args, "--tokens", "3", "--prompt", "the cat", "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["profile"] == "auto" and data["model_dir"] == str(folder)
        assert data["decode_steps"] == 2 and data["tokens_per_s"] > 0
    text = invoke("bench", "cpu-32gb", str(folder), "--tokens", "2", "--prompt", "the cat")
    assert text.exit_code == 0, text.output
    assert text.stdout.startswith(f"cpu-32gb / {folder} on cpu: ['bfloat16']")
    (folder / "model.ckpt").unlink()
    missing = invoke("bench", "auto", str(folder))
    assert missing.exit_code == 2 and "no model.ckpt in this folder" in missing.stderr


@pytest.mark.integration
def test_bench_progress_starts_after_the_loading_log_lines(
    gemma: Any, tokenizer_path: str, tmp_path: Path, write_profile: Callable[..., Path]
) -> None:
    # Before: the bar was drawn before loading, and loading's log lines were written after it on its line.
    from gemma_testing import tiny_bench_profile

    profile = tiny_bench_profile(gemma, write_profile, tokenizer_path, tmp_path / "tiny.ckpt")
    args = ["--variant", "2b", "--ckpt", str(tmp_path / "tiny.ckpt"), "--tokens", "3", "--prompt", "the cat"]
    result = invoke("bench", str(profile), *args)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    logs = [i for i, line in enumerate(lines) if line.startswith("gemma-profiles | ")]
    bar = [i for i, line in enumerate(lines) if line.startswith("tiny-bench / 2b")]
    assert logs and bar, lines
    assert bar[0] > logs[-1], lines  # loading logs first, each on its own line; then the progress


def test_bench_help_shows_the_folder_form() -> None:
    result = invoke("bench", "--help")
    assert "gemma-profile bench auto ~/models/gemma-3-270m" in result.stdout
    assert "[DIR]" in result.stdout and "--model" in result.stdout


ROUND_TRIP = textwrap.dedent(
    """
    import sys
    from gemma_profiles.cli.main import cli

    for args in (["list"], ["list", "--json"], ["current"]):
        try:
            cli(args, standalone_mode=False)
        except SystemExit as exc:
            assert not exc.code, (args, exc.code)
    print("torch" in sys.modules)
    """
)


def test_current_auto_and_list_never_import_torch() -> None:
    import subprocess

    env = dict(os.environ, GEMMA_PROFILE="auto")
    done = subprocess.run([sys.executable, "-c", ROUND_TRIP], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False"
