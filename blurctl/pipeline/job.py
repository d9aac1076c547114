"""A whole job: check every input, take the run folder, unlearn, evaluate, write results."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from blurctl.errors import BlurctlError, InputError
from blurctl.evaluate.stage import evaluate
from blurctl.pipeline.envinfo import environment
from blurctl.progress import is_main_process
from blurctl.recipe import Recipe, recipe_yaml, validate_dict
from blurctl.rundir import RunDir


def check_inputs_or_fail(recipe: Recipe) -> dict[str, str]:
    """What `validate --preflight` finds, all at once (InputError, one line each), else the
    inputs' fingerprints."""
    from blurctl.pipeline.preflight import check_inputs

    report = check_inputs(recipe)
    if report.problems:
        raise InputError("\n".join(report.problems))
    return report.inputs


def prepare_run_dir(recipe: Recipe, inputs: dict[str, str], resume: bool = False,
                    overwrite: bool = False) -> Path:
    """Check the run folder against ``--resume``/``--overwrite``, then record the recipe,
    the environment and the inputs' fingerprints in it (main process only)."""
    run_dir = RunDir(recipe.output_dir)
    if resume:
        if not run_dir.recipe.exists():
            raise InputError(f"--resume: {run_dir.path} holds no earlier run ({run_dir.recipe} "
                             "is missing)")
        before = validate_dict(run_dir.read_recipe(), str(run_dir.recipe)).model_dump()
        changed = sorted(_changed_keys(before, recipe.model_dump()))
        if changed:
            raise InputError(f"--resume: the recipe differs from {run_dir.recipe} in "
                             f"{', '.join(changed)}; resume with the same recipe")
        if run_dir.inputs.is_file():
            was = run_dir.read_json(run_dir.inputs)
            moved = sorted(k for k in set(was) | set(inputs) if was.get(k) != inputs.get(k))
            if moved:
                raise InputError(f"--resume: {', '.join(moved)} changed since the run started "
                                 f"(content fingerprints in {run_dir.inputs}); resume with the "
                                 "same inputs or start a new run")
        restored = run_dir.recover_model()
        if restored:
            print(f"note: {restored}", flush=True)
    elif earlier := run_dir.earlier_run():
        if not overwrite:
            raise InputError(f"output_dir: {run_dir.path} holds an earlier run "
                             f"({', '.join(earlier)}); pass --resume to continue it, --overwrite "
                             "to replace it, or choose another output_dir")
        run_dir.clear()
    run_dir.write_start(recipe_yaml(recipe), environment(), inputs)
    return run_dir.path


def _changed_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _changed_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False,
        reuse_from: Path | None = None) -> dict:
    """Check, then train and evaluate into ``recipe.output_dir``; the results (main process).
    ``reuse_from``: an earlier run whose base/retrained scores serve if evaluated alike."""
    from blurctl.unlearn.loop import Unlearner

    main = is_main_process()
    run_dir = Path(recipe.output_dir)
    inputs = check_inputs_or_fail(recipe) if main else {}
    with RunDir(run_dir).locked("run") if main else nullcontext():
        if main:
            prepare_run_dir(recipe, inputs, resume, overwrite)
        trainer = Unlearner(recipe, run_dir)
        try:
            model_dir = trainer.train(resume)
            if not main or not (recipe.eval.muse or recipe.eval.lm_eval):
                return {}
            results = _evaluate(recipe, model_dir, run_dir, reuse_from, trainer.release)
            trainer.log_scores(results)
            return results
        finally:
            trainer.accelerator.end_training()


def _evaluate(recipe: Recipe, model_dir: Path, run_dir: Path, reuse_from: Path | None,
              release) -> dict:
    """Free the training's memory (``release``), then evaluate the trained model; a failure
    or a signal in either says the model is safe and how to finish."""
    try:
        with _signals_raise() as received:
            release()  # the trained model, before evaluation loads models onto the device
            if received:  # arrived while a finalizer ran, which drops the exception
                raise _Signalled(received[0])
            return evaluate(recipe, str(model_dir), run_dir, reuse_from)
    except _Signalled as sig:
        stopped = BlurctlError(f"evaluation stopped by {signal.Signals(sig.signum).name} (the "
                               f"trained model is saved in {model_dir}; finish with: "
                               f"blurctl eval {run_dir})")
        stopped.exit_code = 128 + sig.signum
        raise stopped from None
    except Exception as exc:  # the model is safe; say so, in one line, whatever failed
        detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        if not isinstance(exc, BlurctlError):
            detail = f"{exc.__class__.__name__}: {detail}"
        raise BlurctlError(f"evaluation failed: {detail} (the trained model is saved in "
                           f"{model_dir}; finish with: blurctl eval {run_dir})") from None


class _Signalled(BaseException):
    """SIGINT or SIGTERM arrived; a BaseException so no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _signals_raise() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into ``_Signalled`` inside the block (main thread only). The
    signals received are also listed in what the block gets: an exception raised while
    the garbage collector runs a finalizer is dropped, so the block checks the list after
    collecting."""
    received: list[int] = []

    def handler(signum, frame) -> None:  # noqa: ARG001 (signal handler signature)
        received.append(signum)
        raise _Signalled(signum)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
