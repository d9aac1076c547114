"""train.optimizer: Adafactor at the recipe's learning rate; the 8-bit bitsandbytes optimizers
refused, in one line, where they cannot run."""

import importlib.util

import pytest
import torch
from helpers import DEMO, log_rows
from typer.testing import CliRunner

from blurctl.cli import app
from blurctl.pipeline.job import run
from blurctl.recipe import RecipeError, load_recipe
from blurctl.unlearn import optim
from blurctl.unlearn.combine import Weights, combine
from blurctl.unlearn.loop import Unlearner, take_grads

FAST = ["train.batch_size=2", "data.max_len=32", "eval.muse=null", "eval.lm_eval=null"]


def test_adafactor_gets_the_recipe_lr_and_applies_it_to_the_combined_direction(embedded, tmp_path):
    """With Adafactor, step(0) moves the weights as transformers' Adafactor (lr given, no
    relative step, no parameter scaling) moves them for the direction combine() gives."""
    from transformers.optimization import Adafactor

    recipe = load_recipe(DEMO, ["train.max_steps=3", *FAST, "train.optimizer=adafactor",
                                "train.lr=0.02", f"output_dir={tmp_path}"])
    unlearner = Unlearner(recipe, tmp_path)
    unlearner.setup()
    inner = unlearner.optimizer.optimizer  # accelerate wraps the optimizer
    assert type(inner) is Adafactor
    (group,) = inner.param_groups
    assert (group["lr"], group["scale_parameter"], group["relative_step"], group["warmup_init"],
            group["beta1"]) == (0.02, False, False, False, None)

    def grads(loss_fn, plans, sets):
        unlearner._accumulate(loss_fn, unlearner._micro_batches(plans[0], sets[0], 0),
                              unlearner.contexts[0])
        return take_grads(unlearner.params)

    g_f = grads(unlearner.forget_fn, unlearner.forget_plans, unlearner.forget_sets)
    g_r = grads(unlearner.retain_fn, unlearner.retain_plans, unlearner.retain_sets)
    alg = recipe.algorithm
    d, _ = combine(g_f, g_r, "blur", Weights(alg.forget_weight, alg.retain_weight, alg.eps))
    before = [p.detach().clone() for p in unlearner.params]
    copies = [w.clone().requires_grad_(True) for w in before]
    for c, g in zip(copies, d, strict=True):
        c.grad = g.clone()
    Adafactor(copies, lr=0.02, scale_parameter=False, relative_step=False,
              warmup_init=False).step()

    row = unlearner.step(0)

    assert row["lr"] == 0.02
    for p, c in zip(unlearner.params, copies, strict=True):
        # the same float32 operations on the same inputs
        torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-5, atol=1e-7)
    assert max((p.detach() - w).abs().max().item()
               for p, w in zip(unlearner.params, before, strict=True)) > 1e-3


def test_adafactor_run_trains_and_logs_its_schedule(embedded, tmp_path):
    run(load_recipe(DEMO, ["train.max_steps=3", *FAST, "train.optimizer=adafactor",
                           "train.scheduler=linear", "train.lr=0.01", f"output_dir={tmp_path}"]))
    rows = log_rows(tmp_path)
    assert [r["lr"] for r in rows] == pytest.approx([0.01, 0.01 * 2 / 3, 0.01 / 3])
    assert rows[-1]["forget_loss"] != rows[0]["forget_loss"]


@pytest.mark.parametrize("name", optim.BNB_OPTIMIZERS)
def test_8bit_optimizers_are_refused_without_bitsandbytes_or_a_gpu(name, monkeypatch):
    recipe = load_recipe(DEMO, [f"train.optimizer={name}"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod == "bitsandbytes" else real(mod, *a))
    assert optim.optimizer_problems(recipe) == [
        (f"train.optimizer: {name!r} needs bitsandbytes, which is not installed "
         "(pip install 'blurctl[bnb]')")]
    # installed, but no GPU
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert optim.optimizer_problems(load_recipe(DEMO, [f"train.optimizer={name}",
                                                       "hardware.device=auto"])) == [
        (f"train.optimizer: {name!r} runs on a GPU only, and no GPU is visible here; use adamw "
         "or adafactor")]
    assert "hardware.device is cpu" in optim.optimizer_problems(recipe)[0]  # the demo's device


def test_run_refuses_an_8bit_optimizer_before_writing(embedded, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod == "bitsandbytes" else real(mod, *a))
    result = CliRunner().invoke(app, ["run", str(DEMO), *FAST, "train.optimizer=adamw_8bit",
                                      f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: train.optimizer: 'adamw_8bit'")
    assert not (tmp_path / "run").exists()


def test_8bit_optimizers_are_refused_with_fsdp():
    with pytest.raises(RecipeError, match="train.optimizer: 'paged_adamw_8bit' does not work with "
                                          "hardware.strategy fsdp"):
        load_recipe(DEMO, ["train.optimizer=paged_adamw_8bit", "hardware.strategy=fsdp"])
