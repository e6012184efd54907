"""``gemma-profile new`` and ``schema``: the contributor's commands."""

from __future__ import annotations

from pathlib import Path

import click

from gemma_profiles.cli.common import echo
from gemma_profiles.errors import GemmaProfileError


@click.command(
    "new",
    epilog="\b\nExamples:\n  gemma-profile new my-rig --from-detect\n"
    "  gemma-profile new rtx2060-6gb --extends t4 -o ./rtx2060-6gb.yaml",
)
@click.argument("name")
@click.option("--from-detect", is_flag=True, help="Describe this machine: detected facts and the planner's choices.")
@click.option(
    "--extends", "extends", metavar="BASE", help="Profile to extend (with --from-detect: base-cuda/base-cpu)."
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="File to write (default: NAME.yaml in the user folder)."
)
@click.option("--force", is_flag=True, help="Replace the file if it exists.")
def new(name: str, from_detect: bool, extends: str | None, output: str | None, force: bool) -> None:
    """Write a profile NAME for a machine, validate it, and print the next commands."""
    from gemma_profiles.planning.new_profile import check_name, profile_text, template_text, write_new
    from gemma_profiles.planning.plan import profile_problems
    from gemma_profiles.settings import user_dir
    from gemma_profiles.spec.registry import default_registry

    problem = check_name(name)
    if problem:
        raise GemmaProfileError(f"cannot name a profile '{name}': {problem}")
    if not from_detect and not extends:
        raise GemmaProfileError(
            "say where the values come from",
            hint="--from-detect describes this machine; --extends BASE starts from another profile",
        )
    registry = default_registry()
    if extends:
        registry.find(extends)  # one line naming the profiles there are, when BASE is none of them
    if output:
        path = Path(output).expanduser()
        if path.suffix not in (".yaml", ".yml") or path.stem != name:
            raise GemmaProfileError(
                f"-o {output}: the file must be named {name}.yaml (a profile's name is its file name)"
            )
    else:
        folder = user_dir()
        if folder is None:
            raise GemmaProfileError("no user profile folder here", hint="give the file with -o PATH")
        path = folder / f"{name}.yaml"
    if from_detect:
        from gemma_profiles.plugin.manager import detect_hardware

        text = profile_text(name, detect_hardware(), extends=extends)
    else:
        assert extends is not None
        text = template_text(name, extends)
    try:
        write_new(path, text, force=force)
    except FileExistsError:
        raise GemmaProfileError(f"{path} exists", hint="--force replaces it; -o writes elsewhere") from None
    except OSError as exc:
        raise GemmaProfileError(f"cannot write {path}: {exc.strerror or exc}") from None
    echo(f"wrote {path}")
    problems = profile_problems(path, registry.resolve_extends, cache=registry.resolved)
    if problems:
        for found in problems:
            echo(f"  {found}", err=True)
        raise GemmaProfileError(f"{path} does not validate (above); edit it, then 'gemma-profile validate {path}'")
    reference = name if not output else str(path)
    echo("  it validates. Next:")
    echo(f"    gemma-profile show {reference}")
    echo(f"    gemma-profile plan {reference} --variant 2b       # or any variant: does it fit, and how")
    echo(f"    GEMMA_PROFILE={reference} python your_script.py")
    echo("  to share it: CONTRIBUTING.md (a pull request, or a profile pack)")


@click.command(
    "schema",
    epilog="\b\nExamples:\n  gemma-profile schema > profile.schema.json\n  gemma-profile schema --path",
)
@click.option("--path", "show_path", is_flag=True, help="Print where the installed schema file is instead.")
def schema_command(show_path: bool) -> None:
    """Print the JSON Schema of profile files (for editors: VS Code, Neovim through yaml-language-server)."""
    from gemma_profiles.planning.new_profile import schema_json, shipped_schema

    if show_path:
        click.echo(str(shipped_schema()))
        return
    click.echo(schema_json(), nl=False)
