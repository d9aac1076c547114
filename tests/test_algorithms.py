"""Every loss and combiner runs in the loop; RMU, task vector and accumulation behave as specified."""

import pytest
import torch
from helpers import DEMO, log_rows, weights
from safetensors.torch import load_file

from blurctl.pipeline.job import run
from blurctl.recipe import RecipeError, load_recipe

BASE = ["train.max_steps=2", "eval.muse=null", "train.batch_size=2"]
RMU_STEERING = ["steering.layer=2", "steering.update_layers=[0,1,2]"]


def go(tmp_path, *overrides):
    run(load_recipe(DEMO, [*BASE, f"output_dir={tmp_path}", *overrides]))
    return log_rows(tmp_path)


@pytest.mark.parametrize("forget, retain, combiner", [
    ("ga", "gdr", "blur"), ("npo", "klr", "blur"), ("simnpo", "gdr", "blur_upper"),
    ("rmu", "rmu", "blur"), ("npo", "gdr", "penalty"), ("ga", None, "penalty"),
    ("ga", None, "task_vector"), ("rmu", "gdr", "penalty"),
])
def test_valid_triples_run_and_log(embedded, tmp_path, forget, retain, combiner):
    extra = RMU_STEERING if "rmu" in (forget, retain) else []
    rows = go(tmp_path, f"algorithm.forget_loss={forget}",
              f"algorithm.retain_loss={retain if retain else 'null'}",
              f"algorithm.combiner={combiner}", *extra)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["forget_sq"] > 0 for r in rows)


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.retain_loss=null"], "algorithm.retain_loss: combiner 'blur' needs a retain loss"),
    (["algorithm.forget_loss=rmu"], "steering: required by the rmu loss"),
    (["algorithm.combiner=task_vector"], "task_vector fine-tunes on D_f"),
    (["hardware.strategy=deepspeed"], "deepspeed shards gradients"),
    (["data.retain=embedded:corpus/raw/forget.txt"], "data.retain.0: same corpus as data.forget"),
])
def test_invalid_combinations_fail_validation(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(DEMO, overrides)


def test_rmu_trains_only_the_chosen_parameters(embedded, tmp_path):
    go(tmp_path, "algorithm.forget_loss=rmu", "algorithm.retain_loss=rmu", *RMU_STEERING,
       "steering.update_layers=[1,2]", "train.lr=1e-2")
    before = load_file(embedded / "target" / "model.safetensors")
    after = weights(tmp_path)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}


def test_rmu_layer_out_of_range_is_one_clear_error(embedded, tmp_path):
    from blurctl.errors import BlurctlError

    with pytest.raises(BlurctlError, match=r"steering: layer 7 out of range; the model has 4 layers"):
        go(tmp_path, "algorithm.forget_loss=rmu", "algorithm.retain_loss=rmu",
           "steering.layer=7", "steering.update_layers=[1]")


def test_task_vector_subtracts_the_fine_tuning_difference(embedded, tmp_path):
    scale = 0.7
    ft = tmp_path / "ft"
    go(ft, "algorithm.forget_loss=ga", "algorithm.retain_loss=null", "algorithm.combiner=penalty",
       "train.optimizer=sgd", "train.lr=0.1", "train.max_steps=1")
    tv = tmp_path / "tv"
    go(tv, "algorithm.forget_loss=ga", "algorithm.retain_loss=null", "algorithm.combiner=task_vector",
       f"algorithm.task_vector_scale={scale}", "train.optimizer=sgd", "train.lr=0.1", "train.max_steps=1")
    base = load_file(embedded / "target" / "model.safetensors")
    # One SGD step of gradient ascent moves by +lr*grad(NLL); fine-tuning moves by -lr*grad(NLL),
    # so the task vector result is base + scale*lr*grad(NLL) = base + scale*(ascent - base).
    ascent, result = weights(ft), weights(tv)
    for k in base:
        torch.testing.assert_close(result[k], base[k] + scale * (ascent[k] - base[k]),
                                   rtol=1e-4, atol=1e-6)


# Equivalence of mathematically equal runs (accumulation, global batch size, 2 ranks) is
# checked after SGD steps: the weights then differ by lr times the float32 rounding of
# the gradient sums (relative ~1e-6), well inside rtol 1e-4. Adam would turn that rounding
# on a near-zero gradient coordinate into a step of size lr, so its weights are not
# comparable across reduction orders (or CPUs); the logged statistics still are.
EQUAL_RUNS = ["train.optimizer=sgd", "train.lr=0.01"]


def test_accumulation_equals_the_large_batch(embedded, tmp_path):
    big = tmp_path / "big"
    go(big, "train.batch_size=4", "train.grad_accum=1", *EQUAL_RUNS)
    small = tmp_path / "small"
    go(small, "train.batch_size=2", "train.grad_accum=2", *EQUAL_RUNS)
    for a, b in zip(log_rows(big), log_rows(small), strict=True):
        for key in ("forget_loss", "retain_loss", "dot", "forget_sq", "retain_sq"):
            assert b[key] == pytest.approx(a[key], rel=1e-4)
    wa, wb = weights(big), weights(small)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


def test_global_batch_size_sets_accumulation(embedded, tmp_path):
    from blurctl.recipe import grad_accum

    recipe = load_recipe(DEMO, ["train.global_batch_size=8", "train.batch_size=2"])
    assert grad_accum(recipe) == 4
    big = tmp_path / "big"
    go(big, "train.batch_size=4", "train.grad_accum=1", *EQUAL_RUNS)
    derived = tmp_path / "derived"
    go(derived, "train.batch_size=2", "train.global_batch_size=4", *EQUAL_RUNS)
    wa, wb = weights(big), weights(derived)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


def test_separate_reference_model(embedded, tmp_path):
    """model.reference points NPO's pi_ref at another checkpoint; 'copy' equals the same path."""
    copy, path = tmp_path / "copy", tmp_path / "path"
    go(copy, "model.reference=copy")
    go(path, f"model.reference={embedded / 'target'}")
    assert log_rows(copy) == log_rows(path)
    other = tmp_path / "other"
    go(other, f"model.reference={embedded / 'retrained'}")
    assert log_rows(other)[0]["forget_loss"] != log_rows(copy)[0]["forget_loss"]
