"""The ``gemma-profile`` command: CliRunner for most, real subprocesses where stdio or exit codes matter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import gemma_profiles
from gemma_profiles.cli.main import cli

pytestmark = pytest.mark.usefixtures("fresh_log_handler")

CONSOLE_SCRIPT = Path(sys.executable).with_name("gemma-profile")
FILE_LINE = re.compile(r"\.ya?ml:\d+\b")


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="gemma-profile")


def invoke_json(*args: str) -> object:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def gemma_profile(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real console script (falling back to ``python -m``) in the isolated environment."""
    command = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists() else [sys.executable, "-m", "gemma_profiles.cli.main"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env or dict(os.environ), timeout=60)


# -- list ---------------------------------------------------------------------------------


def test_list_json_has_the_concrete_profiles():
    rows = invoke_json("list")
    names = [row["name"] for row in rows]
    assert {"pascal-5gb", "t4", "cpu-32gb"} <= set(names)
    assert len(names) >= 8
    assert all(not row["abstract"] for row in rows)
    assert "base-cuda" not in names
    pascal = next(row for row in rows if row["name"] == "pascal-5gb")
    assert (pascal["device"], pascal["compute_capability"], pascal["dtype"]) == ("cuda", "6.1", "float16")
    assert pascal["source"] == "bundled"
    assert Path(pascal["path"]).name == "pascal-5gb.yaml"


def test_list_all_includes_abstract_bases():
    rows = {row["name"]: row for row in invoke_json("list", "--all")}
    assert rows["base-cuda"]["abstract"] is True
    assert rows["base-cpu"]["abstract"] is True
    assert rows["t4"]["abstract"] is False


def test_list_text():
    result = invoke("list")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert any(line.startswith("pascal-5gb ") for line in lines)
    assert not any(line.startswith("base-cuda ") for line in lines)


def test_list_shows_a_user_profile(isolated_env, write_profile):
    write_profile("my-box", "description: my box\nextends: base-cpu\n", isolated_env / "user-profiles")
    rows = {row["name"]: row for row in invoke_json("list")}
    assert rows["my-box"]["source"] == "user"
    assert rows["my-box"]["dtype"] == "bfloat16"


# -- show -----------------------------------------------------------------------------------


def test_show_pascal_json():
    data = invoke_json("show", "pascal-5gb")
    assert data["name"] == "pascal-5gb"
    assert data["compute_dtype"] == "float16"
    assert data["quantization"] == "int8"
    assert data["device"] == "cuda"
    assert [Path(p).name for p in data["extends"]] == ["base-cuda.yaml"]
    assert data["values"]
    for item in data["values"]:
        assert item["from"] and FILE_LINE.search(item["from"]), item
    by_key = {item["key"]: item for item in data["values"]}
    assert "pascal-5gb.yaml:" in by_key["config.dtype"]["from"]
    assert "base-cuda.yaml:" in by_key["placement.device"]["from"]
    assert "extends base-cuda" in by_key["placement.device"]["from"]
    assert set(data["variants"]) >= {"gemma2", "gemma3", "7b"}
    for items in data["variants"].values():
        for item in items:
            assert FILE_LINE.search(item["from"]), item
    assert data["warnings"] == []


def test_show_t4_for_9b():
    data = invoke_json("show", "t4", "--variant", "9b")
    assert data["compute_dtype"] == "float32"
    assert data["quantization"] == "int8"
    assert data["overrides_applied"] == ["gemma2", "9b"]
    by_key = {item["key"]: item for item in data["values"]}
    assert "variants.gemma2" in by_key["config.dtype"]["from"]
    assert "variants.9b" in by_key["quantization.weights"]["from"]


def test_show_text_mentions_origins():
    result = invoke("show", "t4", "--variant", "2b")
    assert result.exit_code == 0
    assert "compute dtype: float16" in result.stdout
    assert re.search(r"t4\.yaml:\d+", result.stdout)


def test_show_unknown_variant_suggests():
    result = invoke("show", "t4", "--variant", "9B")
    assert result.exit_code == 2
    assert "did you mean '9b'" in result.stderr


def test_show_by_path(write_profile):
    path = write_profile("mine", "description: mine\nextends: base-cpu\n")
    data = invoke_json("show", str(path))
    assert data["name"] == "mine"
    assert data["compute_dtype"] == "bfloat16"


def test_show_unknown_is_one_line_exit_2():
    result = invoke("show", "nosuch")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gemma-profile: error:")
    assert "nosuch" in lines[0]
    assert "Traceback" not in result.output


def test_show_unknown_in_a_real_process():
    completed = gemma_profile("show", "nosuch")
    assert completed.returncode == 2
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("gemma-profile: error:")
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""


# -- validate --------------------------------------------------------------------------------


BROKEN = """\
name: broken
config:
  dtpye: float16
placement:
  device: gpu
"""


def test_validate_broken_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = invoke("validate", str(path))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{path}:3: ")
    assert "did you mean 'dtype'" in lines[0]
    assert lines[1].startswith(f"{path}:5: ")
    assert "Traceback" not in result.output


def test_validate_good_file(write_profile):
    path = write_profile("good", "description: fine\nextends: base-cpu\n")
    result = invoke("validate", str(path))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"{path}: ok"
    assert result.stderr == ""


def test_validate_folder_reports_every_file(tmp_path, write_profile):
    write_profile("good", "description: fine\n", tmp_path / "mixed")
    (tmp_path / "mixed" / "broken.yaml").write_text(BROKEN)
    data = json.loads(invoke("validate", str(tmp_path / "mixed"), "--json").stdout)
    assert {Path(r["path"]).name: r["ok"] for r in data} == {"good.yaml": True, "broken.yaml": False}


def test_validate_missing_file(tmp_path):
    result = invoke("validate", str(tmp_path / "absent.yaml"))
    assert result.exit_code == 1
    assert "file not found" in result.stderr


def test_validate_bundled_profiles_are_clean():
    from gemma_profiles.hooks.sources import bundled_dir

    result = invoke("validate", str(bundled_dir()))
    assert result.exit_code == 0, result.stderr


def test_validate_bad_extends_is_a_problem_not_an_abort(tmp_path, write_profile):
    bad = write_profile("bad", "description: x\nextends: base-cudaa\n")
    good = write_profile("good", "description: fine\n")
    result = invoke("validate", str(bad), str(good))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{bad}:2: ")
    assert f"{good}: ok" in result.stdout


def test_validate_broken_file_in_a_real_process(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    completed = gemma_profile("validate", str(path))
    assert completed.returncode == 1
    assert completed.stderr.splitlines()[0].startswith(f"{path}:3: ")


# -- apply / current / reset -------------------------------------------------------------


def state_file() -> Path:
    return Path(os.environ["GEMMA_PROFILE_STATE_DIR"]) / "applied.json"


def test_apply_current_reset(monkeypatch):
    result = invoke("apply", "t4")
    assert result.exit_code == 0, result.stderr
    path = state_file()
    assert str(path) in result.stdout
    assert json.loads(path.read_text(encoding="utf-8"))["profile"] == "t4"
    assert sorted(p.name for p in path.parent.iterdir()) == ["applied.json"]

    data = invoke_json("current")
    assert (data["profile"], data["source"], data["error"]) == ("t4", "applied", None)

    monkeypatch.setenv("GEMMA_PROFILE", "cpu-32gb")
    data = invoke_json("current")
    assert (data["profile"], data["source"]) == ("cpu-32gb", "env")

    monkeypatch.setenv("GEMMA_PROFILE", "off")
    data = invoke_json("current")
    assert data["profile"] is None
    assert data["reference"] is None
    assert data["source"] == "env"
    monkeypatch.delenv("GEMMA_PROFILE")

    result = invoke("reset")
    assert result.exit_code == 0
    assert "removed" in result.stdout
    assert not path.exists()
    assert invoke_json("current")["source"] == "none"
    assert "no profile was applied" in invoke("reset").stdout


def test_apply_notes_an_overriding_env_var(monkeypatch):
    monkeypatch.setenv("GEMMA_PROFILE", "cpu-32gb")
    result = invoke("apply", "t4")
    assert result.exit_code == 0
    assert "GEMMA_PROFILE=cpu-32gb" in result.stderr


def test_apply_a_path_stores_it_absolute(write_profile, tmp_path, monkeypatch):
    write_profile("mine", "description: mine\nextends: base-cpu\n", tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")
    assert invoke("apply", "mine.yaml").exit_code == 0
    stored = json.loads(state_file().read_text(encoding="utf-8"))["profile"]
    assert stored == str(tmp_path / "here" / "mine.yaml")
    monkeypatch.chdir(tmp_path)
    assert invoke_json("current")["profile"] == "mine"


@pytest.mark.parametrize("name", ["base-cuda", "nosuch"])
def test_apply_refuses_without_writing(name):
    result = invoke("apply", name)
    assert result.exit_code == 2
    assert result.stderr.startswith("gemma-profile: error:")
    assert len(result.stderr.splitlines()) == 1
    assert not state_file().exists()


def test_apply_abstract_says_so():
    assert "abstract" in invoke("apply", "base-cuda").stderr


def test_current_with_a_bad_env_profile_fails_cleanly(monkeypatch):
    monkeypatch.setenv("GEMMA_PROFILE", "nosuch")
    result = invoke("current", "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]
    assert result.stderr.startswith("gemma-profile: error:")


def test_current_with_a_corrupt_state_file_says_so_in_one_line():
    state_file().parent.mkdir(parents=True)
    state_file().write_text("{not json")
    result = invoke("current", "--json")
    assert result.exit_code == 2  # models would fail to build: not a quiet 'none'
    data = json.loads(result.stdout)
    assert (data["profile"], data["source"]) == (None, "applied")
    assert data["error"].startswith(f"{state_file()}: the applied-profile state is not the JSON this tool writes")
    assert result.stderr.splitlines() == [f"gemma-profile: error: {data['error']}"]


def test_apply_then_current_in_real_processes():
    assert gemma_profile("apply", "t4").returncode == 0
    completed = gemma_profile("current", "--json")
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["source"] == "applied"
    assert gemma_profile("reset").returncode == 0
    assert not state_file().exists()


# -- run ------------------------------------------------------------------------------------


def test_run_sets_the_profile_for_the_child():
    completed = gemma_profile(
        "run", "cpu-32gb", "--", sys.executable, "-c", "import os; print(os.environ['GEMMA_PROFILE'])"
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "cpu-32gb"


def test_run_propagates_the_exit_code():
    completed = gemma_profile("run", "cpu-32gb", "--", sys.executable, "-c", "raise SystemExit(3)")
    assert completed.returncode == 3, completed.stderr


def test_run_without_dashes_sets_the_profile_and_exit_code():
    code = "import os, sys; print(os.environ['GEMMA_PROFILE']); sys.exit(3)"
    completed = gemma_profile("run", "cpu-32gb", sys.executable, "-c", code)
    assert completed.stdout.strip() == "cpu-32gb"
    assert completed.returncode == 3, completed.stderr


def test_run_stores_a_path_as_absolute(tmp_path, write_profile):
    write_profile("mine", "description: mine\nextends: base-cpu\n", tmp_path / "here")
    code = "import os; print(os.environ['GEMMA_PROFILE'])"
    completed = subprocess.run(
        [sys.executable, "-m", "gemma_profiles.cli.main", "run", "mine.yaml", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path / "here",
        timeout=60,
    )
    assert completed.stdout.strip() == str(tmp_path / "here" / "mine.yaml"), completed.stderr


def test_run_refuses_an_abstract_profile():
    result = invoke("run", "base-cuda", sys.executable, "-c", "pass")
    assert result.exit_code == 2
    assert "abstract" in result.stderr


def test_run_unknown_command_is_one_line_and_exits_127_as_a_shell_does():
    result = invoke("run", "t4", "surely-not-a-command-xyz")
    assert result.exit_code == 127
    assert result.stderr.strip() == "gemma-profile: error: command not found: surely-not-a-command-xyz"


def test_run_a_file_that_cannot_be_run_exits_126(tmp_path):
    script = tmp_path / "not-executable.sh"
    script.write_text("echo hi\n", encoding="utf-8")
    script.chmod(0o644)
    result = invoke("run", "t4", "--", str(script))
    assert result.exit_code == 126
    assert result.stderr.strip() == f"gemma-profile: error: cannot run {script}: Permission denied"


# -- plugins ----------------------------------------------------------------------------------


def test_plugins_json_lists_the_builtins():
    rows = {row["name"]: row for row in invoke_json("plugins")}
    assert {"sources", "config", "preflight", "placement", "loading"} <= set(rows)
    assert rows["sources"]["hooks"] == ["gemma_profile_sources"]
    assert all(rows[name]["builtin"] for name in ("sources", "config", "preflight", "placement", "loading"))


def test_plugins_text_shows_blocked(monkeypatch):
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "loading")
    result = invoke("plugins")
    assert result.exit_code == 0
    assert "blocked by GEMMA_PROFILE_DISABLE_PLUGINS: loading" in result.stdout
    assert not any(line.startswith("loading ") for line in result.stdout.splitlines())


# -- no torch for read commands ------------------------------------------------------------------

NO_TORCH = textwrap.dedent(
    """
    import sys
    from gemma_profiles.cli.main import cli

    for args in (["list"], ["list", "--all", "--json"], ["show", "t4", "--variant", "9b"],
                 ["validate", sys.argv[1]], ["current"], ["plugins"]):
        try:
            cli(args, standalone_mode=False)
        except SystemExit as exc:
            assert not exc.code, (args, exc.code)
    print("torch" in sys.modules)
    """
)


@pytest.mark.parametrize("env_profile", [None, "t4"], ids=["no-profile", "GEMMA_PROFILE=t4"])
def test_read_commands_never_import_torch(env_profile, write_profile):
    good = write_profile("good", "description: fine\nextends: base-cuda\n")
    env = dict(os.environ)
    if env_profile:
        env["GEMMA_PROFILE"] = env_profile
    completed = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(good)], capture_output=True, text=True, env=env, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert "t4" in completed.stdout  # the commands really ran
    assert f"{good}: ok" in lines
    assert lines[-1] == "False", completed.stdout


# -- the small things (issue 14, section 3 item 7) ------------------------------------------------


def origin_columns(lines: list[str]) -> set[int]:
    """Where each row's "from" column (a file:line) starts."""
    return {match.start() for line in lines if (match := re.search(r"/\S+\.ya?ml:\d+", line))}


def test_show_keeps_the_from_column_aligned_past_long_values(write_profile):
    # Before: a value longer than 24 characters pushed its row's file:line out of the column.
    path = write_profile(
        "wide",
        "description: a description far longer than any column that is meant to hold a value\n"
        "hardware: {device: cuda, gpu: [Quadro P2200, Quadro P2000, GeForce GTX 1060 6GB], memory: 5GiB}\n"
        "placement: {device: cuda, max_memory: {'cuda:0': 4.5GiB, cpu: 12GiB}}\n"
        "variants:\n  7b: {placement: {offload: cpu}}\n",
    )
    result = invoke("show", str(path))
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines()[3:] if line.strip() and not line.strip().endswith(":")]
    assert len(origin_columns(rows)) == 1, result.stdout
    # The long description keeps its value whole and puts its file:line on the next line, in the column.
    described = result.stdout.splitlines().index(next(line for line in rows if "description" in line))
    assert "a description far longer than any column" in result.stdout.splitlines()[described]
    assert re.fullmatch(r" +/\S+wide\.yaml:1", result.stdout.splitlines()[described + 1])


def test_plugins_columns_are_separated_and_aligned():
    # Before: "name" was padded to 14 and the package to 24, so longer ones ran into the next column.
    from gemma_profiles.plugin import manager as plugin_module
    from gemma_profiles.plugin.manager import GemmaPluginManager

    class LongNamed:
        @gemma_profiles.hookimpl
        def gemma_profile_model_built(self, model: object, plan: object) -> None:
            return None

    manager = GemmaPluginManager(load_entry_points=False)
    manager.register(LongNamed(), "a-plugin-with-a-long-name", package="a-package-with-a-longer-name", version="10.2.3")
    plugin_module.reset_plugin_manager(manager)
    result = invoke("plugins")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["plugin", "package", "hooks"]
    hooks_at = lines[0].index("hooks")
    for line in lines[1:]:
        assert line[hooks_at - 2 : hooks_at] == "  ", line  # two spaces before the hooks column, always
        assert line[hooks_at:].startswith("gemma_profile_"), line
    long_row = next(line for line in lines if line.startswith("a-plugin-with-a-long-name "))
    assert "  a-package-with-a-longer-name 10.2.3  gemma_profile_model_built" in long_row


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["plan", "pascal-5gb", "-v", "2b"], "(described by pascal-5gb's hardware: section)"),
        (["plan", "cpu-8gb", "-v", "2b", "--here"], "(detected on this machine)"),
    ],
)
def test_plan_header_says_where_the_target_came_from(args, phrase):
    # Before: "(profile pascal-5gb hardware:)".
    result = invoke(*args)
    header = result.stdout.splitlines()[0]
    assert header.endswith(phrase), header
    assert "hardware:)" not in header


def test_no_profile_named_lists_only_concrete_profiles():
    # Before: the abstract base-cpu and base-cuda were offered as available.
    result = invoke("show", "nosuch")
    (line,) = result.stderr.splitlines()
    available = line.split("available: ", 1)[1].split(";", 1)[0].split(", ")
    assert "t4" in available and "pascal-5gb" in available
    assert not [name for name in available if name.startswith("base-")]


COMMANDS = sorted(cli.commands)  # every command registered, the GGUF and contributor ones included


def test_the_help_test_covers_the_core_commands():
    core = {"list", "show", "validate", "apply", "current", "reset", "run", "plugins", "detect", "plan", "bench"}
    assert core <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_examples(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    examples = result.stdout.split("Examples:\n", 1)
    assert len(examples) == 2, result.stdout
    assert examples[1].lstrip().startswith("gemma-profile ") or "GEMMA_PROFILE" in examples[1].split("\n")[0]
    assert f"gemma-profile {command}" in examples[1]


def test_top_level_help_has_examples():
    result = invoke("--help")
    assert "Examples:\n" in result.stdout and "gemma-profile detect" in result.stdout


@pytest.mark.parametrize("command", ["show", "plan", "bench"])
def test_show_plan_and_bench_offer_the_same_variant_list(command):
    # Before: plan listed 9 variants in its help, bench "2b, 7b, 2b-v2, 9b, 1b, ...".
    from gemma_profiles.spec.variants import VARIANTS

    result = invoke(command, "--help")
    help_text = " ".join(result.stdout.split())
    assert f"gemma variant: {', '.join(VARIANTS)}." in help_text
    args = {"show": ["t4"], "plan": ["t4"], "bench": ["t4", "--ckpt", "x"]}[command]
    refused = invoke(command, *args, "--variant", "9B")
    assert refused.exit_code == 2
    assert refused.stderr.strip() == (
        f"gemma-profile: error: unknown variant '9B' (did you mean '9b'?) (use one of {', '.join(VARIANTS)})"
    )


def test_current_refuses_an_abstract_profile_as_a_model_build_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """``GEMMA_PROFILE=base-cuda``: a model built under it is refused, so ``current`` says so (exit 2)."""
    monkeypatch.setenv("GEMMA_PROFILE", "base-cuda")
    result = CliRunner().invoke(cli, ["current"])
    assert result.exit_code == 2, result.output
    assert "GEMMA_PROFILE=base-cuda: profile 'base-cuda' is abstract" in result.output
    assert "Traceback" not in result.output
