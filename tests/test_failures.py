"""Failure paths: a full disk, NaN and zero gradients, secrets."""

import errno
import warnings
from dataclasses import replace

import pytest
import torch
from helpers import DEMO, log_rows, weights

from blurctl.errors import BlurctlError
from blurctl.pipeline.job import run
from blurctl.recipe import load_recipe
from blurctl.unlearn import checkpoint, losses
from blurctl.unlearn.checkpoint import checkpoint_dirs

RUN = ["train.max_steps=24", "train.save_every=6", "eval.muse=null", "eval.lm_eval=null",
       "train.batch_size=2", "train.lr=1e-3"]


def test_disk_full_during_checkpoint_keeps_the_last_good_one(embedded, tmp_path, monkeypatch):
    real_save = checkpoint.save_file
    calls = []

    def full_disk(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(BlurctlError, match=r"cannot write checkpoint step 12 .*No space left on device; "
                                           r"last good checkpoint: .*step-0000006"):
        run(load_recipe(DEMO, [*RUN, f"output_dir={tmp_path}"]))
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [6]
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no half-written folder left
    monkeypatch.undo()
    run(load_recipe(DEMO, [*RUN, f"output_dir={tmp_path}"]), resume=True)  # and it resumes
    assert len(log_rows(tmp_path)) == 24


def test_disk_full_during_final_save_leaves_no_half_model(embedded, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(BlurctlError, match="cannot write the model to .*No space left on device"):
        run(load_recipe(DEMO, [*RUN, "train.max_steps=2", f"output_dir={tmp_path}"]))
    assert not (tmp_path / "model").exists() and not (tmp_path / ".model.tmp").exists()


def test_nan_in_the_forget_gradient_stops_before_the_update(embedded, tmp_path, monkeypatch):
    def nan_gradient(model, ref, batch, ctx):
        first = next(p for p in model.parameters() if p.requires_grad)
        return losses.nll(model, batch) + torch.sqrt(first.sum() * 0.0)  # finite value, NaN gradient

    monkeypatch.setitem(losses.FORGET_LOSSES, "npo", replace(losses.FORGET_LOSSES["npo"], fn=nan_gradient))
    with pytest.raises(BlurctlError, match=r"step 1: dot is nan \(also forget_sq, xi, cosine\); stopped before"):
        run(load_recipe(DEMO, [*RUN, f"output_dir={tmp_path}"]))
    assert not (tmp_path / "model").exists()


def test_zero_forget_gradient_gives_the_retain_step(embedded, tmp_path, monkeypatch):
    monkeypatch.setitem(losses.FORGET_LOSSES, "npo", replace(
        losses.FORGET_LOSSES["npo"], fn=lambda m, r, b, c: 0.0 * losses.nll(m, b)))
    for combiner in ("blur", "penalty"):
        run(load_recipe(DEMO, [*RUN, "train.max_steps=2", "train.save_every=null",
                               f"algorithm.combiner={combiner}", f"output_dir={tmp_path / combiner}"]))
    rows = log_rows(tmp_path / "blur")
    assert all(r["forget_sq"] == 0.0 and r["xi"] == 1.0 for r in rows)
    a, b = weights(tmp_path / "blur"), weights(tmp_path / "penalty")
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = weights(tmp_path / "blur")
    assert all(torch.isfinite(v).all() for v in base.values())


def test_trust_remote_code_warns_and_is_off_by_default(embedded):
    from blurctl.models import load_model
    from blurctl.recipe import ModelConfig

    assert ModelConfig(path="x").trust_remote_code is False
    with pytest.warns(UserWarning, match="trust_remote_code is on"):
        load_model(ModelConfig(path="embedded:target", trust_remote_code=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_model(ModelConfig(path="embedded:target"))


def test_planted_token_appears_in_no_output(embedded, tmp_path, monkeypatch, capsys):
    token = "hf_plantedTokenForLeakCheck0123456789"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", token)
    run(load_recipe(DEMO, ["train.max_steps=2", "eval.compare_base=false", "eval.lm_eval=null",
                           "eval.muse.max_examples=3", f"output_dir={tmp_path}"]))
    captured = capsys.readouterr()
    assert token not in captured.out + captured.err
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 5
    for path in files:
        assert token.encode() not in path.read_bytes(), path
