"""What the autoload .pth costs at interpreter start, with and without a profile.

    python benchmarks/startup.py [--runs 30]

Runs ``python -X importtime -c pass`` repeatedly and reports the median
cumulative import time of ``gemma_profiles_autoload`` (what the .pth imports),
and the median wall time of the whole interpreter start, for: no profile, and
``GEMMA_PROFILE=t4`` (armed: the import hook is installed, YAML is not read yet).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def autoload_us(env: dict[str, str]) -> tuple[float, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    for line in done.stderr.splitlines():
        if line.split("|")[-1].strip() == "gemma_profiles_autoload":
            return float(line.split("|")[1]), wall
    raise SystemExit("gemma_profiles_autoload was not imported: is gemma-profiles installed here?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if k != "GEMMA_PROFILE"}
    base.setdefault("GEMMA_PROFILE_STATE_DIR", "/nonexistent-gemma-profiles-state")
    print(f"{'case':<28} {'autoload import':>16} {'interpreter start':>18}")
    for label, env in (("no profile", base), ("GEMMA_PROFILE=t4 (armed)", {**base, "GEMMA_PROFILE": "t4"})):
        samples = [autoload_us(env) for _ in range(args.runs)]
        imports = statistics.median(s[0] for s in samples) / 1000
        wall = statistics.median(s[1] for s in samples) * 1000
        print(f"{label:<28} {imports:>13.2f} ms {wall:>15.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
