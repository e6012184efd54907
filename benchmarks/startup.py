"""What the autoload .pth costs every interpreter start, idle and with a profile armed.

    python benchmarks/startup.py [--runs 30]

For each case it runs ``python -X importtime -c pass`` ``--runs`` times and reports
medians of: the cumulative import time of ``gemma_profiles_autoload`` (what the .pth
imports, and all it does at start); the CPU time of the whole interpreter start (user
+ system: steadier than wall time on a shared machine); and that minus the baseline,
the same interpreter whose .pth imports an empty ``gemma_profiles_autoload`` instead
(put first on ``PYTHONPATH``).  It also lists any module the autoload pulled in beyond
the baseline's (goal: none).  The cases take turns, run by run.

Bytecode is cached (under a temporary ``PYTHONPYCACHEPREFIX``) as in any installed
environment, even where ``PYTHONDONTWRITEBYTECODE`` is set.  Cases: no profile;
``GEMMA_PROFILE=t4`` (armed: the finder waits for gemma); a profile applied (a state
file); a FIFO at the state path (armed, never opened).
Goals (issue 13): at most 2 ms idle, 15 ms armed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPORT = "import sys, json; print(json.dumps(sorted(sys.modules)))"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_start(env: dict[str, str]) -> tuple[float, float, list[str]]:
    """(autoload cumulative import in µs, CPU seconds, modules loaded) for one interpreter start."""
    before = _children_cpu()
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", REPORT], env=env, capture_output=True, text=True, check=True
    )
    cpu = _children_cpu() - before
    autoload = 0.0
    for line in done.stderr.splitlines():
        if line.split("|")[-1].strip() == "gemma_profiles_autoload":
            autoload = float(line.split("|")[1])
    modules: list[str] = json.loads(done.stdout)
    return autoload, cpu, modules


def measure(cases: dict[str, dict[str, str]], runs: int) -> dict[str, tuple[float, float, list[str]]]:
    """Medians per case; the cases take turns, so a machine busy for a while slows them all alike."""
    samples: dict[str, list[tuple[float, float, list[str]]]] = {label: [] for label in cases}
    for _ in range(runs):
        for label, env in cases.items():
            samples[label].append(one_start(env))
    return {
        label: (
            statistics.median(s[0] for s in runs_of) / 1000,
            statistics.median(s[1] for s in runs_of) * 1000,
            runs_of[-1][2],
        )
        for label, runs_of in samples.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gp-startup-") as tmp:
        folder = Path(tmp)
        drop = ("GEMMA_PROFILE", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")
        base = {k: v for k, v in os.environ.items() if k not in drop}
        base["GEMMA_PROFILE_STATE_DIR"] = str(folder / "none")
        # Bytecode cached as in any installed environment, kept out of the source tree.
        base["PYTHONPYCACHEPREFIX"] = str(folder / "pycache")
        applied = folder / "applied"
        applied.mkdir()
        (applied / "applied.json").write_text('{"profile": "t4"}\n', encoding="utf-8")
        fifo = folder / "fifo"
        fifo.mkdir()
        os.mkfifo(fifo / "applied.json")
        stub = folder / "stub"
        stub.mkdir()
        (stub / "gemma_profiles_autoload.py").write_text("", encoding="utf-8")

        cases = {
            "baseline": {**base, "PYTHONPATH": str(stub)},
            "no profile": base,
            "GEMMA_PROFILE=t4 (armed)": {**base, "GEMMA_PROFILE": "t4"},
            "applied (armed)": {**base, "GEMMA_PROFILE_STATE_DIR": str(applied)},
            "FIFO at the state path": {**base, "GEMMA_PROFILE_STATE_DIR": str(fifo)},
        }
        for env in cases.values():
            one_start(env)  # writes the bytecode
        results = measure(cases, args.runs)
        _, baseline_wall, baseline_modules = results.pop("baseline")
        print(f"python {sys.version.split()[0]}, {args.runs} starts per case, medians")
        print(f"baseline (empty autoload): interpreter start {baseline_wall:.1f} ms CPU")
        print(f"{'case':<26} {'autoload import':>16} {'start CPU':>10} {'vs baseline':>12}  extra modules")
        for label, (imports, wall, modules) in results.items():
            extra = sorted(set(modules) - set(baseline_modules))
            print(
                f"{label:<26} {imports:>13.3f} ms {wall:>7.1f} ms {wall - baseline_wall:>+9.1f} ms  "
                f"{', '.join(extra) or 'none'}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
