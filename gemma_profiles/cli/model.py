"""``gemma-profile import`` and ``generate``: a GGUF into gemma_pytorch's format, and a run of it."""

from __future__ import annotations

import shlex

import click

from gemma_profiles.cli.common import emit_json, load_any


@click.command(
    "import",
    epilog="\b\nExamples:\n  gemma-profile import gemma-3-270m-q4_k_m.gguf ~/models/gemma-3-270m\n"
    "  gemma-profile import model.gguf ./out --dtype bfloat16 --json",
)
@click.argument("gguf_file", metavar="GGUF", type=click.Path())
@click.argument("directory", metavar="DIR", type=click.Path())
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Checkpoint dtype: float32 keeps every dequantized value exactly; bfloat16 halves the file.",
)
@click.option("--force", is_flag=True, help="Import again even when DIR is up to date with GGUF.")
@click.option(
    "--extends",
    default="auto",
    show_default=True,
    metavar="PROFILE",
    help="What DIR/<model>.yaml (the profile for gemma's scripts/run.py) extends; '' for nothing.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def import_command(gguf_file: str, directory: str, dtype: str, force: bool, extends: str, as_json: bool) -> None:
    """Turn a Gemma GGUF into DIR/model.ckpt, DIR/tokenizer.model and DIR/config.json for gemma_pytorch,
    and DIR/<model>.yaml, a profile with which gemma's own scripts/run.py runs it."""
    from gemma_profiles.tools.gguf_import import RUN_PY_VARIANTS, import_gguf

    def progress(line: str) -> None:
        click.echo(f"gemma-profile import: {line}", err=True)

    result = import_gguf(
        gguf_file, directory, dtype=dtype, force=force, progress=None if as_json else progress, extends=extends or None
    )
    variant = RUN_PY_VARIANTS[result.config["source"]["architecture"]]
    if as_json:
        emit_json(
            {
                "directory": str(result.directory),
                "reused": result.reused,
                "seconds": result.seconds,
                "profile": str(result.profile) if result.profile else None,
                "run_py_variant": variant,
                **result.config,
            }
        )
        return
    fields, source = result.config["gemma_config"], result.config["source"]
    shape = (
        f"{source['architecture']}, {fields['num_hidden_layers']} layers x {fields['hidden_size']}, "
        f"vocab {fields['vocab_size']}, {'/'.join(source['tensor_types'])} -> {result.config['checkpoint_dtype']}"
    )
    verb = "up to date" if result.reused else f"imported in {result.seconds:.1f} s"
    click.echo(f"{result.directory}: {verb} ({shape})")
    click.echo(f"  run it: gemma-profile generate {shlex.quote(directory)} --prompt 'The capital of France is'")
    if result.profile is not None:
        folder = result.directory.resolve()
        click.echo(
            f"  or from gemma_pytorch's folder: GEMMA_PROFILE={shlex.quote(str(result.profile.resolve()))} python"
            f" scripts/run.py --variant {variant} --ckpt {shlex.quote(str(folder / 'model.ckpt'))}"
            " --prompt 'The capital of France is'"
        )


@click.command(
    "generate",
    epilog="\b\nExamples:\n  gemma-profile generate ~/models/gemma-3-270m --prompt 'The capital of France is'\n"
    "  gemma-profile generate ./out --profile cpu-8gb --tokens 64",
)
@click.argument("directory", metavar="DIR", type=click.Path())
@click.option("--prompt", default="The capital of France is", show_default=True)
@click.option("--tokens", type=click.IntRange(min=1), default=32, show_default=True, help="Tokens to generate.")
@click.option("--profile", help="Profile name, path or 'auto' (default: the active one, if any).")
@click.option(
    "--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Compute dtype (default: the checkpoint's)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (the text, timings, peak RSS).")
def generate(directory: str, prompt: str, tokens: int, profile: str | None, dtype: str | None, as_json: bool) -> None:
    """Greedy generation from a 'gemma-profile import' folder with gemma_pytorch (and a profile)."""
    from gemma_profiles.runtime.gemma_info import require_gemma_pytorch
    from gemma_profiles.tools.bench import _host_peak as peak_rss  # VmHWM: the process's peak resident memory
    from gemma_profiles.tools.gguf_import import generate_text

    require_gemma_pytorch()
    chosen = load_any(profile) if profile else None
    result = generate_text(directory, prompt, tokens=tokens, profile=chosen, dtype=dtype)
    result["peak_rss"] = peak_rss()
    if as_json:
        emit_json(result)
        return
    click.echo(result["text"])
    memory = f", peak RSS {result['peak_rss'] / 2**30:.2f} GiB" if result["peak_rss"] else ""
    click.echo(
        f"gemma-profile generate: {result['tokens']} tokens, {result['tokens_per_s']:.1f} tokens/s after the"
        f" prompt (load {result['load_s']:.1f} s, prompt {result['prompt_tokens']} tokens in"
        f" {result['prefill_s']:.2f} s{memory}; {result['profile'] or 'no profile'}, {result['dtypes']})",
        err=True,
    )
