"""Command samples in README.md and docs/*.md, produced by the real CLI.

A sample is a fenced block marked ``console``; each line starting with ``$ gemma-profile``
is a command, and the lines after it (up to the next ``$`` line or the fence) are what it
prints, stdout and stderr together. A line ``...`` stands for any number of lines.

    python tests/doc_samples.py            # check every sample (what tests/test_docs.py does)
    python tests/doc_samples.py --update   # rerun every command and write its output in

Commands run in a clean environment: no GEMMA_PROFILE, no applied profile, an empty user
profile folder, so a sample shows what a fresh install prints.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```console\n(.*?)^```", flags=re.M | re.S)


@dataclass
class Sample:
    path: Path
    line: int  # of the command, 1-based
    command: str
    expected: list[str]


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def samples(path: Path) -> list[Sample]:
    text = path.read_text(encoding="utf-8")
    found: list[Sample] = []
    for block in FENCE.finditer(text):
        first_line = text.count("\n", 0, block.start(1)) + 1
        current: Sample | None = None
        for offset, line in enumerate(block.group(1).splitlines()):
            if line.startswith("$ "):
                current = Sample(path, first_line + offset, line[2:], [])
                found.append(current)
            elif current is not None:
                current.expected.append(line)
    return found


def run(command: str, home: Path) -> list[str]:
    argv = shlex.split(command)
    if argv[0] != "gemma-profile":
        raise SystemExit(f"only gemma-profile commands are checked, not {argv[0]!r}")
    executable = shutil.which("gemma-profile", path=os.path.dirname(sys.executable)) or "gemma-profile"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEMMA_PROFILE")}
    env.update(
        GEMMA_PROFILE_STATE_DIR=str(home / "state"),
        GEMMA_PROFILE_USER_DIR=str(home / "user-profiles"),
        COLUMNS="100",
        NO_COLOR="1",
    )
    done = subprocess.run(
        [executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    # Paths inside the checkout print relative to it, so a sample reads the same in any clone.
    text = (done.stdout + done.stderr).replace(f"{ROOT}{os.sep}", "")
    return [line.rstrip() for line in text.rstrip("\n").splitlines()]


def matches(expected: list[str], actual: list[str]) -> bool:
    pattern = "\n".join(".*?" if line.strip() == "..." else re.escape(line.rstrip()) for line in expected)
    return re.fullmatch(pattern, "\n".join(actual), flags=re.S) is not None


def update(path: Path, home: Path) -> int:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    changed = 0
    for sample in reversed(samples(path)):
        actual = run(sample.command, home)
        if matches(sample.expected, actual):
            continue
        start = sample.line  # index of the first output line (0-based = command line 1-based)
        lines[start : start + len(sample.expected)] = [f"{line}\n" for line in actual]
        changed += 1
    if changed:
        path.write_text("".join(lines), encoding="utf-8")
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="write each command's current output in")
    args = parser.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder)
        for path in documents():
            if args.update:
                changed = update(path, home)
                if changed:
                    print(f"{path.relative_to(ROOT)}: {changed} sample(s) rewritten")
                continue
            for sample in samples(path):
                if not matches(sample.expected, run(sample.command, home)):
                    failures += 1
                    print(f"{sample.path.relative_to(ROOT)}:{sample.line}: output of '{sample.command}' changed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
