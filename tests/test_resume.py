"""Checkpoints survive kill -9 and SIGTERM; resuming gives bitwise the weights of an
uninterrupted run."""

import os
import signal
import time

import pytest
import torch
from helpers import DEMO, log_rows, newest_checkpoint, start_run, wait_for_checkpoints, weights

from blurctl.errors import BlurctlError
from blurctl.pipeline.job import run
from blurctl.recipe import load_recipe
from blurctl.unlearn.checkpoint import checkpoint_dirs

RUN = ["train.max_steps=24", "train.save_every=3", "train.keep_checkpoints=2", "eval.muse=null",
       "train.batch_size=2", "train.lr=1e-3"]


def straight_run(tmp_path):
    """The uninterrupted run that interrupted ones must match."""
    straight = tmp_path / "straight"
    run(load_recipe(DEMO, [*RUN, f"output_dir={straight}"]))
    return straight


def test_kill_9_then_resume_is_bitwise_identical(embedded, tmp_path):
    straight = straight_run(tmp_path)
    killed = tmp_path / "killed"
    proc = start_run(*RUN, f"output_dir={killed}")
    wait_for_checkpoints(killed, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    assert checkpoint_dirs(killed)

    run(load_recipe(DEMO, [*RUN, f"output_dir={killed}"]), resume=True)
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_rows(killed) == log_rows(straight)
    assert [step for step, _ in checkpoint_dirs(killed)] == [18, 21]


def test_sigterm_saves_a_checkpoint_and_resume_matches(embedded, tmp_path):
    straight = straight_run(tmp_path)
    stopped = tmp_path / "stopped"
    proc = start_run(*RUN, f"output_dir={stopped}", capture=True)
    wait_for_checkpoints(stopped, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM after step" in stderr and "continue with --resume" in stderr
    assert "Traceback" not in stderr
    assert not (stopped / "model").exists()
    last = checkpoint_dirs(stopped)[-1][0]
    assert last == len(log_rows(stopped)) and last < 24

    run(load_recipe(DEMO, [*RUN, f"output_dir={stopped}"]), resume=True)
    a, b = weights(straight), weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_half_written_checkpoint_is_ignored(embedded, tmp_path):
    run(load_recipe(DEMO, [*RUN, "train.max_steps=7", f"output_dir={tmp_path}"]))
    partial = tmp_path / "checkpoints" / ".step-0000009.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"garbage")
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [3, 6]


def test_rerun_without_resume_and_resume_with_other_recipe_are_refused(embedded, tmp_path):
    run(load_recipe(DEMO, [*RUN, "train.max_steps=4", f"output_dir={tmp_path}"]))
    with pytest.raises(BlurctlError, match="holds an earlier run .*; pass --resume to continue it, --overwrite"):
        run(load_recipe(DEMO, [*RUN, "train.max_steps=4", f"output_dir={tmp_path}"]))
    with pytest.raises(BlurctlError, match="recipe differs .* in train.lr"):
        run(load_recipe(DEMO, [*RUN, "train.max_steps=4", "train.lr=0.1", f"output_dir={tmp_path}"]),
            resume=True)
    with pytest.raises(BlurctlError, match="--resume: .* holds no earlier run"):
        run(load_recipe(DEMO, [*RUN, f"output_dir={tmp_path / 'new'}"]), resume=True)


def test_clipping_bounds_the_combined_direction(embedded, tmp_path):
    run(load_recipe(DEMO, ["train.max_steps=1", "eval.muse=null", "train.optimizer=sgd",
                           "train.lr=1.0", "train.max_grad_norm=0.001", f"output_dir={tmp_path}"]))
    from safetensors.torch import load_file

    base = load_file(embedded / "target" / "model.safetensors")
    after = weights(tmp_path)
    step = torch.sqrt(sum(((after[k] - base[k]).double() ** 2).sum() for k in base))
    assert step.item() == pytest.approx(0.001, rel=1e-3)


def test_kill_9_at_random_moments_never_leaves_a_broken_checkpoint(embedded, tmp_path):
    """With a checkpoint every step, kills land during saves too; what is visible is complete."""
    import random

    from safetensors.torch import load_file

    every = ["train.max_steps=40", "train.save_every=1", "train.keep_checkpoints=3", "eval.muse=null",
             "eval.lm_eval=null", "train.batch_size=2", "train.lr=1e-3"]
    out = tmp_path / "run"
    rng = random.Random(0)
    for attempt in range(3):
        proc = start_run(*every, f"output_dir={out}", *(["--resume"] if attempt else []))
        wait_for_checkpoints(out, proc, after_step=newest_checkpoint(out))
        time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for _, path in checkpoint_dirs(out):
            state = load_file(path / "model.safetensors")  # complete and readable
            assert state and (path / "trainer.pt").stat().st_size > 0
    run(load_recipe(DEMO, [*every, f"output_dir={out}"]), resume=True)
    straight = tmp_path / "straight"
    run(load_recipe(DEMO, [*every, "train.save_every=null", f"output_dir={straight}"]))
    a, b = weights(straight), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
