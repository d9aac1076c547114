"""Experiment trackers, per-epoch models, the selection rule, and evaluable checkpoints."""

import json

import pytest
from helpers import DEMO, log_rows
from typer.testing import CliRunner

from blurctl.cli import app
from blurctl.evaluate.stage import select_epoch
from blurctl.recipe import RecipeError, load_recipe

QUICK = ["data.max_len=64", "train.batch_size=8", "eval.muse.max_examples=6", "eval.bootstrap=0",
         "eval.muse.batch_size=8", "eval.lm_eval=null"]


def _run(tmp_path, *overrides: str):
    result = CliRunner().invoke(app, ["run", str(DEMO), *QUICK, *overrides, f"output_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    results = tmp_path / "results.json"
    return json.loads(results.read_text()) if results.is_file() else {}


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = _run(tmp_path, "train.max_steps=3", "train.report_to=tensorboard")
    [events] = [p.parent for p in (tmp_path / "tracking").rglob("events.out.tfevents.*")
                if p.parent.name == tmp_path.name]
    acc = EventAccumulator(str(events))
    acc.Reload()
    rows = log_rows(tmp_path)
    for key in ("forget_loss", "retain_loss", "cosine", "xi", "lr"):
        logged = acc.Scalars(key)
        assert [e.step for e in logged] == [r["step"] for r in rows]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-6)
    [final] = acc.Scalars("eval/unlearned/knowmem_f")
    assert final.step == 3
    assert final.value == pytest.approx(results["models"]["unlearned"]["knowmem_f"], rel=1e-6)


def test_trackers_are_accelerates():
    import typing

    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    from blurctl.recipe.schema import Tracker

    assert set(typing.get_args(Tracker)) <= set(LOGGER_TYPE_TO_CLASS)


def test_a_missing_tracker_package_is_refused_before_training(tmp_path, monkeypatch):
    from accelerate.utils import imports

    monkeypatch.setattr(imports, "is_wandb_available", lambda: False)
    result = CliRunner().invoke(app, ["run", str(DEMO), *QUICK, "train.report_to=wandb",
                                      f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code != 0
    assert "train.report_to: 'wandb' needs its package" in result.output
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


def test_every_epoch_is_evaluated_and_muse_rule_picks_and_publishes(tmp_path):
    results = _run(tmp_path, "train.epochs=3", "train.save_every_epoch=true",
                   "eval.every_epoch=true", "eval.selection=muse_first_below_retrained")
    epochs = results["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert [e["epoch"] for e in epochs] == sorted({r["epoch"] for r in log_rows(tmp_path)})
    bar = results["models"]["retrained"]["knowmem_f"]
    expected = next((e for e in epochs if e["knowmem_f"] <= bar), epochs[-1])
    chosen = results["selected"]
    assert chosen == {"rule": "muse_first_below_retrained", "epoch": expected["epoch"],
                      "model": f"epochs/epoch-{expected['epoch']}"}
    for key in ("verbmem_f", "knowmem_f", "knowmem_r", "privleak"):
        assert results["models"]["unlearned"][key] == expected[key]

    staged = CliRunner().invoke(app, ["publish", str(tmp_path), "--repo-id", "org/demo",
                                      "--dry-run"])
    assert staged.exit_code == 0, staged.output
    published = (tmp_path / "publish" / "model.safetensors").read_bytes()
    assert published == (tmp_path / chosen["model"] / "model.safetensors").read_bytes()
    assert f"after epoch {chosen['epoch']}" in (tmp_path / "publish" / "README.md").read_text()


def test_the_last_epoch_is_the_final_model(tmp_path):
    from helpers import weights
    from safetensors.torch import load_file

    _run(tmp_path, "train.epochs=2", "train.save_every_epoch=true", "eval.muse=null")
    last = load_file(tmp_path / "epochs" / "epoch-2" / "model.safetensors")
    final = weights(tmp_path)
    assert last.keys() == final.keys()
    assert all((last[k] == final[k]).all() for k in final)


@pytest.mark.parametrize("rule, picked", [
    ("final", 3), ("muse_first_below_retrained", 2), ("max:knowmem_r", 1), ("min:verbmem_f", 3)])
def test_selection_rules(rule, picked):
    epochs = [{"epoch": 1, "knowmem_f": 50, "knowmem_r": 60, "verbmem_f": 30},
              {"epoch": 2, "knowmem_f": 20, "knowmem_r": 55, "verbmem_f": 20},
              {"epoch": 3, "knowmem_f": 10, "knowmem_r": 40, "verbmem_f": 10}]
    assert select_epoch(epochs, rule, {"knowmem_f": 25})["epoch"] == picked


def test_muse_rule_takes_the_last_epoch_when_none_reaches_the_retrained_level():
    epochs = [{"epoch": 1, "knowmem_f": 50}, {"epoch": 2, "knowmem_f": 40}]
    assert select_epoch(epochs, "muse_first_below_retrained", {"knowmem_f": 5})["epoch"] == 2


@pytest.mark.parametrize("overrides, message", [
    (["eval.every_epoch=true"], "eval.every_epoch: needs train.save_every_epoch"),
    (["eval.selection=max:knowmem_r"], "eval.selection: 'max:knowmem_r' chooses among the epochs"),
    (["eval.selection=max:nonsense"], "eval.selection: expected final"),
    (["train.save_every_epoch=true", "eval.every_epoch=true", "eval.muse.retrained_model=null",
      "eval.selection=muse_first_below_retrained"], "compares with the retrained model"),
    (["train.report_to=nonsense"], "train.report_to.0"),
])
def test_selection_settings_are_checked(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(DEMO, overrides)


def test_step_checkpoints_can_be_evaluated(tmp_path):
    _run(tmp_path, "train.max_steps=3", "train.save_every=1", "eval.muse=null",
         "eval.compare_base=false")
    step = tmp_path / "checkpoints" / "step-0000002"
    assert (step / "config.json").is_file()
    result = CliRunner().invoke(app, ["eval", str(DEMO), *QUICK, f"output_dir={tmp_path}",
                                      "eval.compare_base=false", "--model", str(step)])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "eval-step-0000002" / "results.json").read_text())
    assert set(scores["models"]) == {"unlearned"}


def test_a_sweep_evaluates_base_and_retrained_once(tmp_path, monkeypatch):
    import blurctl.evaluate.muse as muse

    calls = []
    real = muse.evaluate_muse
    monkeypatch.setattr(muse, "evaluate_muse", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = CliRunner().invoke(app, ["sweep", str(DEMO), *QUICK, "train.max_steps=2",
                                      "seed=0,1", f"output_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    first, second = (json.loads((tmp_path / f"seed-{s}" / "results.json").read_text())
                     for s in (0, 1))
    assert len(calls) == 3 + 1  # base, retrained, unlearned; then only the second unlearned
    assert second["reused"] == {"models": ["base", "retrained"], "from": str(tmp_path / "seed-0")}
    for name in ("base", "retrained"):
        assert second["models"][name] == first["models"][name]
    examples = json.loads((tmp_path / "seed-1" / "eval_examples.json").read_text())
    assert set(examples) == {"base", "unlearned", "retrained"}
