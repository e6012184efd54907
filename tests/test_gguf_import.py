"""``gemma-profile import`` on small GGUF files written here with the gguf package's own writer.

Each file is made from a tiny gemma_pytorch model the way llama.cpp's converter makes one
(q, k, v split, norms stored as ``1 + weight``, names ``blk.N.*``, user-defined whitespace
pieces with spaces, the turn markers typed control), so importing it must give gemma's
model back: the same config, names and shapes, the same logits (exactly, from float32), and
a tokenizer that encodes as the one the vocabulary came from. And every way a file can be
wrong is one line, exit 2. ``tests/test_real_model.py`` does the same on a real Gemma 3.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner, Result

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'gemma-profiles[gguf]')")
sp_pb2 = pytest.importorskip(
    "sentencepiece.sentencepiece_model_pb2", reason="protobuf is not installed (pip install 'gemma-profiles[gguf]')"
)

import numpy as np  # noqa: E402
import sentencepiece  # noqa: E402

from gemma_profiles.cli.main import cli  # noqa: E402
from gemma_profiles.tools import gguf_import, quality  # noqa: E402
from gemma_profiles.tools.gguf_import import GgufImportError, import_gguf, load_config  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("fresh_log_handler")]

T = gguf.GGMLQuantizationType
ARCH = {"2b": "gemma", "2b-v2": "gemma2", "1b": "gemma3"}
TURN_MARKERS = ("<start_of_turn>", "<end_of_turn>")
TEXTS = (
    "the quick cat sees the dog and the bird near the river",
    "Two  spaces,   three spaces and\n\nnew lines\ttabs",
    "<start_of_turn>user\nwhich road to the city?<end_of_turn>\n<start_of_turn>model\n",
    "numbers 12345 and ünïcödé façade, 東京 and emoji \U0001f600",
    "",
)


# -- a gemma-like tokenizer and GGUF files made as llama.cpp makes them --------------------


@pytest.fixture(scope="session")
def gemma_like_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small SentencePiece BPE model trained with gemma's settings: identity normalization, no
    dummy prefix, whitespace kept, byte fallback, gemma's special ids, user-defined turn markers,
    newline and whitespace runs."""
    from gemma_testing import _WORDS

    folder = tmp_path_factory.mktemp("gemma-like-tokenizer")
    corpus = folder / "corpus.txt"
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(_WORDS, size=rng.integers(4, 12))).capitalize() + "." for _ in range(400)]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prefix = folder / "gemma_like"
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=420,
        model_type="bpe",
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        byte_fallback=True,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=[*TURN_MARKERS, "\n", "\n\n", "\u2581\u2581", "\u2581\u2581\u2581"],
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return f"{prefix}.model"


def llama_cpp_vocab(tokenizer: str) -> tuple[list[str], list[float], list[int]]:
    """The vocabulary as llama.cpp's converter stores it: user-defined spaces pre-normalized,
    special added tokens (the turn markers, <unk>) typed control."""
    proto = sp_pb2.ModelProto.FromString(Path(tokenizer).read_bytes())
    tokens, scores, types = [], [], []
    for piece in proto.pieces:
        text, kind = piece.piece, int(piece.type)
        if kind == 4 and text in TURN_MARKERS:
            kind = 3
        elif kind == 4:
            text = text.replace("\u2581", " ")
        elif kind == 2:
            kind = 3
        tokens.append(text)
        scores.append(piece.score)
        types.append(kind)
    return tokens, scores, types


def tiny(gemma: Any, tokenizer: str, variant: str) -> Any:
    from gemma_testing import tiny_config

    config = tiny_config(gemma.config, variant, tokenizer, dtype="float32")
    if variant == "1b":
        config = dataclasses.replace(config, num_hidden_layers=7)  # the 6-layer pattern and one more
    return config


def gemma_state(gemma: Any, config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights for every parameter of gemma's model (norms around 0, as trained)."""
    from gemma_testing import write_random_checkpoint

    with torch.device("meta"):
        shapes = {n: p.shape for n, p in gemma.model.GemmaForCausalLM(config).named_parameters()}
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"gguf-state-{os.getpid()}-{seed}.ckpt"
    try:
        state = write_random_checkpoint(shapes, path, torch.float32, seed=seed)
    finally:
        path.unlink(missing_ok=True)
    for name in state:
        if name.endswith("norm.weight"):
            state[name] = state[name] * 20  # trained norms are far from 0: +1 must not be lost
    return state


def write_gguf(
    path: Path,
    config: Any,
    state: dict[str, torch.Tensor],
    tokenizer: str,
    *,
    arch: str,
    qtype: Any = None,
    drop: tuple[str, ...] = (),
    extra: dict[str, np.ndarray] | None = None,
    raw: dict[str, tuple[np.ndarray, Any]] | None = None,
    general: dict[str, str] | None = None,
) -> Path:
    """``state`` (gemma_pytorch names) as a GGUF the way llama.cpp's converter writes it."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (general or {}).items():
        writer.add_string(f"general.{key}", value)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if config.sliding_window_size is not None:
        writer.add_sliding_window(config.sliding_window_size)
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if config.attn_logit_softcapping is not None:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if config.rope_wave_length is not None:
        writer.add_rope_freq_base(float(config.rope_wave_length[gemma_global(config)]))
    tokens, scores, types = llama_cpp_vocab(tokenizer)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(False)
    tensors = dict(extra or {})
    for name, value in gguf_tensors(config, state).items():
        if name not in drop:
            tensors[name] = value
    for name, value in tensors.items():
        if raw and name in raw:
            data, kind = raw[name]
            writer.add_tensor(name, data, raw_dtype=kind)
        elif qtype is None or value.ndim == 1:
            writer.add_tensor(name, value)
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gemma_global(config: Any) -> Any:
    return next(k for k in config.rope_wave_length if k.name == "GLOBAL")


def gguf_tensors(config: Any, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """gemma_pytorch names -> llama.cpp's, q/k/v split, norms + 1."""
    gemma1 = config.architecture.name == "GEMMA_1"
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "post_attention_layernorm": "ffn_norm" if gemma1 else "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
        "self_attn.query_norm": "attn_q_norm",
        "self_attn.key_norm": "attn_k_norm",
    }
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    out: dict[str, np.ndarray] = {}
    for name, value in state.items():
        array = value.float().numpy().copy()
        if name.endswith("norm.weight"):
            array = (value.float() + 1).numpy()
        if name == "embedder.weight":
            out["token_embd.weight"] = array
        elif name == "model.norm.weight":
            out["output_norm.weight"] = array
        elif name.endswith("qkv_proj.weight"):
            layer = name.split(".")[2]
            for part, rows in zip("qkv", np.split(array, [q, q + kv]), strict=True):
                out[f"blk.{layer}.attn_{part}.weight"] = np.ascontiguousarray(rows)
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            out[f"blk.{layer}.{names[rest]}.weight"] = array
    return out


@dataclasses.dataclass
class Made:
    config: Any
    state: dict[str, torch.Tensor]
    path: Path


@pytest.fixture
def make_gguf(gemma: Any, gemma_like_tokenizer: str, tmp_path: Path) -> Callable[..., Made]:
    def make(variant: str = "1b", name: str = "model.gguf", seed: int = 0, **options: Any) -> Made:
        config = tiny(gemma, gemma_like_tokenizer, variant)
        state = gemma_state(gemma, config, seed)
        path = write_gguf(tmp_path / name, config, state, gemma_like_tokenizer, arch=ARCH[variant], **options)
        return Made(config, state, path)

    return make


def build(gemma: Any, config: Any, checkpoint: Path | None = None, state: dict[str, torch.Tensor] | None = None) -> Any:
    from gemma_testing import construct

    model = construct(gemma, config)
    if checkpoint is not None:
        model.load_weights(str(checkpoint))
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all("freqs_cis" in name for name in missing)
    return model.eval()


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="gemma-profile")


def one_line_error(result: Result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    # Progress lines may come first when the fault shows only while dequantizing (a NaN).
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("gemma-profile import: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gemma-profile: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- the round trip -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["2b", "2b-v2", "1b"])
def test_float32_import_gives_gemmas_model_back(
    gemma: Any, make_gguf: Callable[..., Made], variant: str, tmp_path: Path
):
    made = make_gguf(variant)
    result = import_gguf(made.path, tmp_path / "out")
    assert not result.reused and result.tensors > 0
    config = load_config(tmp_path / "out")
    for field in dataclasses.fields(made.config):
        ours, theirs = getattr(config, field.name), getattr(made.config, field.name)
        if field.name == "tokenizer":
            assert ours == str((tmp_path / "out" / "tokenizer.model").resolve())
        elif field.name == "attn_types" and theirs is not None:
            assert list(ours) == [theirs[i % len(theirs)] for i in range(config.num_hidden_layers)]
        elif field.name == "query_pre_attn_scalar" and theirs is None and variant != "2b":
            assert ours == config.head_dim  # gemma's default, written out
        else:
            assert ours == theirs, field.name
    checkpoint = torch.load(result.checkpoint, weights_only=True)
    assert set(checkpoint) == {"model_state_dict"}
    state = checkpoint["model_state_dict"]
    assert {n: tuple(t.shape) for n, t in state.items()} == {n: tuple(t.shape) for n, t in made.state.items()}
    assert all(t.dtype == torch.float32 for t in state.values())
    for name, tensor in state.items():
        if name.endswith("norm.weight"):  # (1 + w) - 1: the sum gemma computes is the same float
            assert torch.equal(1 + tensor, 1 + made.state[name]), name
        else:
            assert torch.equal(tensor, made.state[name]), name
    imported, original = build(gemma, config, result.checkpoint), build(gemma, made.config, state=made.state)
    ids = imported.tokenizer.encode(TEXTS[0])
    assert torch.equal(quality.teacher_forced_logits(imported, ids), quality.teacher_forced_logits(original, ids))


@pytest.mark.parametrize(
    ("qtype", "tolerance", "cosine"),
    [(T.F16, 1e-3, 0.9999), (T.BF16, 8e-3, 0.999), (T.Q8_0, 1e-2, 0.998), (T.Q5_0, 7e-2, 0.95), (T.Q4_0, 0.14, 0.85)],
)
def test_quantized_tensors_are_dequantized(
    gemma: Any, make_gguf: Callable[..., Made], tmp_path: Path, qtype: Any, tolerance: float, cosine: float
):
    made = make_gguf("1b", qtype=qtype)
    result = import_gguf(made.path, tmp_path / "out")
    assert qtype.name in result.config["source"]["tensor_types"]
    state = torch.load(result.checkpoint, weights_only=True)["model_state_dict"]
    for name, tensor in state.items():
        reference = made.state[name]
        error = float((tensor - reference).abs().max() / reference.abs().max())
        assert error <= tolerance, (name, error)
        assert not torch.equal(tensor, reference) or tensor.ndim == 1, name  # really quantized, really read back
    embedder = made.state["embedder.weight"].numpy()
    expected = gguf.quants.dequantize(gguf.quants.quantize(embedder, qtype), qtype)
    assert torch.equal(state["embedder.weight"], torch.from_numpy(np.array(expected, dtype=np.float32)))
    imported = build(gemma, load_config(tmp_path / "out"), result.checkpoint)
    original = build(gemma, made.config, state=made.state)
    ids = imported.tokenizer.encode(TEXTS[0])
    a, b = quality.teacher_forced_logits(imported, ids), quality.teacher_forced_logits(original, ids)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > cosine


def test_bfloat16_checkpoint_is_the_float32_import_rounded(make_gguf: Callable[..., Made], tmp_path: Path):
    made = make_gguf("2b-v2", qtype=T.Q8_0)
    full = torch.load(import_gguf(made.path, tmp_path / "f32").checkpoint, weights_only=True)["model_state_dict"]
    result = import_gguf(made.path, tmp_path / "bf16", dtype="bfloat16")
    half = torch.load(result.checkpoint, weights_only=True)["model_state_dict"]
    assert result.config["checkpoint_dtype"] == result.config["gemma_config"]["dtype"] == "bfloat16"
    assert all(half[n].dtype == torch.bfloat16 and torch.equal(half[n], full[n].bfloat16()) for n in full)


def test_the_rebuilt_tokenizer_encodes_as_the_original(
    make_gguf: Callable[..., Made], gemma_like_tokenizer: str, tmp_path: Path
):
    made = make_gguf("2b")
    rebuilt_path = import_gguf(made.path, tmp_path / "out").tokenizer
    original = sentencepiece.SentencePieceProcessor(model_file=gemma_like_tokenizer)
    rebuilt = sentencepiece.SentencePieceProcessor(model_file=str(rebuilt_path))
    assert rebuilt.vocab_size() == original.vocab_size()
    for role in ("bos_id", "eos_id", "pad_id", "unk_id"):
        assert getattr(rebuilt, role)() == getattr(original, role)(), role
    for text in TEXTS:
        ids = original.encode(text)
        assert rebuilt.encode(text) == ids, text
        assert rebuilt.decode(ids) == original.decode(ids) == text, text
    assert rebuilt.encode("<start_of_turn>") == [original.piece_to_id("<start_of_turn>")]
    assert rebuilt.encode("  ") == [original.piece_to_id("\u2581\u2581")]
    assert any(rebuilt.id_to_piece(i).startswith("<0x") for i in rebuilt.encode("東"))  # byte fallback


# -- up to date, forced, redone ---------------------------------------------------------------


def test_an_up_to_date_import_is_reused_and_anything_changed_redoes_it(make_gguf: Callable[..., Made], tmp_path: Path):
    made = make_gguf("1b")
    out = tmp_path / "out"
    import_gguf(made.path, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = import_gguf(made.path, out)
    assert again.reused and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert not import_gguf(made.path, out, force=True).reused
    assert not import_gguf(made.path, out, dtype="bfloat16").reused
    (out / "model.ckpt").unlink()
    assert not import_gguf(made.path, out, dtype="bfloat16").reused
    changed = make_gguf("1b", seed=1)  # same file name, other weights
    assert changed.path == made.path
    redone = import_gguf(changed.path, out, dtype="bfloat16")
    assert not redone.reused
    state = torch.load(redone.checkpoint, weights_only=True)["model_state_dict"]
    assert torch.equal(state["embedder.weight"], changed.state["embedder.weight"].bfloat16())
    files = ["config.json", "model.ckpt", "model.yaml", "tokenizer.model"]
    assert sorted(p.name for p in out.iterdir()) == files  # no temp files


def test_cli_import_reports_progress_then_the_model(make_gguf: Callable[..., Made], tmp_path: Path):
    made = make_gguf("2b-v2")
    result = invoke("import", str(made.path), str(tmp_path / "out"))
    assert result.exit_code == 0, result.stderr
    assert "gemma-profile import: " in result.stderr and "tensors" in result.stderr
    assert "imported in" in result.stdout and "gemma2, 2 layers x 64" in result.stdout
    assert "up to date" in invoke("import", str(made.path), str(tmp_path / "out")).stdout


def test_cli_generate_runs_the_imported_model(make_gguf: Callable[..., Made], tmp_path: Path):
    made = make_gguf("1b")
    assert invoke("import", str(made.path), str(tmp_path / "out")).exit_code == 0
    plain = invoke("generate", str(tmp_path / "out"), "--prompt", "the cat", "--tokens", "4")
    assert plain.exit_code == 0, plain.stderr
    assert "4 tokens" in plain.stderr and "no profile, float32" in plain.stderr
    profiled = invoke(
        "generate", str(tmp_path / "out"), "--prompt", "the cat", "--tokens", "4", "--profile", "cpu-32gb"
    )
    assert profiled.exit_code == 0, profiled.stderr
    assert "cpu-32gb, bfloat16" in profiled.stderr


# -- the profile for gemma's scripts/run.py ---------------------------------------------------


def run_py_flow(gemma: Any, variant: str, profile: Path, checkpoint: Path) -> Any:
    """run.py's calls, under ``profile``: get_model_config(variant), dtype float32 and quant set
    after it, the model built and loaded under that default dtype."""
    from gemma_profiles.runtime import session

    config = gemma.config.get_model_config(variant)
    config.dtype = "float32"
    config.quant = False
    previous = torch.get_default_dtype()
    with session.use(str(profile)):
        torch.set_default_dtype(config.get_dtype())
        try:
            model = gemma.model.GemmaForCausalLM(config)
            model.load_weights(str(checkpoint))
        finally:
            torch.set_default_dtype(previous)
    return model.eval()


@pytest.mark.parametrize("variant", ["2b", "2b-v2", "1b"])
def test_the_run_py_profile_turns_gemmas_variant_into_the_imported_model(
    gemma: Any, make_gguf: Callable[..., Made], tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
):
    # gemma's own layer forwards under the profile too (the fused ones sum in another order), so
    # the logits below can be compared bit for bit
    monkeypatch.setenv("GEMMA_PROFILE_DISABLE_PLUGINS", "fused")
    made = make_gguf(variant)
    out = tmp_path / "out"
    # run.py's float32, kept: a profile that names no dtype gets the planner's choice for this machine.
    (tmp_path / "f32.yaml").write_text("name: f32\nconfig: {dtype: float32}\n")
    result = import_gguf(made.path, out, extends=str(tmp_path / "f32.yaml"))
    assert result.profile == out / "model.yaml"  # the GGUF names no model: its file name
    run_py_variant = gguf_import.RUN_PY_VARIANTS[ARCH[variant]]
    model = run_py_flow(gemma, run_py_variant, result.profile, result.checkpoint)
    reference = build(gemma, load_config(out), result.checkpoint)
    for field in dataclasses.fields(reference.config):
        if field.name not in ("dtype", "quant"):
            assert getattr(model.config, field.name) == getattr(reference.config, field.name), field.name
    ids = reference.tokenizer.encode(TEXTS[0])
    assert model.tokenizer.encode(TEXTS[0]) == ids  # the import's tokenizer, by its absolute path
    assert torch.equal(quality.teacher_forced_logits(model, ids), quality.teacher_forced_logits(reference, ids))


def test_the_profile_is_named_after_the_model_and_extends_auto(make_gguf: Callable[..., Made], tmp_path: Path):
    general = {"basename": "gemma-3", "size_label": "270M", "name": "Gemma 3 270m"}
    made = make_gguf("1b", general=general)
    out = tmp_path / "out"
    result = import_gguf(made.path, out)
    assert result.profile == out / "gemma-3-270m.yaml"
    data = yaml.safe_load(result.profile.read_text())
    assert data["name"] == "gemma-3-270m" and data["extends"] == "auto"
    assert invoke("validate", str(result.profile)).exit_code == 0
    fields = result.config["gemma_config"]
    assert set(data["config"]) == {k for k, v in fields.items() if v is not None} - {"dtype", "quant"}
    assert data["config"]["tokenizer"] == str((out / "tokenizer.model").resolve())
    assert all(data["config"][k] == fields[k] for k in data["config"] if k != "tokenizer")
    cli = invoke("import", str(made.path), str(out), "--extends", "cpu-32gb")
    assert cli.exit_code == 0, cli.stderr
    assert "up to date" in cli.stdout and "scripts/run.py --variant 1b --ckpt " in cli.stdout
    assert f"GEMMA_PROFILE={result.profile.resolve()} " in cli.stdout
    assert yaml.safe_load(result.profile.read_text())["extends"] == "cpu-32gb"
    assert invoke("validate", str(result.profile)).exit_code == 0
    assert invoke("import", str(made.path), str(out), "--extends", "").exit_code == 0
    assert "extends" not in yaml.safe_load(result.profile.read_text())
    for general, name in (({"name": "Gemma 3 1B-IT"}, "gemma-3-1b-it"), ({}, "model"), ({"name": "¿?"}, "model")):
        made = make_gguf("1b", general=general)
        assert import_gguf(made.path, tmp_path / name).profile == tmp_path / name / f"{name}.yaml"


def test_the_profile_follows_its_folder_and_only_ours_is_replaced(make_gguf: Callable[..., Made], tmp_path: Path):
    made = make_gguf("1b")
    out = tmp_path / "out"
    first = import_gguf(made.path, out)
    stamp = first.profile.stat().st_mtime_ns
    assert import_gguf(made.path, out).profile.stat().st_mtime_ns == stamp  # up to date: not written again
    moved = tmp_path / "moved"
    out.rename(moved)
    after = import_gguf(made.path, moved)
    assert after.reused and after.profile is not None
    assert yaml.safe_load(after.profile.read_text())["config"]["tokenizer"] == str(
        (moved / "tokenizer.model").resolve()
    )
    (moved / "mine.yaml").write_text("name: mine\n")
    other = make_gguf("1b", name="other.gguf", seed=1)
    redone = import_gguf(other.path, moved)
    assert redone.profile == moved / "other.yaml"
    assert not (moved / "model.yaml").exists() and (moved / "mine.yaml").read_text() == "name: mine\n"


def test_a_model_gemmas_variant_cannot_become_gets_no_profile(gemma: Any, gemma_like_tokenizer: str, tmp_path: Path):
    config = dataclasses.replace(tiny(gemma, gemma_like_tokenizer, "2b-v2"), final_logit_softcapping=None)
    path = write_gguf(tmp_path / "m.gguf", config, gemma_state(gemma, config), gemma_like_tokenizer, arch="gemma2")
    lines: list[str] = []
    result = import_gguf(path, tmp_path / "out", progress=lines.append)
    assert result.profile is None and not list((tmp_path / "out").glob("*.yaml"))
    assert "no profile for gemma's run.py: gemma's 2b-v2 config sets final_logit_softcapping" in lines[-1]
    assert load_config(tmp_path / "out").final_logit_softcapping is None  # the import itself is whole


def test_gemmas_own_run_py_runs_the_import(gemma: Any, make_gguf: Callable[..., Made], tmp_path: Path):
    """The real scripts/run.py, unmodified, from gemma_pytorch's folder (the stand-in has none)."""
    import subprocess

    root = Path(gemma.config.__file__).resolve().parents[1]
    if not (root / "scripts" / "run.py").is_file():
        pytest.skip(f"no scripts/run.py next to this gemma ({root}): the stand-in, or an installed copy")
    made = make_gguf("1b")
    result = import_gguf(made.path, tmp_path / "out")  # extends auto: the machine's profile too
    assert result.profile is not None
    env = {**os.environ, "GEMMA_PROFILE": str(result.profile), "GEMMA_PROFILE_STATE_DIR": str(tmp_path / "state")}
    args = ["--variant", "1b", "--ckpt", str(result.checkpoint), "--prompt", "the cat", "--output_len", "3"]
    done = subprocess.run(
        [sys.executable, "scripts/run.py", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT:" in done.stdout
    log = done.stdout + done.stderr
    assert "config.num_hidden_layers: 26 -> 7" in log and "config.hidden_size: 1152 -> 64" in log
    assert (
        f"config.tokenizer: 'tokenizer/gemma3_cleaned_262144_v2.spiece.model' -> '{result.tokenizer.resolve()}'" in log
    )


# -- one line for every broken input ----------------------------------------------------------


def test_not_a_gguf(tmp_path: Path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip, not a model" * 10)
    one_line_error(invoke("import", str(path), str(tmp_path / "out")), "not a GGUF file", str(path))
    one_line_error(invoke("import", str(tmp_path / "missing.gguf"), str(tmp_path / "out")), "GGUF file not found")
    one_line_error(invoke("import", str(tmp_path), str(tmp_path / "out")), "not a file")


@pytest.mark.parametrize("keep", [0.0005, 0.5, 0.999])
def test_truncated_files(make_gguf: Callable[..., Made], tmp_path: Path, keep: float):
    made = make_gguf("1b")
    data = made.path.read_bytes()
    made.path.write_bytes(data[: max(8, int(len(data) * keep))])
    line = one_line_error(invoke("import", str(made.path), str(tmp_path / "out")), "truncated")
    assert "download or assemble it again" in line
    assert not (tmp_path / "out").exists()


def test_another_architecture(gemma: Any, gemma_like_tokenizer: str, tmp_path: Path):
    config = tiny(gemma, gemma_like_tokenizer, "2b")
    path = write_gguf(tmp_path / "llama.gguf", config, gemma_state(gemma, config), gemma_like_tokenizer, arch="llama")
    one_line_error(invoke("import", str(path), str(tmp_path / "out")), "architecture 'llama' is not a text Gemma")
    hostile = write_gguf(
        tmp_path / "x.gguf", config, gemma_state(gemma, config), gemma_like_tokenizer, arch="x\x1b[2J\ny"
    )
    line = one_line_error(invoke("import", str(hostile), str(tmp_path / "out")), "architecture 'x\\x1b[2J\\ny'")
    assert "\x1b" not in line


def test_an_unsupported_tensor_type(make_gguf: Callable[..., Made], tmp_path: Path):
    q8_1 = np.zeros((128, 2 * 40), dtype=np.uint8)  # 128 x 64 in Q8_1 (40 bytes per 32 values): not dequantized
    made = make_gguf("1b", raw={"blk.0.ffn_gate.weight": (q8_1, T.Q8_1)})
    line = one_line_error(invoke("import", str(made.path), str(tmp_path / "out")), "blk.0.ffn_gate.weight", "Q8_1")
    assert "supported: F32, F16, BF16, Q8_0" in line


def test_missing_extra_and_misshapen_tensors(make_gguf: Callable[..., Made], tmp_path: Path):
    made = make_gguf("1b", drop=("blk.3.ffn_up.weight",))
    one_line_error(invoke("import", str(made.path), str(tmp_path / "o1")), "tensor 'blk.3.ffn_up.weight' is missing")
    made = make_gguf("1b", name="untied.gguf", extra={"output.weight": np.zeros((8, 64), np.float32)})
    one_line_error(invoke("import", str(made.path), str(tmp_path / "o2")), "own output.weight")
    made = make_gguf("1b", name="extra.gguf", extra={"rope_freqs.weight": np.zeros(8, np.float32)})
    one_line_error(invoke("import", str(made.path), str(tmp_path / "o3")), "unexpected tensor 'rope_freqs.weight'")
    made = make_gguf("1b", name="nan.gguf", raw={"blk.2.attn_norm.weight": (np.full(64, np.nan, np.float32), None)})
    one_line_error(invoke("import", str(made.path), str(tmp_path / "o5")), "input_layernorm.weight has non-finite")
    made = make_gguf("1b", name="shape.gguf", raw={"blk.1.ffn_down.weight": (np.zeros((64, 64), np.float32), None)})
    one_line_error(
        invoke("import", str(made.path), str(tmp_path / "o4")), "blk.1.ffn_down.weight is 64x64, expected 64x128"
    )


def test_without_the_gguf_package(make_gguf: Callable[..., Made], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    made = make_gguf("1b")
    monkeypatch.setitem(sys.modules, "gguf", None)
    line = one_line_error(invoke("import", str(made.path), str(tmp_path / "out")), "needs the gguf package")
    assert "pip install 'gemma-profiles[gguf]'" in line


def test_bad_output_folders_and_configs(make_gguf: Callable[..., Made], tmp_path: Path):
    made = make_gguf("1b")
    (tmp_path / "a-file").write_text("x")
    one_line_error(invoke("import", str(made.path), str(tmp_path / "a-file")), "not a folder")
    with pytest.raises(GgufImportError, match=r"no config\.json here"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text('{"name": "something else"}')
    with pytest.raises(GgufImportError, match="not written by 'gemma-profile import'"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    one_line_error(invoke("generate", str(tmp_path)), "config.json cannot be read")


def test_expected_shapes_name_every_parameter_gemma_builds(gemma: Any, gemma_like_tokenizer: str):
    for variant in ARCH:
        config = tiny(gemma, gemma_like_tokenizer, variant)
        fields = {
            "architecture": config.architecture.name,
            **{
                f: getattr(config, f)
                for f in (
                    "vocab_size",
                    "hidden_size",
                    "intermediate_size",
                    "head_dim",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "num_hidden_layers",
                )
            },
        }
        with torch.device("meta"):
            model = gemma.model.GemmaForCausalLM(config)
        assert gguf_import.expected_shapes(fields) == {n: tuple(p.shape) for n, p in model.named_parameters()}
