"""The run folder under hostile use: one writer at a time, no silent replacement, no
resume on changed inputs, recoverable final saves and checkpoints, and refused runs
that write nothing."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import DEMO, log_rows, start_run, weights
from typer.testing import CliRunner

from blurctl.cli import app
from blurctl.errors import BlurctlError
from blurctl.pipeline.job import run
from blurctl.recipe import load_recipe

runner = CliRunner()
QUICK = ["train.max_steps=2", "eval.lm_eval=null", "eval.muse.max_examples=3", "eval.bootstrap=0",
         "eval.compare_base=false", "train.batch_size=2"]


def snapshot(folder):
    """Every file below ``folder`` with its content hash (the lock file aside)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".blurctl.lock"}


def wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert predicate(), "the condition never held"


def test_a_second_run_into_a_busy_folder_is_refused_and_the_first_stays_whole(embedded, tmp_path):
    out = tmp_path / "run"
    first = start_run("train.max_steps=40", "eval.muse=null", "eval.lm_eval=null",
                      f"output_dir={out}", capture=True)
    wait_for(lambda: (out / "train_log.jsonl").exists(), first)
    second = subprocess.run([sys.executable, "-m", "blurctl", "run", str(DEMO), "train.max_steps=3",
                             "eval.muse=null", "eval.lm_eval=null", f"output_dir={out}"],
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr
    assert f"error: output_dir: {out} is in use by pid {first.pid} " in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert load_recipe(out / "recipe.yaml").train.max_steps == 40
    assert [r["step"] for r in log_rows(out)] == list(range(1, 41))


def test_a_lock_left_by_a_killed_run_is_taken_over(embedded, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / ".blurctl.lock").write_text(f"pid {dead.pid} on host (blurctl run, since then)\n")
    result = runner.invoke(app, ["run", str(DEMO), *QUICK, "eval.muse=null", f"output_dir={out}"])
    assert result.exit_code == 0, result.output
    assert f"taking over the lock of process {dead.pid}, which no longer runs" in result.stdout


def test_a_finished_run_is_not_replaced_without_overwrite(embedded, tmp_path):
    out = tmp_path / "run"
    run(load_recipe(DEMO, [*QUICK, f"output_dir={out}"]))
    before = snapshot(out)
    result = runner.invoke(app, ["run", str(DEMO), *QUICK, "train.lr=0.1", f"output_dir={out}"])
    assert result.exit_code == 2
    assert "holds an earlier run (recipe.yaml, train_log.jsonl, model, results.json" in result.stderr
    assert "--overwrite to replace it" in result.stderr
    assert snapshot(out) == before
    result = runner.invoke(app, ["run", str(DEMO), *QUICK, "train.lr=0.1", "train.max_steps=1",
                                 f"output_dir={out}", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert load_recipe(out / "recipe.yaml").train.lr == 0.1 and len(log_rows(out)) == 1


def test_a_refused_run_writes_nothing(embedded, tmp_path):
    out = tmp_path / "run"
    run(load_recipe(DEMO, [*QUICK, f"output_dir={out}"]))
    before = snapshot(out)
    missing = tmp_path / "gone.txt"
    for target in (out, tmp_path / "fresh"):
        result = runner.invoke(app, ["run", str(DEMO), *QUICK, f"data.forget={missing}",
                                     f"data.retain={tmp_path / 'gone2.txt'}", f"output_dir={target}",
                                     "--overwrite"])
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert any(f"data.forget: {missing}: no such file" in ln for ln in lines)
        assert any("data.retain: " in ln and "gone2.txt: no such file" in ln for ln in lines)
    assert snapshot(out) == before
    assert not (tmp_path / "fresh").exists()


def test_resume_refuses_a_corpus_changed_since_the_run_started(embedded, tmp_path):
    forget = tmp_path / "forget.txt"
    forget.write_text((embedded / "corpus" / "raw" / "forget.txt").read_text())
    out = tmp_path / "run"
    args = ["train.max_steps=4", "train.save_every=2", "eval.muse=null", "eval.lm_eval=null",
            f"data.forget={forget}", f"output_dir={out}"]
    proc = start_run(*args)
    proc.wait()
    inputs = json.loads((out / "inputs.json").read_text())
    assert set(inputs) == {"data.forget", "data.retain", "model"}
    forget.write_text(forget.read_text().replace("a", "o"))
    with pytest.raises(BlurctlError, match=r"--resume: data.forget changed since the run started"):
        run(load_recipe(DEMO, args), resume=True)


def test_resume_passes_over_a_truncated_newest_checkpoint(embedded, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train.max_steps=6", "train.save_every=2", "train.keep_checkpoints=3", "eval.muse=null",
            "eval.lm_eval=null", "train.batch_size=2", f"output_dir={out}"]
    proc = start_run(*args)
    proc.wait()
    shutil.rmtree(out / "model")  # as if it had stopped after its last checkpoint
    newest = out / "checkpoints" / "step-0000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    run(load_recipe(DEMO, args), resume=True)
    said = capsys.readouterr().out
    assert "unreadable checkpoint(s) step-0000004 (" in said and "resuming from" in said
    assert "step-0000002" in said
    assert (out / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("left", [".model.tmp", ".model.old"])
def test_a_final_save_killed_between_renames_is_restored(embedded, tmp_path, left):
    out = tmp_path / "run"
    run(load_recipe(DEMO, [*QUICK, f"output_dir={out}"]))
    saved = weights(out)
    os.replace(out / "model", out / left)  # killed after moving model aside
    if left == ".model.tmp":
        (out / left / ".complete").write_text("")
    result = runner.invoke(app, ["eval", str(out)])
    assert result.exit_code == 0, result.output
    assert f"restored {out / 'model'} from {out / left}" in result.stderr
    assert weights(out).keys() == saved.keys()
    assert not (out / "model" / ".complete").exists()


def test_a_signal_during_evaluation_says_how_to_finish(embedded, tmp_path):
    out = tmp_path / "run"
    proc = start_run("train.max_steps=1", "eval.compare_base=true", "eval.bootstrap=0",
                     f"output_dir={out}", capture=True)
    wait_for(lambda: (out / "model" / "config.json").exists(), proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert f"evaluation stopped by SIGINT (the trained model is saved in {out / 'model'}; " \
           f"finish with: blurctl eval {out})" in err
    assert "Traceback" not in err


def test_eval_and_publish_wait_for_no_one_and_refuse_a_busy_folder(embedded, tmp_path):
    import fcntl

    out = tmp_path / "run"
    run(load_recipe(DEMO, [*QUICK, f"output_dir={out}"]))
    with open(out / ".blurctl.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 1 on elsewhere (blurctl run, since now)\n")
        held.flush()
        for args in (["eval", str(out)], ["publish", str(out), "--repo-id", "org/name", "--dry-run"]):
            result = runner.invoke(app, args)
            assert result.exit_code == 2, result.output
            assert f"output_dir: {out} is in use by pid 1 on elsewhere" in result.stderr
    assert runner.invoke(app, ["publish", str(out), "--repo-id", "org/name", "--dry-run"]).exit_code == 0
