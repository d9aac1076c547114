"""Checkpoints: written atomically, found again on resume, pruned to the newest few.

A checkpoint is ``RUN_DIR/checkpoints/step-NNNNNNN/`` holding the full model state
(safetensors), optimizer and scheduler state, RNG state and ``state.json``. It is
written into a hidden temporary folder and renamed into place, so a checkpoint
folder that exists is complete, whatever killed the process and when.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from blurctl.errors import BlurctlError
from blurctl.rundir import CHECKPOINTS

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "state.json").exists()]
    return sorted(found)


def last_good_hint(run_dir: Path) -> str:
    dirs = checkpoint_dirs(run_dir)
    return f"; last good checkpoint: {dirs[-1][1]}" if dirs else ""


def save(run_dir: Path, step: int, model, optimizer, scheduler, strategy, is_main: bool,
         keep: int, describe: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint ``step`` atomically and prune older ones beyond ``keep``.

    Every rank takes part in gathering the states (``strategy``); the main one writes.
    ``describe(folder)`` adds files that make the folder a loadable model (config, tokenizer).
    """
    model_state = strategy.model_state(model)
    optim_state = strategy.optimizer_state(model, optimizer)
    final = run_dir / CHECKPOINTS / f"step-{step:07d}"
    if not is_main:
        return final
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # Tied weights share storage; safetensors wants each tensor stored once.
        save_file({k: v.contiguous().clone() for k, v in model_state.items()}, tmp / "model.safetensors")
        torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state()}, tmp / "trainer.pt")
        if describe is not None:
            describe(tmp)
        (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BlurctlError(f"cannot write checkpoint step {step} in {final.parent}: "
                           f"{exc.strerror or exc}{last_good_hint(run_dir)}") from None
    for _, old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _newest_readable(dirs: list[tuple[int, Path]]) -> tuple[int, Path, dict, dict]:
    """The newest checkpoint whose files load (a truncated one is passed over, saying so)."""
    from blurctl.progress import is_main_process

    skipped = []
    for step, path in reversed(dirs):
        try:
            model_state = load_file(path / "model.safetensors")
            trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        except Exception as exc:  # safetensors, pickle and EOF errors: a damaged file
            skipped.append(f"{path.name} ({exc.__class__.__name__})")
            continue
        if skipped and is_main_process():
            print(f"note: --resume: unreadable checkpoint(s) {', '.join(skipped)}; resuming "
                  f"from {path}", flush=True)
        return step, path, model_state, trainer
    raise BlurctlError(f"--resume: no checkpoint in {dirs[-1][1].parent} can be read: "
                       f"{', '.join(skipped)}")


def restore_latest(run_dir: Path, model, optimizer, scheduler, strategy) -> int:
    """Load the newest complete checkpoint into the training objects; return its step."""
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        raise BlurctlError(f"--resume: no checkpoint in {run_dir / CHECKPOINTS} "
                           "(set train.save_every to write them)")
    step, path, model_state, trainer = _newest_readable(dirs)
    try:
        strategy.load(model, optimizer, model_state, trainer["optimizer"])
    except RuntimeError as exc:
        raise BlurctlError(f"{path}: checkpoint does not match the model "
                           f"({str(exc).splitlines()[0]})") from None
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"])
    return step


def save_model_atomically(model, tokenizer, target: Path, state_dict=None, **save_kwargs) -> None:
    """Write to a sibling temporary folder, then rename: ``target`` is never half-written.

    The temporary copy is marked ``.complete`` once written, so a save killed between
    the renames is finished by ``rundir.recover_model`` on the next eval or resume.
    ``save_kwargs`` go to ``model.save_pretrained``.
    """
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True, **save_kwargs)
        tokenizer.save_pretrained(tmp)
        (tmp / ".complete").write_text("")
        _fsync_dir(tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BlurctlError(f"cannot write the model to {target}: {exc.strerror or exc}"
                           f"{last_good_hint(target.parent)}") from None
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    (target / ".complete").unlink()
    shutil.rmtree(old, ignore_errors=True)
