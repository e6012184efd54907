"""CPU offload: gemma-profiles against accelerate's ``cpu_offload`` / ``disk_offload``, same model, same budget.

Needs accelerate, for the comparison only (not a dependency of gemma-profiles)::

    pip install accelerate
    python benchmarks/offload_cpu.py                      # 2b widths x 6 layers, bfloat16
    python benchmarks/offload_cpu.py --layers 4 --runs 5 --tokens 16 --dtype float32

Every configuration runs in a fresh process: build gemma's model, load a random
checkpoint, offload *every decoder layer* (the budget: nothing but the embedder,
final norm and rope tables stays put), one warm-up, then ``--runs`` timed
``generate`` calls of ``--tokens`` greedy tokens; ``--rounds`` such processes per
configuration, the configurations taking turns (a shared machine's noise falls on
all of them alike); the median is over every timed run.  Printed: median tokens/s, the
peak RSS while generating (above the RSS before generating), whether the tokens
equal the plain model's, and the ratios ours / accelerate's.

| configuration | what |
|---|---|
| gemma | the plain model, all resident: the ceiling |
| ours cpu | ``offload: cpu`` on a CPU execution device: weights stay in RAM, hooks only |
| accelerate cpu_offload | ``cpu_offload(model.model, execution_device="cpu")`` (decoder stack; see below) |
| ours disk | ``offload: disk``: layers in files, used in place (zero-copy), next layer's pages faulted in ahead |
| accelerate disk_offload | ``disk_offload(model.model, folder, execution_device="cpu")`` |
| ours streamed | ``offload: cpu`` + ``GEMMA_PROFILE_OFFLOAD_STREAM_CPU=1``: each layer copied into a slot, |
| | the next one ahead (the GPU's code path, run on the CPU) |
| accelerate cpu_offload (whole model) | ``cpu_offload(model)``: tokens only - the tied output reads a meta weight |

accelerate is given ``model.model`` (the decoder stack): on the whole model gemma's
sampler reads ``embedder.weight`` outside the embedder's forward, where
accelerate has left it on the meta device - wrong tokens, no error.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import offload_common as common

CONFIGS = ("gemma", "ours-cpu", "accelerate-cpu", "ours-disk", "accelerate-disk", "ours-streamed", "accelerate-whole")
LABELS = {
    "gemma": "gemma, all resident",
    "ours-cpu": "ours, offload: cpu (CPU execution)",
    "accelerate-cpu": "accelerate cpu_offload(model.model)",
    "ours-disk": "ours, offload: disk",
    "accelerate-disk": "accelerate disk_offload(model.model)",
    "ours-streamed": "ours, offload: cpu, streamed through slots",
    "accelerate-whole": "accelerate cpu_offload(model)",
}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    config = common.model_config(args.tokenizer, args.layers, args.dtype)
    folder = Path(args.folder)
    baseline = common.status("VmRSS")
    name = args.worker
    if name.startswith("ours"):
        import gemma_profiles

        # Every decoder layer offloaded: the same budget as accelerate's runs.
        every = f"'0-{args.layers - 1}'"
        placement = {
            "ours-cpu": f"{{device: cpu, offload: cpu, device_map: {{{every}: cpu}}}}",
            "ours-streamed": f"{{device: cpu, offload: cpu, device_map: {{{every}: cpu}}}}",
            "ours-disk": f"{{device: cpu, offload: disk, offload_folder: {folder / name}, "
            f"device_map: {{{every}: disk}}}}",
        }[name]
        if name == "ours-streamed":
            os.environ["GEMMA_PROFILE_OFFLOAD_STREAM_CPU"] = "1"
        profile = folder / f"{name}.yaml"
        profile.write_text(common.profile_yaml(name, args.dtype, placement))
        gemma_profiles.activate(str(profile))
        model = common.build(config)
        model.load_weights(args.ckpt)
        model = model.to("cpu").eval()
    else:
        model = common.build(config)
        model.load_weights(args.ckpt)
        model = model.to("cpu").eval()
        if name != "gemma":
            import accelerate

            if name == "accelerate-cpu":
                accelerate.cpu_offload(model.model, execution_device="cpu")
            elif name == "accelerate-disk":
                accelerate.disk_offload(model.model, str(folder / name), execution_device="cpu")
            elif name == "accelerate-whole":
                accelerate.cpu_offload(model, execution_device="cpu")
    after_setup = common.status("VmRSS")
    common.reset_peak_rss()
    with torch.no_grad():
        runs = 1 if name == "accelerate-whole" else args.runs
        seconds, text = common.timed_generate(model, "cpu", args.tokens, runs)
    return {
        "seconds": seconds,
        "text": text,
        "setup_rss": after_setup - baseline,
        "generate_peak_rss": common.status("VmHWM") - baseline,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--runs", type=int, default=5, help="timed runs per process")
    parser.add_argument("--rounds", type=int, default=3, help="processes per configuration, in turn")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--only", nargs="*", choices=CONFIGS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import json

        print(json.dumps(worker(args)))
        return
    try:
        import accelerate

        have_accelerate = f"accelerate {accelerate.__version__}"
    except ImportError:
        have_accelerate = ""
        print("accelerate is not installed (pip install accelerate): its rows are skipped")
    import torch

    with tempfile.TemporaryDirectory(prefix="offload-bench-", dir=os.environ.get("OFFLOAD_BENCH_DIR")) as tmp:
        folder = Path(tmp)
        tokenizer = common.tokenizer(folder / "tokenizer")
        config = common.model_config(tokenizer, args.layers, args.dtype)
        ckpt = folder / "model.ckpt"
        weights = common.write_checkpoint(config, ckpt)
        layer = weights // args.layers  # the embedder is 128 rows: nearly all of it is layers
        print(
            f"model: gemma 2b widths x {args.layers} layers, {args.dtype}, {common.mib(weights)} of weights "
            f"(~{common.mib(layer)} per layer); {args.tokens} greedy tokens per run, median of "
            f"{args.rounds} rounds x {args.runs} runs; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
            + (f"; {have_accelerate}" if have_accelerate else "")
        )
        results: dict[str, dict[str, Any]] = {}
        names = [n for n in args.only or CONFIGS if have_accelerate or not n.startswith("accelerate")]
        # Rounds of every configuration in turn: a shared machine's noise falls on all of them alike.
        for _ in range(args.rounds):
            for name in names:
                result = common.run_worker(
                    Path(__file__),
                    [
                        *("--worker", name, "--tokenizer", tokenizer, "--ckpt", str(ckpt), "--folder", str(folder)),
                        *("--layers", str(args.layers), "--dtype", args.dtype),
                        *("--runs", str(args.runs), "--tokens", str(args.tokens)),
                    ],
                )
                merged = results.setdefault(name, result)
                if merged is not result and "seconds" in result and "seconds" in merged:
                    merged["seconds"] += result["seconds"]
                    for key in ("generate_peak_rss", "setup_rss"):
                        merged[key] = max(merged[key], result[key])
    reference = results.get("gemma", {}).get("text")
    print()
    print("| configuration | tokens/s (median) | peak RSS while generating | setup RSS | tokens = gemma's |")
    print("|---|---|---|---|---|")
    for name, result in results.items():
        if "error" in result:
            print(f"| {LABELS[name]} | failed: {result['error']} | | | |")
            continue
        speed = common.tokens_per_second(result["seconds"], args.tokens)
        same = "yes" if result["text"] == reference else f"NO ({result['text']!r})"
        shown = "-" if name == "accelerate-whole" else f"{speed:.2f}"
        print(
            f"| {LABELS[name]} | {shown} | {common.mib(result['generate_peak_rss'])} | "
            f"{common.mib(result['setup_rss'])} | {same} |"
        )
    print()
    pairs = (("ours-cpu", "accelerate-cpu"), ("ours-disk", "accelerate-disk"), ("ours-streamed", "accelerate-cpu"))
    for ours, theirs in pairs:
        a, b = results.get(ours, {}), results.get(theirs, {})
        if "seconds" in a and "seconds" in b:
            ratio = common.tokens_per_second(a["seconds"], args.tokens) / common.tokens_per_second(
                b["seconds"], args.tokens
            )
            print(f"{LABELS[ours]} / {LABELS[theirs]}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
