"""gemma's real flow under profiles: against gemma_pytorch when installed, else the stand-in.

In-process tests use `gemma_profiles.use`; subprocess tests go through the
``.pth`` autoload exactly as a user's unmodified script would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import gemma_profiles
from gemma_profiles.errors import GemmaProfileError, PluginError
from gemma_profiles.plugin import manager as plugins
from gemma_profiles.runtime.gemma_info import gemma_status

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
CUDA = torch.cuda.is_available()


def build(gemma: Any, tokenizer: str, variant: str = "2b", **changes: Any) -> tuple[Any, Any]:
    """run.py's construction step on a tiny config: returns (script's config, model)."""
    from gemma_testing import tiny_config

    config = tiny_config(gemma.config, variant, tokenizer)
    config.dtype = "float32"  # run.py sets this after get_model_config
    config.quant = False
    for key, value in changes.items():
        setattr(config, key, value)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(config.get_dtype())
    try:
        model = gemma.model.GemmaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return config, model


def float_dtypes(model: Any) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.is_floating_point()}


@pytest.fixture
def cpu_profile(write_profile: Callable[..., Path]) -> Callable[..., Path]:
    def make(dtype: str = "float16", extra: str = "") -> Path:
        return write_profile(
            f"cpu-{dtype}",
            f"""
            name: cpu-{dtype}
            description: test profile
            placement: {{device: cpu}}
            config: {{dtype: {dtype}}}
            {extra}
            """,
        )

    return make


@pytest.fixture
def checkpoint(gemma: Any, tokenizer_path: str, tmp_path: Path) -> Iterator[str]:
    from gemma_testing import write_random_checkpoint

    _, model = build(gemma, tokenizer_path)
    path = tmp_path / "tiny-2b.ckpt"
    write_random_checkpoint(model, str(path), torch.float32, seed=1)
    yield str(path)


def class_dicts(gemma: Any) -> dict[str, dict[str, Any]]:
    classes = [gemma.model.GemmaForCausalLM]
    try:
        from gemma import gemma3_model

        classes.append(gemma3_model.Gemma3ForMultimodalLM)
    except ImportError:
        pass
    return {cls.__qualname__: dict(cls.__dict__) for cls in classes}


def generate(model: Any, device: Any = "cpu") -> str:
    result = model.generate("the cat sees", device, output_len=4, temperature=None)
    assert isinstance(result, str)
    return result


# -- in-process -----------------------------------------------------------------------


def test_no_profile_changes_nothing(gemma: Any, tokenizer_path: str) -> None:
    before = class_dicts(gemma)
    config, model = build(gemma, tokenizer_path)
    assert model.config is config
    assert float_dtypes(model) == {torch.float32}
    assert class_dicts(gemma) == before


def test_profile_dtype_wins_over_script_default_dtype(gemma: Any, tokenizer_path: str, cpu_profile: Any) -> None:
    with gemma_profiles.use(str(cpu_profile("float16"))):
        config, model = build(gemma, tokenizer_path)
    assert float_dtypes(model) == {torch.float16}
    assert model.config.dtype == "float16"
    assert config.dtype == "float32", "the caller's config object is not modified"
    assert torch.get_default_dtype() == torch.float32, "the default dtype is restored"


def test_profile_rewrite_is_logged_before_after(gemma: Any, tokenizer_path: str, cpu_profile: Any) -> None:
    from gemma_profiles.log import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    try:
        with gemma_profiles.use(str(cpu_profile("bfloat16"))):
            build(gemma, tokenizer_path)
    finally:
        logger.remove(sink)
    assert any(
        "[cpu-bfloat16] config.dtype: 'float32' -> 'bfloat16'" in line and "cpu-bfloat16.yaml:4" in line
        for line in lines
    )


def test_any_gemma_config_field(gemma: Any, tokenizer_path: str, cpu_profile: Any) -> None:
    extra = (
        "variants: {gemma2: {config: {attn_types: [GLOBAL, GLOBAL], final_logit_softcapping: 10.0,"
        " sliding_window_size: 4}}}"
    )
    with gemma_profiles.use(str(cpu_profile("float32", extra))):
        _, model = build(gemma, tokenizer_path, "2b-v2")
        _, gemma1 = build(gemma, tokenizer_path, "2b")
    assert [t.name for t in model.config.attn_types] == ["GLOBAL", "GLOBAL"]
    assert model.config.final_logit_softcapping == 10.0
    assert model.config.sliding_window_size == 4
    assert gemma1.config.final_logit_softcapping is None, "gemma2 overrides do not touch a gemma1 model"


def test_full_flow_matches_unpatched_gemma(gemma: Any, tokenizer_path: str, checkpoint: str, cpu_profile: Any) -> None:
    _, plain = build(gemma, tokenizer_path)
    plain.load_weights(checkpoint)
    expected = generate(plain.to("cpu").eval())
    with gemma_profiles.use(str(cpu_profile("float32"))):
        _, model = build(gemma, tokenizer_path)
        model.load_weights(checkpoint)
        assert generate(model.to("cpu").eval()) == expected
    with gemma_profiles.use(str(cpu_profile("bfloat16"))):
        _, model = build(gemma, tokenizer_path)
        model.load_weights(checkpoint)
        generate(model.to("cpu").eval())
        assert float_dtypes(model) == {torch.bfloat16}


def test_profile_device_wins_over_script_device(
    gemma: Any, tokenizer_path: str, checkpoint: str, cpu_profile: Any
) -> None:
    with gemma_profiles.use(str(cpu_profile("float32"))):
        _, model = build(gemma, tokenizer_path)
        model.load_weights(checkpoint)
        model = model.to("meta")  # the script asks for another device; the profile says cpu
        assert next(model.parameters()).device.type == "cpu"
        generate(model, device="meta")


class LoadSpy:
    """Records every ``load_weights`` that reaches the hook (the loader runs after it), and refuses it."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    @gemma_profiles.hookimpl(tryfirst=True)
    def gemma_profile_load_weights(self, model: Any, path: str, plan: Any, gemma_loader: Any) -> bool:
        self.paths.append(path)
        raise AssertionError(f"a checkpoint was read: {path}")


@pytest.fixture
def load_spy(monkeypatch: pytest.MonkeyPatch) -> LoadSpy:
    """No checkpoint may be read: the hook is watched, and ``torch.load`` refuses."""
    spy = LoadSpy()
    manager = plugins.GemmaPluginManager(load_entry_points=False)
    manager.register(spy, "load-spy")
    plugins.reset_plugin_manager(manager)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        spy.paths.append(str(args[0]) if args else "?")
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    return spy


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_pascal_5gb_stops_at_construction_without_cuda(gemma: Any, tokenizer_path: str, load_spy: LoadSpy) -> None:
    # Before: construction passed, load_weights read the whole checkpoint, and only `.to()` failed.
    with gemma_profiles.use("pascal-5gb"), pytest.raises(GemmaProfileError) as caught:
        build(gemma, tokenizer_path)
    error = caught.value
    assert error.where is not None and error.where.endswith("base-cuda.yaml:8 (extends base-cuda)")
    assert "profile 'pascal-5gb' runs the model on 'cuda', but this torch" in error.message
    assert "sees no CUDA device" in error.message
    assert "run 'gemma-profile detect': the best profile here is 'cpu-" in (error.hint or "")
    assert "\n" not in str(error) and load_spy.paths == []


def test_a_missing_device_index_stops_at_construction(
    gemma: Any, tokenizer_path: str, fake_hardware: Any, load_spy: LoadSpy, write_profile: Any
) -> None:
    from gemma_profiles.planning.hardware import CpuInfo, GpuInfo, Hardware

    t4 = GpuInfo(0, "Tesla T4", (7, 5), 15 << 30)
    fake_hardware(Hardware(CpuInfo(4, 32 << 30, 30 << 30), (t4,), cuda_version="12.6"))
    plugins.get_plugin_manager().register(load_spy, "load-spy")
    with gemma_profiles.use("t4"):
        build(gemma, tokenizer_path)  # cuda:0 is a T4 here: built
    second = write_profile("t4-second", "description: x\nextends: t4\nplacement: {device: 'cuda:1'}\n")
    with gemma_profiles.use(str(second)), pytest.raises(GemmaProfileError) as caught:
        build(gemma, tokenizer_path)
    assert caught.value.where == f"{second}:3"
    assert "runs the model on 'cuda:1', but this machine has 1 CUDA device(s): cuda:0..cuda:0" in caught.value.message
    assert "the best profile here is 't4'" in (caught.value.hint or "")
    assert load_spy.paths == []


@pytest.mark.parametrize(
    ("arch_list", "stops"),
    [(("sm_75", "sm_80", "sm_90", "sm_120"), True), (("sm_50", "sm_60", "sm_70", "sm_75"), False)],
    ids=["cuda13-torch", "cu126-torch"],
)
def test_a_torch_without_kernels_for_the_gpu_stops_at_construction(
    gemma: Any, tokenizer_path: str, fake_hardware: Any, load_spy: LoadSpy, arch_list: tuple[str, ...], stops: bool
) -> None:
    from gemma_profiles.planning.hardware import CpuInfo, GpuInfo, Hardware

    p2200 = GpuInfo(0, "Quadro P2200", (6, 1), 5 << 30)
    fake_hardware(Hardware(CpuInfo(4, 16 << 30, 14 << 30), (p2200,), cuda_version="13.0", cuda_arch_list=arch_list))
    plugins.get_plugin_manager().register(load_spy, "load-spy")
    with gemma_profiles.use("pascal-5gb"):
        if not stops:
            build(gemma, tokenizer_path)
            return
        with pytest.raises(GemmaProfileError) as caught:
            build(gemma, tokenizer_path)
    line = str(caught.value)
    assert "profile 'pascal-5gb' runs the model on 'cuda' (Quadro P2200), but this torch (built for sm_75" in line
    assert "no kernels for compute capability 6.1" in line
    assert "pip install torch --index-url https://download.pytorch.org/whl/cu126" in (caught.value.hint or "")
    assert load_spy.paths == []


def test_bench_of_a_cuda_profile_stops_before_reading_the_checkpoint(
    gemma: Any, tokenizer_path: str, checkpoint: str, load_spy: LoadSpy, fresh_log_handler: None
) -> None:
    from click.testing import CliRunner

    from gemma_profiles.cli.main import cli

    if CUDA:
        pytest.skip("checks the error on a machine without CUDA")
    args = ["bench", "pascal-5gb", "--variant", "2b", "--ckpt", checkpoint, "--tokenizer", tokenizer_path]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if "runs the model on 'cuda'" in line]
    assert len(errors) == 1 and "gemma-profile detect" in errors[0], result.stderr
    assert load_spy.paths == []


def test_family_override_for_gemma2(gemma: Any, tokenizer_path: str, fake_hardware: Any) -> None:
    from gemma_profiles.planning.hardware import CpuInfo, GpuInfo, Hardware

    fake_hardware(Hardware(CpuInfo(4, 32 << 30, 30 << 30), (GpuInfo(0, "Tesla T4", (7, 5), 15 << 30),)))
    with gemma_profiles.use("t4"):
        _, gemma2 = build(gemma, tokenizer_path, "2b-v2")
        _, gemma1 = build(gemma, tokenizer_path, "2b")
    assert float_dtypes(gemma2) == {torch.float32}, "t4 never computes Gemma 2 in float16"
    assert float_dtypes(gemma1) == {torch.float16}


def test_imported_gemma_is_patched_and_deactivate_restores_everything(gemma: Any) -> None:
    before = class_dicts(gemma)
    gemma_profiles.activate("cpu-32gb")
    patched = class_dicts(gemma)
    changed = {
        key for key, value in patched["GemmaForCausalLM"].items() if before["GemmaForCausalLM"].get(key) is not value
    }
    # Only the constructor: what a model built under a profile does differently lives in its own subclass.
    assert changed == {"__init__", "__gemma_profiles_patched__"}
    gemma_profiles.deactivate()
    after = class_dicts(gemma)
    assert after.keys() == before.keys()
    for name in before:
        assert after[name].keys() == before[name].keys()
        for key, value in before[name].items():
            assert after[name][key] is value, f"{name}.{key} not restored"


def test_failed_activation_leaves_gemma_as_it_was(gemma: Any) -> None:
    before = class_dicts(gemma)
    with pytest.raises(GemmaProfileError, match="did you mean 'pascal-5gb'"):
        gemma_profiles.activate("pascal5gb")
    gemma_profiles.deactivate()
    assert class_dicts(gemma) == before


def test_plugin_raising_fails_construction_cleanly(gemma: Any, tokenizer_path: str, cpu_profile: Any) -> None:
    class Broken:
        @gemma_profiles.hookimpl
        def gemma_profile_rewrite_config(self, rewrite: Any, plan: Any) -> None:
            raise RuntimeError("boom")

    before = class_dicts(gemma)
    manager = plugins.GemmaPluginManager(load_entry_points=False)
    manager.register(Broken(), "broken", package="broken-plugin")
    plugins.reset_plugin_manager(manager)
    try:
        with (
            gemma_profiles.use(str(cpu_profile("float16"))),
            pytest.raises(PluginError, match=r"plugin 'broken'.*boom"),
        ):
            build(gemma, tokenizer_path)
        assert torch.get_default_dtype() == torch.float32
    finally:
        plugins.reset_plugin_manager()
    assert class_dicts(gemma) == before


def test_third_party_plugin_rewrites_config(gemma: Any, tokenizer_path: str, cpu_profile: Any) -> None:
    class Window:
        @gemma_profiles.hookimpl
        def gemma_profile_rewrite_config(self, rewrite: Any, plan: Any) -> None:
            rewrite.set("rms_norm_eps", 1e-5, reason="plugin window")

    manager = plugins.GemmaPluginManager(load_entry_points=False)
    manager.register(Window(), "window")
    plugins.reset_plugin_manager(manager)
    with gemma_profiles.use(str(cpu_profile("float32"))):
        _, model = build(gemma, tokenizer_path)
    assert model.config.rms_norm_eps == 1e-5


def test_missing_checkpoint_is_a_clear_error(
    gemma: Any, tokenizer_path: str, checkpoint: str, cpu_profile: Any
) -> None:
    with gemma_profiles.use(str(cpu_profile("float32"))):
        _, model = build(gemma, tokenizer_path)
        with pytest.raises(GemmaProfileError, match="checkpoint not found"):
            model.load_weights(checkpoint + ".missing")


def test_use_restores_the_previous_profile(gemma: Any, tokenizer_path: str, cpu_profile: Any) -> None:
    gemma_profiles.activate(str(cpu_profile("float16")))
    with gemma_profiles.use(str(cpu_profile("bfloat16"))):
        _, inner = build(gemma, tokenizer_path)
    _, outer = build(gemma, tokenizer_path)
    assert float_dtypes(inner) == {torch.bfloat16}
    assert float_dtypes(outer) == {torch.float16}


# -- through the .pth autoload, in a fresh interpreter ------------------------------------


def run_flow(env: dict[str, str], tokenizer: str, ckpt: Path, *extra: str) -> dict[str, Any]:
    completed = subprocess.run(
        [
            sys.executable,
            str(HERE / "run_flow.py"),
            "--ckpt",
            str(ckpt),
            "--tokenizer",
            tokenizer,
            "--write-ckpt",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    report: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    report["stderr"] = completed.stderr
    return report


@pytest.fixture
def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GEMMA_PROFILE", None)
    return env


def test_autoload_env_var_profile(
    gemma: Any, tokenizer_path: str, tmp_path: Path, child_env: dict[str, str], cpu_profile: Any
) -> None:
    plain = run_flow(child_env, tokenizer_path, tmp_path / "a.ckpt")
    assert plain["float_param_dtypes"] == ["torch.float32"]
    child_env["GEMMA_PROFILE"] = str(cpu_profile("float16"))
    patched = run_flow(child_env, tokenizer_path, tmp_path / "b.ckpt")
    assert patched["float_param_dtypes"] == ["torch.float16"]
    assert patched["script_config_dtype"] == "float32"
    assert isinstance(patched["result"], str)
    assert "config.dtype: 'float32' -> 'float16'" in patched["stderr"]


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without CUDA")
def test_autoload_pascal_5gb(gemma: Any, tokenizer_path: str, tmp_path: Path, child_env: dict[str, str]) -> None:
    report = run_flow({**child_env, "GEMMA_PROFILE": "pascal-5gb"}, tokenizer_path, tmp_path / "p.ckpt")
    assert "param_dtypes" not in report, "stopped at construction"
    assert not (tmp_path / "p.ckpt").exists(), "no weight was written or read"
    assert "runs the model on 'cuda'" in report["error"] and "gemma-profile detect" in report["error"]


def test_apply_off_and_reset(
    gemma: Any, tokenizer_path: str, tmp_path: Path, child_env: dict[str, str], cpu_profile: Any
) -> None:
    cli = [sys.executable, "-m", "gemma_profiles.cli.main"]
    subprocess.run([*cli, "apply", str(cpu_profile("bfloat16"))], env=child_env, check=True, capture_output=True)
    assert run_flow(child_env, tokenizer_path, tmp_path / "c.ckpt")["float_param_dtypes"] == ["torch.bfloat16"]
    assert run_flow({**child_env, "GEMMA_PROFILE": "off"}, tokenizer_path, tmp_path / "d.ckpt")[
        "float_param_dtypes"
    ] == ["torch.float32"]
    env_wins = run_flow(
        {**child_env, "GEMMA_PROFILE": str(cpu_profile("float16"))}, tokenizer_path, tmp_path / "e.ckpt"
    )
    assert env_wins["float_param_dtypes"] == ["torch.float16"]
    subprocess.run([*cli, "reset"], env=child_env, check=True, capture_output=True)
    assert run_flow(child_env, tokenizer_path, tmp_path / "f.ckpt")["float_param_dtypes"] == ["torch.float32"]


def test_bad_env_value_fails_at_construction_not_at_startup(
    gemma: Any, tokenizer_path: str, tmp_path: Path, child_env: dict[str, str]
) -> None:
    child_env["GEMMA_PROFILE"] = "pascal5gb"
    startup = subprocess.run([sys.executable, "-c", "pass"], env=child_env, capture_output=True, text=True)
    assert startup.returncode == 0 and startup.stderr == ""
    report = run_flow(child_env, tokenizer_path, tmp_path / "g.ckpt")
    assert "GEMMA_PROFILE='pascal5gb'" in report["error"]
    assert "did you mean 'pascal-5gb'" in report["error"]
    assert "t4" in report["error"], "the available profiles are listed"
    assert "param_dtypes" not in report, "nothing was built unpatched"


def test_uncaught_profile_error_ends_in_its_type_and_one_line(
    tokenizer_path: str, child_env: dict[str, str], gemma: Any
) -> None:
    """The program's sys.excepthook is its own: Python reports our error, whose type and text are the interface."""
    child_env["GEMMA_PROFILE"] = "pascal5gb"
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
        "from gemma_testing import tiny_config\n"
        "from gemma import config, model\n"
        f"model.GemmaForCausalLM(tiny_config(config, '2b', {tokenizer_path!r}))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True)
    assert completed.returncode == 1
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("gemma_profiles.errors.ProfileNotFoundError: GEMMA_PROFILE='pascal5gb': no profile named")


def test_autoload_is_inert_without_a_profile(child_env: dict[str, str]) -> None:
    modules = ("gemma_profiles_autoload", "gemma_profiles", "torch", "yaml", "pydantic")
    code = f"import sys; print(json.dumps([m for m in {modules!r} if m in sys.modules]))"
    completed = subprocess.run(
        [sys.executable, "-c", "import json; " + code], env=child_env, capture_output=True, text=True, check=True
    )
    assert json.loads(completed.stdout) == ["gemma_profiles_autoload"], "the .pth ran, and imported nothing heavy"


def _real_run_py() -> Path | None:
    status = gemma_status()
    if status.kind != "gemma_pytorch" or status.location is None:
        return None
    script = Path(status.location).parent / "scripts" / "run.py"
    return script if script.is_file() else None


@pytest.mark.skipif(_real_run_py() is None, reason="needs google/gemma_pytorch's own scripts/run.py")
def test_gemma_run_py_unmodified(
    gemma: Any, tokenizer_path: str, tmp_path: Path, write_profile: Any, child_env: dict[str, str]
) -> None:
    """gemma's own scripts/run.py, unmodified; the profile shrinks the model and picks float16."""
    from gemma_testing import write_random_checkpoint

    profile = write_profile(
        "tiny-run",
        f"""
        name: tiny-run
        description: gemma's 2b shrunk to a few thousand weights, float16 on the CPU
        placement: {{device: cpu}}
        config:
          dtype: float16
          vocab_size: 128
          hidden_size: 64
          intermediate_size: 128
          num_hidden_layers: 2
          num_attention_heads: 4
          num_key_value_heads: 1
          head_dim: 16
          max_position_embeddings: 64
          tokenizer: {tokenizer_path}
        """,
    )
    with gemma_profiles.use(str(profile)):
        _, model = build(gemma, tokenizer_path)
    ckpt = tmp_path / "tiny.ckpt"
    write_random_checkpoint(model, str(ckpt), torch.float32)
    child_env["GEMMA_PROFILE"] = str(profile)
    completed = subprocess.run(
        [
            sys.executable,
            str(_real_run_py()),
            f"--ckpt={ckpt}",
            "--variant=2b",
            "--device=cpu",
            "--output_len=3",
            "--prompt=the cat",
        ],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "RESULT:" in completed.stdout
    assert "config.dtype: 'float32' -> 'float16'" in completed.stderr
    assert "config.hidden_size: 3072 -> 64" not in completed.stderr  # 2b is 2048 wide
    assert "config.hidden_size: 2048 -> 64" in completed.stderr
