"""The ``blurctl`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from blurctl.errors import BlurctlError, InputError
from blurctl.progress import quiet_libraries
from blurctl.recipe import Recipe, RecipeError, load_recipe, recipe_yaml
from blurctl.rundir import RunDir

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


def print_table(table: Table) -> None:
    """Tables at full width in logs and pipes; at the terminal's width otherwise."""
    if not out.is_terminal:
        out.width = 160
    out.print(table)


def results_table(results: dict) -> Table:
    """Each evaluated model's metrics, with 95% intervals where they were computed."""
    from blurctl.evaluate.metrics import metric_keys, score_cell, title

    models = results.get("models", {})
    shown = [k for k in metric_keys(models.values()) if any(k in s for s in models.values())]
    table = Table(title="Evaluation (± half-width of the 95% bootstrap interval)")
    table.add_column("model")
    for k in shown:
        table.add_column(title(k), justify="right")
    for name, scores in models.items():
        table.add_row(name, *(score_cell(scores, k, intervals=True) for k in shown))
    return table


@app.command()
def validate(recipe: RecipeArg, overrides: OverridesArg = None,
             quiet: Annotated[bool, typer.Option("--quiet", "-q",
                                                 help="Print nothing on success.")] = False,
             preflight: Annotated[bool, typer.Option(
                 "--preflight", help="Also check corpora, tokenizer, model config and memory.")] = False) -> None:
    """Check a recipe and print it resolved, every default filled in.

    Examples: blurctl validate recipes/demo.yaml train.lr=1e-3
              blurctl validate recipes/muse_news.yaml --preflight
    """

    resolved = _load(recipe, overrides)
    if not quiet:
        out.print(recipe_yaml(resolved), markup=False, end="")
    if preflight:
        from blurctl.pipeline.preflight import check_inputs

        report = check_inputs(resolved)
        for note in report.notes:
            err.print(f"preflight: {note}", markup=False)
        if report.problems:
            for problem in report.problems:
                err.print(f"error: {recipe}: {problem}", markup=False)
            raise typer.Exit(InputError.exit_code)
    err.print(f"{recipe}: ok" + (" (preflight passed)" if preflight else ""))


@app.command()
def memory(recipe: RecipeArg, overrides: OverridesArg = None,
           gpu_gib: Annotated[float | None, typer.Option(
               "--gpu-gib", help="Memory of one GPU, in GiB, to check the estimate against "
                                 "(default: this machine's GPU, else its free RAM).")] = None,
           ) -> None:
    """Print the training memory estimate per device from the model's config alone.

    Nothing heavy is read: no weights, no corpora (a Hub model's config.json only). When the
    estimate does not fit, it names the options that would make it fit.
    Example: blurctl memory recipes/muse_news.yaml hardware.num_processes=1 --gpu-gib 79
    """
    from blurctl.pipeline.memory import (
        GIB,
        available_bytes,
        estimate,
        gib,
        memory_problems,
        recipe_shape,
    )

    resolved = _load(recipe, overrides)
    try:
        shape = recipe_shape(resolved)
    except BlurctlError as exc:
        _fail(exc)
    result = estimate(resolved, shape)
    table = Table(title=f"Training memory per device (estimate): {resolved.model.path}")
    for column, justify in (("part", "left"), ("GiB", "right"), ("how it is counted", "left")):
        table.add_column(column, justify=justify)
    for row in result.table():
        table.add_row(*row)
    print_table(table)
    if gpu_gib is not None:
        have, where = int(gpu_gib * GIB), "one GPU (--gpu-gib)"
    else:
        have, where = available_bytes(resolved)
    problems = memory_problems(resolved, shape, have, where)
    out.print(problems[0] if problems else
              f"fits: about {gib(result.total)} GiB of the {gib(have)} GiB in {where}",
              markup=False)


def _split_launcher_args(overrides: list[str] | None) -> tuple[list[str], list[str]]:
    """Overrides, and the launcher arguments the user put after ``--``.

    A ``section.key=value`` after ``--`` would silently go to the launcher: refused.
    """
    overrides, extra = list(overrides or []), []
    if "--" in sys.argv:
        extra = sys.argv[sys.argv.index("--") + 1:]
        if extra and overrides[-len(extra):] == extra:
            overrides = overrides[: -len(extra)]
        else:
            extra = []
    misplaced = [a for a in extra if "=" in a and not a.startswith("-")
                 and a.split("=", 1)[0].split(".")[0] in Recipe.model_fields]
    if misplaced:
        _fail(RecipeError("overrides", [f"{a!r} comes after '--', where it would go to the "
                                        "launcher; put recipe overrides before '--'"
                                        for a in misplaced]))
    return overrides, extra


@app.command()
def run(recipe: RecipeArg, overrides: OverridesArg = None,
        resume: Annotated[bool, typer.Option(
            "--resume", help="Continue from the newest checkpoint in output_dir.")] = False,
        overwrite: Annotated[bool, typer.Option(
            "--overwrite", help="Replace an earlier run in output_dir.")] = False) -> None:
    """Unlearn, evaluate and save: the whole job a recipe describes.

    With hardware.num_processes > 1 it starts itself under the launcher (accelerate
    launch on GPUs, torchrun on CPU); launcher arguments go after --.

    Examples: blurctl run recipes/demo.yaml algorithm.combiner=penalty output_dir=runs/penalty
              blurctl run recipes/muse_news.yaml -- --main_process_port 29501
    """
    import subprocess

    from blurctl.launch.launcher import launch_command, needs_launch
    from blurctl.pipeline.job import run as run_pipeline

    overrides, launcher_args = _split_launcher_args(overrides)
    resolved = _load(recipe, overrides)
    if needs_launch(resolved):
        cmd = launch_command(resolved, recipe, overrides, resume, launcher_args, sys.executable,
                             overwrite)
        err.print("launching: " + " ".join(cmd), markup=False)
        raise typer.Exit(subprocess.call(cmd))
    try:
        results = run_pipeline(resolved, resume=resume, overwrite=overwrite)
    except BlurctlError as exc:
        _fail(exc)
    if results:
        print_table(results_table(results))
        out.print(f"results: {RunDir(resolved.output_dir).results}")


@app.command("eval")
def eval_(target: Annotated[Path, typer.Argument(
              help="A run folder (evaluates its model/) or a recipe (evaluates its model).",
              show_default=False)],
          overrides: OverridesArg = None,
          model: Annotated[Path | None, typer.Option(
              help="Evaluate this checkpoint folder instead.")] = None) -> None:
    """Evaluate a run's model, a recipe's model, or any checkpoint; write results.json.

    Examples: blurctl eval runs/demo    blurctl eval recipes/demo.yaml --model runs/demo/model
    """
    from blurctl.evaluate.stage import evaluate

    if target.is_dir():
        recipe_path, out_dir = RunDir(target).recipe, target
        checkpoint = model or RunDir(target).model
    else:
        recipe_path, out_dir, checkpoint = target, None, model
    resolved = _load(recipe_path, overrides)
    if out_dir is None:
        out_dir = Path(resolved.output_dir) / ("eval" if checkpoint is None else "eval-" + checkpoint.name)
    if not (resolved.eval.muse or resolved.eval.lm_eval):
        _fail(BlurctlError("eval: the recipe asks for no evaluation (set eval.muse or eval.lm_eval)"))
    try:
        with RunDir(out_dir).locked("eval"):
            if target.is_dir() and model is None and (restored := RunDir(target).recover_model()):
                err.print(f"note: {restored}", markup=False)
            if checkpoint is not None and not (checkpoint / "config.json").is_file():
                raise BlurctlError(f"{checkpoint}: not a saved model folder (no config.json)")
            results = evaluate(resolved, str(checkpoint) if checkpoint else None, out_dir)
    except BlurctlError as exc:
        _fail(exc)
    print_table(results_table(results))
    out.print(f"results: {RunDir(out_dir).results}")


@app.command()
def report(runs: Annotated[list[Path], typer.Argument(help="Run folders to compare.",
                                                      show_default=False)],
           out_dir: Annotated[Path, typer.Option("--out", help="Where to write report.*")] = Path("report")) -> None:
    """Compare runs in one table (report.md, .csv, .json) and a forget-vs-utility plot (report.png).

    Example: blurctl report runs/blur runs/penalty --out runs/report
    """
    from blurctl.evaluate.report import to_markdown, write_report

    try:
        rows = write_report(runs, out_dir)
    except BlurctlError as exc:
        _fail(exc)
    out.print(to_markdown(rows), markup=False)
    out.print(f"report: {out_dir}/report.md, report.csv, report.json, report.png")


@app.command()
def sweep(recipe: RecipeArg,
          axes: Annotated[list[str] | None, typer.Argument(
              help="KEY=V1,V2,... axes; the grid is their product.", show_default=False)] = None,
          variants: Annotated[Path | None, typer.Option(
              help="YAML file: variant name -> list of KEY=VALUE overrides (crossed with the grid).")] = None,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs, run nothing.")] = False,
          overwrite: Annotated[bool, typer.Option(
              "--overwrite", help="Replace earlier runs in the sweep's folders.")] = False) -> None:
    """Run a grid over recipe keys (and named variants) one after another, then report them.

    Examples: blurctl sweep recipes/demo.yaml algorithm.combiner=blur,penalty train.lr=5e-4,1e-3
              blurctl sweep recipes/demo.yaml --variants benchmarks/embedded_methods.yaml
    """
    from blurctl.evaluate.report import to_markdown, write_report
    from blurctl.pipeline.sweep import expand, read_variants, run_points

    try:
        named = read_variants(variants) if variants else None
        points = expand(recipe, axes or [], variants=named)
    except RecipeError as exc:
        _fail(exc)
    for p in points:
        out.print(f"{p.name}: {' '.join(p.overrides)} -> {p.recipe.output_dir}", markup=False)
    if dry_run:
        return
    done, failed = run_points(points, overwrite, lambda i, p: err.print(
        f"[{i}/{len(points)}] {p.name}", markup=False), lambda p, exc: err.print(
        f"error: {p.name}: {exc}", markup=False))
    if done:
        root = done[0].parent
        rows = write_report(done, root)
        out.print(to_markdown(rows), markup=False)
        out.print(f"report: {root}/report.md, report.png")
    if failed:
        _fail(BlurctlError(f"sweep: {len(failed)} of {len(points)} runs failed: {', '.join(failed)}"))


@app.command()
def launch(recipe: RecipeArg, overrides: OverridesArg = None,
           slurm: Annotated[bool, typer.Option("--slurm", help="Write an sbatch script.")] = False,
           output: Annotated[Path | None, typer.Option(
               "--output", "-o", help="Script path (default: OUTPUT_DIR/launch.sbatch).")] = None,
           partition: Annotated[str | None, typer.Option(help="Slurm partition.")] = None,
           account: Annotated[str | None, typer.Option(help="Slurm account.")] = None,
           time: Annotated[str, typer.Option(help="Slurm time limit.")] = "24:00:00",
           submit: Annotated[bool, typer.Option(
               "--submit/--dry-run", help="Submit the script with sbatch (default: only write it).")] = False,
           resume: Annotated[bool, typer.Option("--resume", help="Launch with --resume.")] = False) -> None:
    """Print the launcher command for this recipe, or write (and --submit) a Slurm script.

    Nodes and GPUs per node come from hardware.num_machines and hardware.num_processes;
    with container.image each task runs inside the container (apptainer exec --nv).
    Launcher arguments go after --.
    Example: blurctl launch recipes/muse_news.yaml hardware.num_machines=2 --slurm --submit
    """
    import shlex

    from blurctl.launch.launcher import SlurmOptions, launch_command, slurm_script
    from blurctl.launch.launcher import submit as sbatch

    overrides, launcher_args = _split_launcher_args(overrides)
    resolved = _load(recipe, overrides)
    if not slurm:
        out.print(" ".join(shlex.quote(a) for a in launch_command(
            resolved, recipe, overrides, resume, launcher_args)), markup=False)
        return
    script = slurm_script(resolved, recipe, overrides,
                          SlurmOptions(partition=partition, account=account, time=time),
                          resume, launcher_args)
    run_dir = Path(resolved.output_dir)
    path = output or run_dir / "launch.sbatch"
    try:
        for folder in (run_dir, path.parent):  # Slurm opens its log in run_dir before the job runs
            folder.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
    except OSError as exc:
        _fail(InputError(f"launch: cannot write {path}: {exc.strerror or exc}"))
    if not submit:
        out.print(f"wrote {path}; submit with: sbatch {path} (or blurctl launch ... --submit)",
                  markup=False)
        return
    try:
        out.print(f"submitted batch job {sbatch(path)} ({path}); log: {run_dir}/slurm-JOBID.out",
                  markup=False)
    except BlurctlError as exc:
        _fail(exc)


@app.command()
def publish(run_dir: Annotated[Path, typer.Argument(help="An evaluated run folder.", show_default=False)],
            repo_id: Annotated[str | None, typer.Option(
                "--repo-id", help="ORG/NAME on the Hub (default: the recipe's publish.repo_id).")] = None,
            private: Annotated[bool | None, typer.Option(
                "--private/--public", help="Repository visibility (default: publish.private).")] = None,
            dry_run: Annotated[bool, typer.Option(
                "--dry-run", help="Stage the files in RUN_DIR/publish, upload nothing.")] = False) -> None:
    """Upload an evaluated run's model with a model card (eval results as model-index).

    The token comes from HF_TOKEN or the Hugging Face credential store.
    Example: blurctl publish runs/demo --repo-id my-org/demo-blur --dry-run
    """
    from blurctl.hub.publish import stage, upload

    recipe_path = RunDir(run_dir).recipe
    if not recipe_path.is_file():
        _fail(BlurctlError(f"{run_dir}: not a run folder (no {recipe_path.name})"))
    resolved = _load(recipe_path, [])
    from blurctl.recipe import check_repo_id

    repo = repo_id or resolved.publish.repo_id
    if not repo:
        _fail(InputError("publish: give --repo-id ORG/NAME (or set publish.repo_id)"))
    try:
        check_repo_id(repo)
    except ValueError as exc:
        _fail(InputError(f"publish: --repo-id: {exc}"))
    try:
        with RunDir(run_dir).locked("publish"):
            staged = stage(run_dir, repo, resolved.publish.tags)
            files = sorted(p for p in staged.iterdir() if p.is_file())
            for f in files:
                out.print(f"  {f.name}  ({f.stat().st_size:,} bytes)", markup=False)
            if dry_run:
                out.print(f"dry run: {len(files)} files staged in {staged} for {repo}; "
                          "nothing uploaded")
                return
            url = upload(staged, repo, resolved.publish.private if private is None else private)
    except BlurctlError as exc:
        _fail(exc)
    out.print(f"published: {url}")


bench_app = typer.Typer(help="The embedded benchmark.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("build")
def bench_build(dest: Annotated[Path, typer.Argument(
        help="Empty or new folder to build into.", show_default=False)]) -> None:
    """Rebuild the embedded benchmark from its seed and compare it with the shipped copy.

    Trains the tokenizer, the target and the retrained model (minutes on 2 CPU cores)
    and lists every file whose sha256 differs from the one blurctl ships.
    Example: blurctl bench build /tmp/bench
    """
    from blurctl.data.bench.build import ARTIFACTS, MANIFEST, build, compare_with_shipped

    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        _fail(BlurctlError(f"bench build: {dest} exists and is not an empty folder"))
    dest.mkdir(parents=True, exist_ok=True)
    build(dest)
    differ = compare_with_shipped(dest)
    if not differ:
        out.print(f"built {dest}: every file matches the shipped benchmark ({ARTIFACTS / MANIFEST})")
        return
    out.print(f"built {dest}: {len(differ)} files differ from the shipped benchmark "
              f"({ARTIFACTS / MANIFEST}): {', '.join(differ)}", markup=False)


def main() -> None:
    quiet_libraries()
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
