"""The ``blurctl`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from blurctl.errors import BlurctlError
from blurctl.recipe import Recipe, RecipeError, load_recipe, recipe_yaml

app = typer.Typer(
    help="LLM unlearning with BLUR, the bi-level unlearning method.\n\n"
         "Example: blurctl run recipes/demo.yaml train.lr=1e-3",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[list[str] | None, typer.Argument(
    help="Dot-list overrides, e.g. train.lr=1e-5 algorithm.combiner=penalty.", show_default=False)]


def _fail(exc: Exception) -> None:
    if isinstance(exc, RecipeError):
        for line in str(exc).splitlines():
            err.print(f"error: {line}", markup=False)
        raise typer.Exit(2)
    err.print(f"error: {exc}", markup=False)
    raise typer.Exit(getattr(exc, "exit_code", 1))


def _load(recipe: Path, overrides: list[str] | None) -> Recipe:
    try:
        return load_recipe(recipe, overrides or [])
    except RecipeError as exc:
        _fail(exc)
        raise  # unreachable: _fail always exits


def results_table(results: dict) -> Table:
    table = Table(title="MUSE metrics")
    cols = [("verbmem_f", "VerbMem_f ↓"), ("knowmem_f", "KnowMem_f ↓"),
            ("knowmem_r", "KnowMem_r ↑"), ("privleak", "PrivLeak →0"),
            ("privleak_auc", "AUC")]
    table.add_column("model")
    for _, title in cols:
        table.add_column(title, justify="right")
    for name, scores in results.get("muse", {}).items():
        table.add_row(name, *(f"{scores[k]:.2f}" if k in scores else "-" for k, _ in cols))
    return table


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None,
             quiet: Annotated[bool, typer.Option("--quiet", "-q",
                                                 help="Print nothing on success.")] = False) -> None:
    """Check a recipe and print it resolved, every default filled in.

    Example: blurctl validate recipes/demo.yaml train.lr=1e-3
    """
    resolved = _load(recipe, overrides)
    if not quiet:
        out.print(recipe_yaml(resolved), markup=False, end="")
    err.print(f"{recipe}: ok")


@app.command()
def run(recipe: RecipeArg, overrides: OverridesArg = None,
        resume: Annotated[bool, typer.Option(
            "--resume", help="Continue from the newest checkpoint in output_dir.")] = False) -> None:
    """Unlearn, evaluate and save: the whole job a recipe describes.

    Example: blurctl run recipes/demo.yaml algorithm.combiner=penalty output_dir=runs/penalty
    """
    from blurctl.pipeline import run as run_pipeline

    resolved = _load(recipe, overrides)
    try:
        results = run_pipeline(resolved, resume=resume)
    except BlurctlError as exc:
        _fail(exc)
    if results:
        out.print(results_table(results))
        out.print(f"results: {Path(resolved.output_dir) / 'results.json'}")


def _quiet_libraries() -> None:
    """Our own progress bars and messages replace the libraries' per-file chatter."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main() -> None:
    _quiet_libraries()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
