"""The run folder: its layout and every read and write of it (``RunDir``), its lock, and
the recovery of an interrupted final save.

One process at a time writes a run folder: ``locked`` takes an exclusive ``flock`` on
``RUN/.blurctl.lock`` (released by the kernel when its holder dies, so a killed run's
lock is taken over) and records who holds it, so a second run, eval or publish into
the same folder is refused with the holder's name.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from blurctl.errors import InputError

RECIPE = "recipe.yaml"
ENVIRONMENT = "environment.json"
INPUTS = "inputs.json"
LOG = "train_log.jsonl"
MODEL = "model"
ADAPTER = "adapter"  # LoRA runs: the adapter beside the merged model
CHECKPOINTS = "checkpoints"
EPOCHS = "epochs"
REFERENCE_LOGPS = "reference_logps.pt"  # train.precompute_reference's log pi_ref per chunk
TRACKING = "tracking"  # files of the experiment trackers that write any (TensorBoard)
RESULTS = "results.json"
EXAMPLES = "eval_examples.json"
LOCK = ".blurctl.lock"
# What an earlier run leaves; a new run into a folder holding any of them needs
# --resume (continue it) or --overwrite (replace it).
RUN_OUTPUTS = (RECIPE, LOG, MODEL, ADAPTER, CHECKPOINTS, EPOCHS, RESULTS, EXAMPLES, INPUTS,
               ENVIRONMENT, TRACKING, REFERENCE_LOGPS)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def locked(run_dir: Path, command: str) -> Iterator[None]:
    """Hold the run folder's lock for the block; InputError if another process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise InputError(f"output_dir: {run_dir} is in use by {holder}; wait for it to "
                             "finish or choose another output_dir") from None
        before = os.pread(fd, 4096, 0).decode(errors="replace").split()
        if len(before) > 1 and before[0] == "pid" and before[1].isdigit() \
                and not _pid_alive(int(before[1])):
            print(f"note: {run_dir}: taking over the lock of process {before[1]}, which no "
                  "longer runs", flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} (blurctl {command}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def earlier_run(run_dir: Path) -> list[str]:
    """The outputs of an earlier run that ``run_dir`` holds."""
    return [name for name in RUN_OUTPUTS if (run_dir / name).exists()]


def clear(run_dir: Path) -> None:
    """Remove an earlier run's outputs (``--overwrite``); other files stay."""
    for name in (*RUN_OUTPUTS, *(f".{n}.{s}" for n in (MODEL, ADAPTER) for s in ("tmp", "old"))):
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def recover_model(run_dir: Path) -> str | None:
    """Finish a final save that was interrupted between its two renames.

    ``save_model_atomically`` writes ``.model.tmp`` completely, moves ``model`` to
    ``.model.old``, then ``.model.tmp`` to ``model``. Killed in between, the folder has
    no ``model`` but a complete copy: put it back. Returns what was done, or None.
    """
    target = run_dir / MODEL
    if (target / "config.json").is_file():
        (target / ".complete").unlink(missing_ok=True)  # killed after the last rename
        return None
    tmp, old = run_dir / f".{MODEL}.tmp", run_dir / f".{MODEL}.old"
    # the new model if it was completely written, else the previous one
    for candidate, complete in ((tmp, tmp / ".complete"), (old, old / "config.json")):
        if complete.is_file():
            if target.exists():
                shutil.rmtree(target)
            os.replace(candidate, target)
            (target / ".complete").unlink(missing_ok=True)
            return f"restored {target} from {candidate} (the final save had been interrupted)"
    return None


class RunDir:
    """A run folder: where each output lives and how it is read and written.

    Files: ``recipe.yaml`` (the resolved recipe), ``environment.json``, ``inputs.json``
    (content fingerprints), ``train_log.jsonl``, ``model/``, ``adapter/`` (LoRA),
    ``checkpoints/step-N/``, ``epochs/epoch-N/`` (LoRA: and ``epochs/epoch-N-adapter/``),
    ``tracking/``, ``results.json``, ``eval_examples.json``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    recipe = property(lambda self: self.path / RECIPE)
    environment = property(lambda self: self.path / ENVIRONMENT)
    inputs = property(lambda self: self.path / INPUTS)
    log = property(lambda self: self.path / LOG)
    model = property(lambda self: self.path / MODEL)
    adapter = property(lambda self: self.path / ADAPTER)
    checkpoints = property(lambda self: self.path / CHECKPOINTS)
    tracking = property(lambda self: self.path / TRACKING)
    reference_logps = property(lambda self: self.path / REFERENCE_LOGPS)
    epochs = property(lambda self: self.path / EPOCHS)
    results = property(lambda self: self.path / RESULTS)
    examples = property(lambda self: self.path / EXAMPLES)

    def epoch(self, n: int) -> Path:
        """The model saved after epoch ``n`` (``train.save_every_epoch``)."""
        return self.epochs / f"epoch-{n}"

    def adapter_of(self, model_dir: Path) -> Path:
        """Where a LoRA run keeps the adapter of the merged model in ``model_dir``:
        ``adapter/`` for ``model/``, ``epochs/epoch-N-adapter/`` for ``epochs/epoch-N/``."""
        if model_dir.resolve() == self.model.resolve():
            return self.adapter
        return model_dir.with_name(f"{model_dir.name}-{ADAPTER}")

    def epoch_models(self) -> list[tuple[int, Path]]:
        """(epoch, folder) of every complete per-epoch model, in order."""
        found = [(int(p.name.removeprefix("epoch-")), p) for p in self.epochs.glob("epoch-*")
                 if p.name.removeprefix("epoch-").isdigit() and (p / "config.json").is_file()]
        return sorted(found)

    def locked(self, command: str):
        return locked(self.path, command)

    def earlier_run(self) -> list[str]:
        return earlier_run(self.path)

    def clear(self) -> None:
        clear(self.path)

    def recover_model(self) -> str | None:
        return recover_model(self.path)

    def write_start(self, recipe_yaml: str, environment: dict, inputs: dict[str, str]) -> None:
        """Record what the run starts from: the resolved recipe, environment and inputs."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.recipe.write_text(recipe_yaml)
        self.environment.write_text(json.dumps(environment, indent=1) + "\n")
        self.inputs.write_text(json.dumps(inputs, indent=1) + "\n")

    def read_json(self, path: Path) -> Any:
        return json.loads(path.read_text())

    def read_recipe(self) -> dict:
        import yaml

        return yaml.safe_load(self.recipe.read_text())

    def read_results(self) -> dict | None:
        """``results.json``, or None when the run has not been evaluated."""
        return self.read_json(self.results) if self.results.is_file() else None

    def write_results(self, results: dict, examples: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.results.write_text(json.dumps(results, indent=1) + "\n")
        self.examples.write_text(json.dumps(examples, indent=1) + "\n")

    def read_log(self) -> list[dict]:
        """The per-step rows of ``train_log.jsonl`` (none when it does not exist)."""
        if not self.log.is_file():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def open_log(self, keep_steps: int) -> IO[str]:
        """Open the per-step log for appending, dropping rows after ``keep_steps`` (resume)."""
        rows = [r for r in self.read_log() if r["step"] <= keep_steps] if keep_steps else []
        log = open(self.log, "w")  # noqa: SIM115 (the loop writes and closes it)
        log.writelines(json.dumps(r) + "\n" for r in rows)
        log.flush()
        return log

