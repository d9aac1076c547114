"""One step of the unlearning loop, tested alone (Unlearner.setup / step / finish)."""

import math

import pytest
import torch
from helpers import DEMO

from blurctl.errors import BlurctlError
from blurctl.recipe import load_recipe
from blurctl.unlearn.combine import Weights, combine
from blurctl.unlearn.loop import Unlearner, take_grads

FAST = ["train.max_steps=3", "train.batch_size=2", "data.max_len=32", "train.optimizer=sgd",
        "train.lr=0.1", "eval.muse=null", "eval.lm_eval=null"]


def _unlearner(tmp_path, *overrides: str) -> Unlearner:
    run = Unlearner(load_recipe(DEMO, [*FAST, *overrides, f"output_dir={tmp_path}"]), tmp_path)
    assert run.setup() == 0
    return run


def _gradients(run: Unlearner, loss_fn, plans, sets, step: int) -> list[torch.Tensor]:
    run._accumulate(loss_fn, run._micro_batches(plans[0], sets[0], step), run.contexts[0])
    return take_grads(run.params)


@pytest.mark.parametrize("combiner", ["blur", "penalty"])
def test_one_step_applies_the_combined_direction(tmp_path, combiner):
    """With SGD, step(0) moves the weights by exactly -lr * combine(g_f, g_r)."""
    run = _unlearner(tmp_path, f"algorithm.combiner={combiner}")
    before = [p.detach().clone() for p in run.params]
    g_f = _gradients(run, run.forget_fn, run.forget_plans, run.forget_sets, 0)
    g_r = _gradients(run, run.retain_fn, run.retain_plans, run.retain_sets, 0)
    alg = run.recipe.algorithm
    d, stats = combine(g_f, g_r, combiner, Weights(alg.forget_weight, alg.retain_weight, alg.eps))

    row = run.step(0)

    assert row["step"] == 1 and row["epoch"] == 1 and row["corpus"] == 0
    assert row["dot"] == pytest.approx(stats.dot.item(), rel=1e-5)
    for p, w, g in zip(run.params, before, d, strict=True):
        # SGD: w - lr * d, the same float32 operations on the same inputs
        torch.testing.assert_close(p.detach(), w - 0.1 * g, rtol=1e-5, atol=1e-7)


def test_a_non_finite_loss_stops_before_the_update(tmp_path):
    run = _unlearner(tmp_path)
    before = [p.detach().clone() for p in run.params]
    run.forget_fn = lambda model, ref, batch, ctx: model(
        input_ids=batch["input_ids"]).logits.sum() * math.nan
    with pytest.raises(BlurctlError, match="step 1: forget_loss is nan.*no weights were changed"):
        run.step(0)
    assert all(torch.equal(p, w) for p, w in zip(run.params, before, strict=True))


def test_finish_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    run = _unlearner(tmp_path)
    run.step(0)
    saved = run.finish()
    loaded = AutoModelForCausalLM.from_pretrained(saved)
    for name, p in run.model.named_parameters():
        assert torch.equal(loaded.get_parameter(name), p.detach())


def test_task_vector_finish_negates_the_fine_tuning(tmp_path):
    """theta_start - s (theta_ft - theta_start), with s = task_vector_scale."""
    run = _unlearner(tmp_path, "algorithm.combiner=task_vector", "algorithm.forget_loss=ga",
                     "algorithm.retain_loss=null", "data.retain=null",
                     "algorithm.task_vector_scale=2.0")
    start = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.step(0)
    fine_tuned = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    assert any(not torch.equal(start[k], fine_tuned[k]) for k in start)
    from safetensors.torch import load_file

    saved = load_file(run.finish() / "model.safetensors")
    for k, v in saved.items():
        torch.testing.assert_close(v, start[k] - 2.0 * (fine_tuned[k] - start[k]))


def test_precomputed_reference_matches_the_reference_model(tmp_path):
    """NPO on precomputed log pi_ref gives the same steps as with the reference model; no
    reference model is kept. Same maths, batches padded differently: float32 rounding only."""
    online = _unlearner(tmp_path / "online")
    pre = _unlearner(tmp_path / "pre", "train.precompute_reference=true")
    assert online.reference is not None and pre.reference is None
    assert (tmp_path / "pre" / "reference_logps.pt").is_file()
    for step in range(2):
        a, b = online.step(step), pre.step(step)
        for key in ("forget_loss", "retain_loss", "dot", "forget_sq"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    for p, q in zip(online.params, pre.params, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)


def test_precomputed_reference_is_read_back_on_resume(tmp_path):
    first = _unlearner(tmp_path, "train.precompute_reference=true")
    saved = torch.load(tmp_path / "reference_logps.pt")
    first.step(0)  # the model moves; a resumed run must not recompute from it
    torch.save([v + 1.0 for v in saved], tmp_path / "reference_logps.pt")
    again = _unlearner(tmp_path, "train.precompute_reference=true")
    assert all(torch.equal(a, b + 1.0) for a, b in zip(again.ref_logps, saved, strict=True))


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.retain_loss=klr"], "retain_loss='klr' needs the reference model"),
    (["algorithm.forget_loss=simnpo"], "no loss of this algorithm uses a reference"),
])
def test_precompute_reference_is_refused_where_it_cannot_work(overrides, message):
    from blurctl.recipe import RecipeError

    with pytest.raises(RecipeError, match=message):
        load_recipe(DEMO, ["train.precompute_reference=true", *overrides])


def test_offloading_the_forget_gradient_changes_nothing(tmp_path):
    """The set-aside gradient moved to CPU memory and back: the same values, the same step."""
    kept = _unlearner(tmp_path / "kept")
    moved = _unlearner(tmp_path / "moved", "train.offload_forget_grad=true")
    assert kept.step(0) == moved.step(0)
    assert all(torch.equal(p, q) for p, q in zip(kept.params, moved.params, strict=True))
