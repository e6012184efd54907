"""GPU offload under a 5 GiB cap: gemma-profiles against accelerate, and pascal-5gb's 2b check.

Run by ``benchmarks/gpu_check.sh`` (which installs what is missing); alone::

    python benchmarks/offload_gpu.py                 # 2b shape (18 layers, 256000 vocab), 5 GiB
    python benchmarks/offload_gpu.py --dry-run       # toy size on the CPU: checks this script, no GPU

Every configuration runs in a fresh process with the CUDA allocator capped
(``torch.cuda.set_per_process_memory_fraction``) to ``--cap`` (5 GiB, a Quadro P2200):

1. *H2D bandwidth* - pinned and pageable host->device copies of 1 GiB, median of 5:
   the bound for offloaded decoding is ``bandwidth / offloaded bytes per token``.
2. *reference* - the plain model in float16, all on the GPU, no cap: the token ids.
3. *ours, offload: cpu* - a profile ``{device: cuda, offload: cpu, max_memory: {cuda:0: --budget}}``:
   the planner keeps what fits resident; the rest streams from pinned memory on a side
   stream, the next layer prefetched.  *ours, offload: disk* - the same from files.
4. *accelerate* at the same layer split (the one the planner chose): ``cpu_offload`` on
   each offloaded layer, and ``dispatch_model`` with the equivalent device map.
5. *pascal-5gb* - gemma's 2b shape with int8 weights under the ``pascal-5gb`` profile,
   capped: must run without running out of memory, and give the same token ids as the
   same profile uncapped.

Random weights: tokens are compared as ids (the test tokenizer has 128 pieces, the
model 256000 rows).  Prints a Markdown table; with ``$OUT`` set, also writes
``$OUT/offload_gpu.json``.  accelerate missing: its rows are skipped, with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import offload_common as common

GiB = 2**30


# -- workers (each in its own process) ------------------------------------------------------------


def _device(args: argparse.Namespace) -> str:
    return "cpu" if args.dry_run else "cuda"


def _cap(args: argparse.Namespace) -> None:
    import torch

    if args.dry_run or not args.cap:
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, common_parse(args.cap) / total), 0)


def common_parse(text: str) -> int:
    from gemma_profiles.units import parse_memory

    return parse_memory(text)


def _sync(args: argparse.Namespace) -> Any:
    import torch

    return (lambda: None) if args.dry_run else torch.cuda.synchronize


def _ids_only(model: Any) -> None:
    """Decode to the ids themselves: the model has more rows than the test tokenizer has pieces."""
    model.tokenizer.decode = lambda ids: " ".join(str(i) for i in ids)


def _measure(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    _ids_only(model)
    if not args.dry_run:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        seconds, text = common.timed_generate(model, _device(args), args.tokens, args.runs, _sync(args))
    peak = 0 if args.dry_run else torch.cuda.max_memory_allocated()
    return {"seconds": seconds, "text": text, "peak_allocated": peak}


def worker_bandwidth(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.dry_run:
        return {"pinned": 0.0, "pageable": 0.0}
    size = GiB
    device = torch.empty(size, dtype=torch.uint8, device="cuda")
    result = {}
    for kind, host in (
        ("pinned", torch.empty(size, dtype=torch.uint8, pin_memory=True)),
        ("pageable", torch.empty(size, dtype=torch.uint8)),
    ):
        host.fill_(1)
        times = []
        for _ in range(6):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            device.copy_(host, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        result[kind] = size / statistics.median(times[1:]) / 1e9
    return result


def worker_reference(args: argparse.Namespace) -> dict[str, Any]:
    config = common.model_config(args.tokenizer, args.layers, "float16", vocab=args.vocab)
    model = common.build(config)
    model.load_weights(args.ckpt)
    return _measure(model.to(_device(args)).eval(), args)


def ours_placement(args: argparse.Namespace, storage: str, device: str) -> str:
    """Our profile's placement: the planner splits the layers against ``--budget``."""
    key = "cuda:0" if device == "cuda" else device
    placement = f"{{device: {device}, offload: {storage}, max_memory: {{'{key}': {args.budget}}}"
    if storage == "disk":
        placement += f", offload_folder: {Path(args.folder) / 'ours-disk'}"
    if args.dry_run:  # no planner sizing against a GPU here: name the split
        placement += f", device_map: {{'{args.layers // 2}-{args.layers - 1}': {storage}}}"
    return placement + "}"


def planned_split(args: argparse.Namespace, config: Any) -> str:
    """What the planner will decide on an 80 GiB GPU for our profile (checked offline, before any worker)."""
    from gemma_profiles.planning.memory import ModelShape
    from gemma_profiles.planning.plan import Target, make_plan
    from gemma_profiles.spec.profile import load_profile

    path = Path(args.folder) / "planned.yaml"
    dry = args.dry_run
    args.dry_run = False
    try:
        path.write_text(common.profile_yaml("planned", "float16", ours_placement(args, "cpu", "cuda")))
    finally:
        args.dry_run = dry
    target = Target("cuda:0", "H100", (9, 0), 80 * GiB, 128 * GiB, source="assumed")
    plan = make_plan(load_profile(path), "2b", target=target, shape=ModelShape.of_config(config))
    verdict = plan.verdict.message if plan.verdict else "?"
    return f"layers {plan.layers}; {verdict}"


def worker_ours(args: argparse.Namespace, storage: str) -> dict[str, Any]:
    import gemma_profiles
    from gemma_profiles.engine import offload

    _cap(args)
    device = _device(args)
    folder = Path(args.folder)
    profile = folder / f"ours-{storage}.yaml"
    profile.write_text(common.profile_yaml(f"ours-{storage}", "float16", ours_placement(args, storage, device)))
    config = common.model_config(args.tokenizer, args.layers, "float16", vocab=args.vocab)
    if args.dry_run:
        os.environ["GEMMA_PROFILE_OFFLOAD_STREAM_CPU"] = "1"
    with gemma_profiles.use(str(profile)):
        model = common.build(config)
        model.load_weights(args.ckpt)
        model = model.to(device).eval()
        state = offload.offload_state(model)
        offloaded = sorted(state.layout.offloaded) if state else []
        result = _measure(model, args)
    result["offloaded"] = offloaded
    result["layer_bytes"] = common.layer_bytes(model)
    result["copied"] = state.streamer.copied if state and state.streamer else 0
    return result


def worker_accelerate(args: argparse.Namespace, how: str) -> dict[str, Any]:
    import accelerate
    import torch

    _cap(args)
    device = _device(args)
    offloaded = [int(i) for i in args.offloaded.split(",") if i]
    config = common.model_config(args.tokenizer, args.layers, "float16", vocab=args.vocab)
    model = common.build(config)
    model.load_weights(args.ckpt)
    model.eval()
    # gemma's rope tables are buffers of the top-level module: accelerate's maps place modules,
    # and naming "" would place every submodule (offloaded ones too) on the device first.
    for key, buffer in list(model._buffers.items()):
        if buffer is not None:
            model._buffers[key] = buffer.to(device)
    if how == "cpu_offload":
        # Resident parts to the GPU, then accelerate's hooks on each offloaded layer.
        for name, child in model.named_children():
            if name != "model":
                child.to(device)
        model.model.norm.to(device)
        for index, layer in enumerate(model.model.layers):
            if index in offloaded:
                accelerate.cpu_offload(layer, execution_device=torch.device(device))
            else:
                layer.to(device)
    else:
        device_map: dict[str, Any] = {"embedder": device, "model.norm": device, "sampler": device}
        device_map.update(dict.fromkeys(model._buffers, device))  # the rope tables, already moved
        for index in range(args.layers):
            device_map[f"model.layers.{index}"] = "cpu" if index in offloaded else device
        accelerate.dispatch_model(model, device_map=device_map, main_device=device)
    return _measure(model, args)


def worker_pascal(args: argparse.Namespace, capped: bool) -> dict[str, Any]:
    import gemma_profiles

    if capped:
        _cap(args)
    config = common.model_config(args.tokenizer, args.layers, "float16", vocab=args.vocab)
    config.quant = True
    profile = "pascal-5gb"
    if args.dry_run:
        profile_path = Path(args.folder) / "pascal-dry.yaml"
        profile_path.write_text(
            "name: pascal-dry\ndescription: dry run\nconfig: {dtype: float32}\nquantization: {weights: int8}\n"
            "placement: {device: cpu}\n"
        )
        profile = str(profile_path)
    with gemma_profiles.use(profile):
        model = common.build(config)
        model.load_weights(args.int8_ckpt)
        model = model.to(_device(args)).eval()
        result = _measure(model, args)
    result["dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    return result


WORKERS = {
    "bandwidth": worker_bandwidth,
    "reference": worker_reference,
    "ours-cpu": lambda a: worker_ours(a, "cpu"),
    "ours-disk": lambda a: worker_ours(a, "disk"),
    "accelerate-cpu_offload": lambda a: worker_accelerate(a, "cpu_offload"),
    "accelerate-dispatch_model": lambda a: worker_accelerate(a, "dispatch_model"),
    "pascal-5gb": lambda a: worker_pascal(a, capped=True),
    "pascal-5gb-uncapped": lambda a: worker_pascal(a, capped=False),
}


# -- the parent ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--vocab", type=int, default=256000)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cap", default="5GiB", help="the CUDA allocator's cap per process")
    parser.add_argument("--budget", default="4.5GiB", help="max_memory for the device in our profile")
    parser.add_argument("--dry-run", action="store_true", help="toy size, on the CPU")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    for hidden in ("--tokenizer", "--ckpt", "--int8-ckpt", "--folder", "--offloaded"):
        parser.add_argument(hidden, default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run and args.layers == 18:
        args.layers, args.vocab, args.tokens, args.runs = 4, 128, 4, 1
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    import torch

    try:
        import accelerate

        have_accelerate = f"accelerate {accelerate.__version__}"
    except ImportError:
        have_accelerate = ""
        print("accelerate is not importable here: its rows are skipped (see gpu_check.sh for carrying a wheel)")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --dry-run to check the script on the CPU")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="offload-gpu-", dir=os.environ.get("OFFLOAD_BENCH_DIR")) as tmp:
        folder = Path(tmp)
        args.folder = str(folder)
        tokenizer = common.tokenizer(folder / "tokenizer")
        config = common.model_config(tokenizer, args.layers, "float16", vocab=args.vocab)
        ckpt, int8_ckpt = folder / "float16.ckpt", folder / "int8.ckpt"
        weights = common.write_checkpoint(config, ckpt)
        config.quant = True
        int8_weights = common.write_checkpoint(config, int8_ckpt)
        print(
            f"model: gemma 2b shape, {args.layers} layers, vocab {args.vocab}: {common.mib(weights)} in float16, "
            f"{common.mib(int8_weights)} int8; cap {args.cap} per process, our budget {args.budget}; "
            f"torch {torch.__version__}, "
            + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)")
            + (f"; {have_accelerate}" if have_accelerate else "")
            + f"; setup {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        float_config = common.model_config(tokenizer, args.layers, "float16", vocab=args.vocab)
        print(f"our profile's split on an 80 GiB GPU: {planned_split(args, float_config)}")
        base = [
            *("--tokenizer", tokenizer, "--ckpt", str(ckpt), "--int8-ckpt", str(int8_ckpt), "--folder", str(folder)),
            *("--layers", str(args.layers), "--vocab", str(args.vocab), "--tokens", str(args.tokens)),
            *("--runs", str(args.runs), "--cap", args.cap, "--budget", args.budget),
            *(["--dry-run"] if args.dry_run else []),
        ]
        results: dict[str, dict[str, Any]] = {}

        def run(name: str, *extra: str) -> dict[str, Any]:
            began = time.perf_counter()
            results[name] = common.run_worker(Path(__file__), ["--worker", name, *base, *extra], timeout=240)
            result = results[name]
            result["wall"] = time.perf_counter() - began
            if "error" in result:
                summary = f"FAILED: {result['error']}"
            elif "seconds" in result:
                speed = common.tokens_per_second(result["seconds"], args.tokens)
                summary = f"{speed:.2f} tokens/s, peak allocated {common.mib(result['peak_allocated'])}"
            else:
                summary = ", ".join(f"{k} {result[k]:.1f} GB/s" for k in ("pinned", "pageable") if k in result)
            print(f"  {name}: {summary} ({result['wall']:.0f} s)", flush=True)
            return result

        bandwidth = run("bandwidth")
        reference = run("reference")
        ours = run("ours-cpu")
        run("ours-disk")
        offloaded = ",".join(str(i) for i in ours.get("offloaded", []))
        if have_accelerate:
            run("accelerate-cpu_offload", "--offloaded", offloaded)
            run("accelerate-dispatch_model", "--offloaded", offloaded)
        run("pascal-5gb-uncapped")
        run("pascal-5gb")
    report(args, results, bandwidth, reference, ours)


def report(
    args: argparse.Namespace,
    results: dict[str, dict[str, Any]],
    bandwidth: dict[str, Any],
    reference: dict[str, Any],
    ours: dict[str, Any],
) -> None:
    offloaded = len(ours.get("offloaded", []))
    per_token = offloaded * ours.get("layer_bytes", 0)
    pinned = bandwidth.get("pinned", 0.0)
    print()
    print(
        f"H2D bandwidth: pinned {pinned:.1f} GB/s, pageable {bandwidth.get('pageable', 0.0):.1f} GB/s; "
        f"{offloaded} of {args.layers} layers offloaded = {common.mib(per_token)} per token"
        + (f" -> bound {pinned * 1e9 / per_token:.2f} tokens/s" if per_token and pinned else "")
    )
    print()
    print("| configuration | tokens/s (median) | of the H2D bound | peak allocated | tokens = reference |")
    print("|---|---|---|---|---|")
    speeds: dict[str, float] = {}
    for name in ("reference", "ours-cpu", "ours-disk", "accelerate-cpu_offload", "accelerate-dispatch_model"):
        result = results.get(name)
        if result is None:
            continue
        if "error" in result:
            print(f"| {name} | failed: {result['error'][:150]} | | | |")
            continue
        speed = common.tokens_per_second(result["seconds"], args.tokens)
        speeds[name] = speed
        bound = f"{speed * per_token / (pinned * 1e9):.0%}" if pinned and per_token and name != "reference" else "-"
        same = "yes" if result["text"] == reference.get("text") else "NO"
        print(f"| {name} | {speed:.2f} | {bound} | {common.mib(result['peak_allocated'])} | {same} |")
    for theirs in ("accelerate-cpu_offload", "accelerate-dispatch_model"):
        if "ours-cpu" in speeds and theirs in speeds:
            print(f"\nours (offload: cpu) / {theirs}: {speeds['ours-cpu'] / speeds[theirs]:.2f}x")
    capped, uncapped = results.get("pascal-5gb", {}), results.get("pascal-5gb-uncapped", {})
    print()
    if "error" in capped:
        print(f"pascal-5gb 2b int8, capped at {args.cap}: FAILED: {capped['error']}")
    elif capped:
        same = capped.get("text") == uncapped.get("text")
        print(
            f"pascal-5gb 2b int8, capped at {args.cap}: ran, peak allocated {common.mib(capped['peak_allocated'])}, "
            f"{common.tokens_per_second(capped['seconds'], args.tokens):.2f} tokens/s, dtypes {capped['dtypes']}; "
            f"tokens = uncapped run: {'yes' if same else 'NO'}"
        )
    out = os.environ.get("OUT")
    if out:
        Path(out, "offload_gpu.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
