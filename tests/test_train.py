"""The unlearning loop, checked against an independent one-step computation."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from blurctl.data.corpora import chunk_texts, collate, load_texts
from blurctl.errors import BlurctlError
from blurctl.models import frozen_copy, load_tokenizer
from blurctl.pipeline.job import run
from blurctl.recipe import load_recipe
from blurctl.rundir import LOG as LOG_FILENAME
from blurctl.rundir import MODEL as MODEL_DIRNAME
from blurctl.unlearn import losses
from blurctl.unlearn.batches import BatchPlan

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


def one_step_recipe(tmp_path, *extra):
    return load_recipe(DEMO, ["train.max_steps=1", "train.optimizer=sgd", "train.lr=0.5",
                              "train.batch_size=3", "eval.muse=null", f"output_dir={tmp_path}",
                              "algorithm.forget_weight=1.5", "algorithm.retain_weight=2.0", *extra])


def flat_grad(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


@pytest.mark.parametrize("combiner, seed", [("blur", 0), ("penalty", 0), ("blur", 7)])
def test_one_step_matches_independent_computation(embedded, tmp_path, combiner, seed):
    """One SGD step from the shipped target; the recipe seed picks the batches only."""
    recipe = one_step_recipe(tmp_path, f"algorithm.combiner={combiner}", f"seed={seed}")
    run(recipe)
    row = json.loads((tmp_path / LOG_FILENAME).read_text().splitlines()[0])

    tok = load_tokenizer(recipe.model)
    forget = chunk_texts(load_texts(recipe.data.forget[0], "f"), tok, recipe.data.max_len)
    retain = chunk_texts(load_texts(recipe.data.retain[0], "r"), tok, recipe.data.max_len)
    model = AutoModelForCausalLM.from_pretrained(embedded / "target")
    model.train()
    ref = frozen_copy(model)
    fb = collate([forget[i] for i in BatchPlan(len(forget), 3, 1, 0, seed).indices(0)], tok.pad_token_id)
    rb = collate([retain[i] for i in BatchPlan(len(retain), 3, 1, 0, seed + 1).indices(0)], tok.pad_token_id)
    f_loss = losses.npo(model, ref, fb, losses.LossContext(recipe.algorithm))
    g_f = flat_grad(model, f_loss)
    r_loss = losses.gdr(model, ref, rb, losses.LossContext(recipe.algorithm))
    g_r = flat_grad(model, r_loss)

    assert row["forget_loss"] == pytest.approx(f_loss.item(), rel=1e-5)
    assert row["retain_loss"] == pytest.approx(r_loss.item(), rel=1e-5)
    assert row["dot"] == pytest.approx((g_r @ g_f).item(), rel=1e-4)
    assert row["forget_sq"] == pytest.approx((g_f @ g_f).item(), rel=1e-4)
    assert row["retain_sq"] == pytest.approx((g_r @ g_r).item(), rel=1e-4)
    assert row["cosine"] == pytest.approx((g_r @ g_f / (g_r.norm() * g_f.norm())).item(), rel=1e-4)

    if combiner == "blur":
        d = 1.5 * g_f + 2.0 * (g_r - (g_r @ g_f) / (g_f @ g_f) * g_f)
    else:
        d = 1.5 * g_f + 2.0 * g_r
    before = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    after_model = AutoModelForCausalLM.from_pretrained(tmp_path / MODEL_DIRNAME)
    after = torch.cat([p.detach().flatten().double() for p in after_model.parameters()])
    torch.testing.assert_close(after, before - 0.5 * d, rtol=1e-4, atol=1e-6)


def test_batch_plan_covers_each_example_once_per_epoch_and_splits_ranks():
    single = BatchPlan(10, 4, 1, 0, seed=5)
    epoch = [i for pos in range(0, 3) for i in single.indices(pos)][:10]
    assert sorted(epoch) == list(range(10))
    ranks = [BatchPlan(10, 2, 2, r, seed=5) for r in (0, 1)]
    assert ranks[0].indices(0) + ranks[1].indices(0) == single.indices(0)


def test_non_finite_loss_stops_before_the_update(embedded, tmp_path, monkeypatch):
    monkeypatch.setitem(losses.FORGET_LOSSES, "npo", replace(
        losses.FORGET_LOSSES["npo"], fn=lambda m, r, b, c: losses.nll(m, b) * float("nan")))
    recipe = one_step_recipe(tmp_path)
    with pytest.raises(BlurctlError, match=r"step 1: forget_loss is nan \(also dot, forget_sq, xi, cosine\); stopped before the update"):
        run(recipe)
    assert not (tmp_path / MODEL_DIRNAME).exists()


def test_demo_run_writes_the_run_folder(embedded, tmp_path):
    from typer.testing import CliRunner

    from blurctl.cli import app

    result = CliRunner().invoke(app, ["run", str(DEMO), "train.max_steps=3", "eval.compare_base=false",
                                      "eval.muse.max_examples=4", f"output_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert "Evaluation" in result.stdout and "KnowMem_f" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / LOG_FILENAME).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"forget_loss", "retain_loss", "dot", "forget_sq", "retain_sq", "xi", "cosine"} <= set(rows[0])
    results = json.loads((tmp_path / "results.json").read_text())
    scores = results["models"]["unlearned"]
    assert {"verbmem_f", "knowmem_f", "knowmem_r", "privleak", "privleak_auc"} <= set(scores)
    assert 0 < results["retrained_auc"] <= 1
    env = json.loads((tmp_path / "environment.json").read_text())
    assert env["packages"]["torch"] and env["hardware"]["cpu_count"]
    assert load_recipe(tmp_path / "recipe.yaml").train.max_steps == 3
    assert (tmp_path / MODEL_DIRNAME / "model.safetensors").exists()


def test_demo_recipe_forgets_and_keeps_utility(embedded, tmp_path):
    """The embedded default, as shipped: BLUR visibly forgets D_f and, selectively, keeps
    more of what it never rehearsed (KnowMem_r asks about retain2, outside the retain
    loss) than of D_f."""
    results = run(load_recipe(DEMO, [f"output_dir={tmp_path}"]))["models"]
    base, unlearned = results["base"], results["unlearned"]
    assert unlearned["knowmem_f"] < 0.5 * base["knowmem_f"]
    assert unlearned["verbmem_f"] < 0.5 * base["verbmem_f"]
    assert unlearned["knowmem_r"] > 0.4 * base["knowmem_r"]
    assert unlearned["knowmem_r"] > 1.5 * unlearned["knowmem_f"]
