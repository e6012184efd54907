"""Targeted mutation check: break a property on purpose, run the tests that claim it.

    python benchmarks/mutation_check.py [--only NAME ...] [--list] [--check]

Each mutation below is one textual change to one source file: the defects that an
audit found passing every test (converted weights negated, int8 scales off by 5 %,
bfloat16 accepted on a Turing card, ...). For each, the working tree is copied to a
temporary folder (the user's checkout is never touched), the change is applied there,
and the tests named beside it run against the copy. A mutation the tests catch is
*killed*; one they miss *survived* - a hole in the suite. The score is killed / total.

Every mutation's text must occur exactly once in its file, and every test file it names
must exist: before anything runs, the script checks them all and stops with one line per
*stale* mutation (the code moved: update its snippet rather than dropping it) and exit
status 2; ``--check`` does only that (tests/test_mutation_check.py runs it). Otherwise the
exit status is 0 when every mutation was killed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the root
    why: str


INT8_TESTS = ("tests/test_int8.py",)

MUTATIONS: tuple[Mutation, ...] = (
    # int8: the quantization itself (loader) and each place a scale is applied (int8.py).
    Mutation(
        "int8 stored scale x1.05",
        "gemma_profiles/engine/loading.py",
        "scaler[start : start + CHUNK_ROWS] = scale",
        "scaler[start : start + CHUNK_ROWS] = scale * 1.05",
        INT8_TESTS,
        "a 5 % scale error: cosine 0.9999, answers drift",
    ),
    Mutation(
        "int8 stored scale x2",
        "gemma_profiles/engine/loading.py",
        "scaler[start : start + CHUNK_ROWS] = scale",
        "scaler[start : start + CHUNK_ROWS] = scale * 2",
        INT8_TESTS,
        "the audit's: passed cosine >= 0.99",
    ),
    Mutation(
        "int8 step x1.05",
        "gemma_profiles/engine/loading.py",
        "amax(dim=1).clamp_(min=1e-12).div_(127.0)\n        if finite",
        "amax(dim=1).clamp_(min=1e-12).div_(127.0).mul_(1.05)\n        if finite",
        INT8_TESTS,
        "a coarser grid, q and scale consistent",
    ),
    Mutation(
        "int8 group step x1.05",
        "gemma_profiles/engine/loading.py",
        "amax(dim=2).clamp_(min=1e-12).div_(127.0)",
        "amax(dim=2).clamp_(min=1e-12).div_(127.0).mul_(1.05)",
        INT8_TESTS,
        "scales per 64 columns on a coarser grid (the AVX2 path's format)",
    ),
    Mutation(
        "int8 truncates",
        "gemma_profiles/engine/loading.py",
        "q[start : start + CHUNK_ROWS] = block.div_(scale.unsqueeze(1)).round_()",
        "q[start : start + CHUNK_ROWS] = block.div_(scale.unsqueeze(1)).trunc_()",
        INT8_TESTS,
        "rounding toward zero: a biased error",
    ),
    Mutation(
        "int8 dequantize_rows x1.05",
        "gemma_profiles/engine/loading.py",
        "scaler[rows].to(torch.float32).unsqueeze(1)\n",
        "scaler[rows].to(torch.float32).unsqueeze(1) * 1.05\n",
        INT8_TESTS,
        "an int8 checkpoint loaded into a float model",
    ),
    Mutation(
        "int8 post-scale x1.05",
        "gemma_profiles/engine/quantization.py",
        "F.linear(x, dense) * scaler.to(x.dtype)",
        "F.linear(x, dense) * scaler.to(x.dtype) * 1.05",
        INT8_TESTS,
        "float32/bfloat16 products",
    ),
    Mutation(
        "int8pack scale x1.05",
        "gemma_profiles/engine/quantization.py",
        "scaler.to(x.dtype))",
        "scaler.to(x.dtype) * 1.05)",
        INT8_TESTS,
        "torch's int8pack kernel",
    ),
    Mutation(
        "int8 dequantize_into x1.05",
        "gemma_profiles/engine/quantization.py",
        "scale = scaler.to(dense.dtype).unsqueeze(1)",
        "scale = scaler.to(dense.dtype).unsqueeze(1) * 1.05",
        INT8_TESTS,
        "float16 compute and prompts",
    ),
    Mutation(
        "int8 lookup x1.05",
        "gemma_profiles/engine/quantization.py",
        "_scaled_rows(F.embedding(x, self.weight), F.embedding(x, scaler.unsqueeze(-1)),",
        "_scaled_rows(F.embedding(x, self.weight), F.embedding(x, scaler.unsqueeze(-1)) * 1.05,",
        INT8_TESTS,
        "the int8 embedder's lookups",
    ),
    # The lean loader: every converted tensor must equal the checkpoint's values.
    Mutation(
        "loader negates converted",
        "gemma_profiles/engine/loading.py",
        "tensor = convert(tensor, stored, mapped)",
        "tensor = -convert(tensor, stored, mapped)",
        ("tests/test_loading.py::test_loaded_weights_equal_the_checkpoints",),
        "the audit's: 198 tests passed",
    ),
    Mutation(
        "loader scales converted",
        "gemma_profiles/engine/loading.py",
        "tensor = convert(tensor, stored, mapped)",
        "tensor = convert(tensor, stored, mapped) * 1.5",
        ("tests/test_loading.py::test_loaded_weights_equal_the_checkpoints",),
        "the audit's x1.5",
    ),
    # The planner's dtype rules at their edges.
    Mutation(
        "bf16 from cc 7.5",
        "gemma_profiles/planning/plan.py",
        "NATIVE_BF16 = (8, 0)",
        "NATIVE_BF16 = (7, 5)",
        ("tests/test_planner.py",),
        "the audit's: bfloat16 accepted on a T4",
    ),
    Mutation(
        "float16 for Gemma 2/3 allowed",
        "gemma_profiles/planning/plan.py",
        'if dtype.value != "float16" or allowed or not float16_unsafe(variant, family):',
        'if dtype.value != "float16" or True or not float16_unsafe(variant, family):',
        ("tests/test_planner.py",),
        "the audit's: empty text on a real Gemma 3",
    ),
    # The memory estimator against measured peaks.
    Mutation(
        "estimator: one mask fewer",
        "gemma_profiles/planning/memory.py",
        "kept = 2 if shape.sliding_window_size else 1",
        "kept = 1",
        ("tests/test_estimator_measured.py",),
        "the audit's: 352 tests passed; real gemma_pytorch only (the stand-in's mask differs)",
    ),
    Mutation(
        "estimator: MLP factor",
        "gemma_profiles/planning/memory.py",
        "mlp = 3 * batch * prefill * shape.intermediate_size * size",
        "mlp = 2 * batch * prefill * shape.intermediate_size * size",
        ("tests/test_estimator_measured.py",),
        "the audit's: 352 tests passed",
    ),
)


def _copy_tree(destination: Path) -> None:
    """The files git tracks and the untracked ones it does not ignore, as in the work tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        relative = raw.decode()
        source = ROOT / relative
        if not source.is_file():
            continue
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    # The installed package maps hooks/ and profiles/ into gemma_profiles; in the copy,
    # links make the same names resolve to the copy's folders.
    (destination / "gemma_profiles" / "hooks").symlink_to(destination / "hooks")
    (destination / "gemma_profiles" / "profiles").symlink_to(destination / "profiles")


def stale(mutations: tuple[Mutation, ...] | list[Mutation], root: Path = ROOT) -> list[str]:
    """One line per mutation that cannot run as written: its text not exactly once in its file,
    or a test file it names missing."""
    problems = []
    for mutation in mutations:
        path = root / mutation.path
        count = path.read_text(encoding="utf-8").count(mutation.old) if path.is_file() else 0
        if count != 1:
            where = "" if path.is_file() else " (no such file)"
            problems.append(
                f"stale mutation {mutation.name!r}: its text occurs {count} times in {mutation.path}{where}, "
                "expected once; update the snippet in benchmarks/mutation_check.py"
            )
        for test in mutation.tests:
            if not (root / test.split("::")[0]).is_file():
                problems.append(f"stale mutation {mutation.name!r}: no test file {test.split('::')[0]}")
    return problems


def _run(mutation: Mutation, workdir: Path) -> tuple[str, float, str]:
    target = workdir / mutation.path
    text = target.read_text(encoding="utf-8")
    target.write_text(text.replace(mutation.old, mutation.new), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(workdir), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        outcome = "survived" if done.returncode == 0 else "killed"
        tail = (done.stdout.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        outcome, tail = "killed", "timed out"
    finally:
        target.write_text(text, encoding="utf-8")
    return outcome, time.perf_counter() - start, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="names of the mutations to run")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--check", action="store_true", help="only check that every mutation's text is there")
    args = parser.parse_args()
    unknown = sorted(set(args.only or ()) - {m.name for m in MUTATIONS})
    if unknown:
        print(f"mutation_check: no mutation named {', '.join(map(repr, unknown))} (see --list)", file=sys.stderr)
        return 2
    chosen = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name:<28} {mutation.path:<32} {mutation.why}")
        return 0
    problems = stale(chosen)
    for problem in problems:
        print(f"mutation_check: {problem}", file=sys.stderr)
    if problems or args.check:
        return 2 if problems else 0
    results: list[tuple[Mutation, str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="gemma-profiles-mutants-") as folder:
        workdir = Path(folder)
        _copy_tree(workdir)
        for mutation in chosen:
            outcome, seconds, tail = _run(mutation, workdir)
            results.append((mutation, outcome, seconds, tail))
            print(f"{outcome:<9} {mutation.name:<28} {seconds:6.1f} s  {tail}", flush=True)
    killed = sum(1 for _, outcome, _, _ in results if outcome == "killed")
    print(f"score: {killed}/{len(results)} killed")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
