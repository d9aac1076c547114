"""LoRA through peft: only the adapters train, pi_ref is the base with them disabled, BLUR's
inner products run over the adapters, the run folder holds the merged model and the adapter,
checkpoints resume exactly, publish uploads what peft.merge says."""

import json
import shutil

import pytest
import torch
from helpers import DEMO, log_rows, weights
from safetensors.torch import load_file
from typer.testing import CliRunner

from blurctl.cli import app
from blurctl.errors import BlurctlError
from blurctl.models import load_config, load_model
from blurctl.pipeline import preflight
from blurctl.pipeline.job import run
from blurctl.recipe import RecipeError, load_recipe
from blurctl.unlearn import lora
from blurctl.unlearn.checkpoint import checkpoint_dirs
from blurctl.unlearn.loop import Unlearner
from blurctl.unlearn.losses import hidden_at, npo, sequence_logprob

R, ALPHA = 4, 8.0
LORA = [f"peft.r={R}", f"peft.alpha={ALPHA}"]
SMALL = ["train.batch_size=2", "data.max_len=32", "eval.lm_eval=null", *LORA]
FAST = [*SMALL, "eval.muse=null"]
RMU = ["algorithm.forget_loss=rmu", "algorithm.retain_loss=rmu", "steering.layer=2",
       "steering.update_layers=[1,2]"]


def _unlearner(tmp_path, *overrides: str) -> Unlearner:
    recipe = load_recipe(DEMO, ["train.max_steps=3", *FAST, *overrides, f"output_dir={tmp_path}"])
    unlearner = Unlearner(recipe, tmp_path)
    assert unlearner.setup() == 0
    return unlearner


def _original(embedded) -> torch.nn.Module:
    """The demo's model loaded on its own: what pi_ref must equal."""
    model = load_model(load_recipe(DEMO).model).eval()
    model.requires_grad_(False)
    return model


def _forget_batch(unlearner: Unlearner, step: int = 0) -> dict:
    (batch,) = unlearner._micro_batches(unlearner.forget_plans[0], unlearner.forget_sets[0], step)
    return batch


def _adapter_names(unlearner: Unlearner) -> list[str]:
    return [n for n, _ in unlearner.model.named_parameters() if ".lora_" in n]


def test_only_the_adapters_train_and_their_count_is_known_before_loading(embedded, tmp_path):
    unlearner = _unlearner(tmp_path)
    trainable = [n for n, p in unlearner.model.named_parameters() if p.requires_grad]
    assert trainable == _adapter_names(unlearner) and trainable
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}  # peft's Llama default
    count = sum(p.numel() for p in unlearner.params)
    assert count == sum(p.numel() for n, p in unlearner.model.named_parameters() if ".lora_" in n)
    config = load_config(unlearner.recipe)
    # r x (in + out) for q_proj and v_proj of every layer: A is r x in, B is out x r
    q_out = config.num_attention_heads * config.head_dim
    v_out = config.num_key_value_heads * config.head_dim
    expected = config.num_hidden_layers * R * (2 * config.hidden_size + q_out + v_out)
    assert count == expected == lora.adapter_parameter_count(unlearner.recipe, config)


def test_reference_is_the_base_model_and_forget_sq_is_the_adapter_gradient(embedded, tmp_path):
    """pi_ref's log-probs equal the original model's, before and after a step that changed
    the model; step 1's forget_sq equals |grad of the NPO loss w.r.t. the adapters alone|^2,
    computed here with the original model as reference."""
    unlearner = _unlearner(tmp_path)
    original, batch = _original(embedded), _forget_batch(unlearner)

    def logp(model):
        with torch.no_grad():
            return sequence_logprob(model, batch)[0]

    # the same float32 operations on the same inputs (with its adapters disabled peft calls
    # the base layer alone): equal up to a different choice of kernel, if any
    torch.testing.assert_close(logp(unlearner.reference), logp(original), rtol=1e-6, atol=1e-5)
    adapters = dict(unlearner.model.named_parameters())
    names = _adapter_names(unlearner)
    loss = npo(unlearner.model, original, batch, unlearner.contexts[0])
    grads = torch.autograd.grad(loss, [adapters[n] for n in names])
    expected = sum(g.double().pow(2).sum() for g in grads).item()
    assert expected > 0

    row = unlearner.step(0)

    # the same gradients; the loop sums their squares in float32 (~1e-7 relative here)
    assert row["forget_sq"] == pytest.approx(expected, rel=1e-5)
    assert unlearner.model.training  # pi_ref's eval mode did not leak into the model
    after = logp(unlearner.model)
    assert (after - logp(original)).abs().max() > 1e-3  # the adapters moved the model, not pi_ref
    torch.testing.assert_close(logp(unlearner.reference), logp(original), rtol=1e-6, atol=1e-5)


@pytest.fixture(scope="module")
def lora_run(embedded, tmp_path_factory):
    """The demo with LoRA, 2 steps, evaluated on a few MUSE examples."""
    out = tmp_path_factory.mktemp("lora")
    run(load_recipe(DEMO, ["train.max_steps=2", *SMALL, "eval.muse.max_examples=2",
                           "eval.compare_base=false", "eval.bootstrap=0", f"output_dir={out}"]))
    return out


def test_lora_blur_run_saves_the_merged_model_and_the_adapter(embedded, lora_run):
    from transformers import AutoModelForCausalLM

    assert "unlearned" in json.loads((lora_run / "results.json").read_text())["models"]
    assert len(log_rows(lora_run)) == 2
    base = load_file(embedded / "target" / "model.safetensors")
    merged = weights(lora_run)
    assert merged.keys() == base.keys()
    adapter = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (R, ALPHA)
    moved = 0.0
    for key in base:
        a_key = "base_model.model." + key.replace(".weight", ".lora_A.weight")
        if a_key not in adapter:
            assert torch.equal(merged[key], base[key]), key
            continue
        b = adapter[a_key.replace("lora_A", "lora_B")].double()
        delta = (ALPHA / R) * b @ adapter[a_key].double()
        # float32 weights (|W| < 1): W + delta rounded once, within an ulp of 1 (1.2e-7)
        torch.testing.assert_close(merged[key].double() - base[key].double(), delta,
                                   rtol=0, atol=1e-6)
        moved = max(moved, delta.abs().max().item())
    assert moved > 1e-4  # two steps moved the adapters
    # the adapter folder loads as base + adapter (transformers with peft) to the same function
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        via_adapter = AutoModelForCausalLM.from_pretrained(lora_run / "adapter")(ids).logits
        via_merged = AutoModelForCausalLM.from_pretrained(lora_run / "model")(ids).logits
    torch.testing.assert_close(via_adapter, via_merged, rtol=1e-4, atol=1e-4)


def _staged(run_dir, *recipe_changes) -> tuple[set[str], dict]:
    """Stage a copy of ``run_dir`` whose recipe.yaml has ``recipe_changes`` applied."""
    import yaml

    from blurctl.hub.publish import stage

    copy = run_dir.parent / f"{run_dir.name}-copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run_dir, copy)
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    for change in recipe_changes:
        change(recipe)
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    staged = stage(copy, "org/demo-lora", [])
    card = (staged / "README.md").read_text()
    assert (copy / "adapter" / "README.md").read_text() != card  # the run's files stay as they were
    return {p.name for p in staged.iterdir()}, yaml.safe_load(card.split("---")[1]) | {"text": card}


def test_publish_uploads_the_merged_model_or_the_adapter(lora_run):
    files, card = _staged(lora_run)  # peft.merge: true (the default)
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= files
    assert not {"adapter_config.json", "adapter_model.safetensors"} & files
    assert card["library_name"] == "transformers" and "lora" in card["tags"]
    assert "they are merged\ninto these weights, which load as any model" in card["text"]

    def adapter_only(recipe):
        recipe["peft"]["merge"] = False

    def hub_base(recipe):
        recipe["model"]["path"] = "muse-bench/MUSE-News_target"

    files, card = _staged(lora_run, adapter_only, hub_base)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md",
            "recipe.yaml", "results.json"} <= files
    assert not {"model.safetensors", "config.json"} & files
    assert card["base_model"] == "muse-bench/MUSE-News_target" and card["library_name"] == "peft"
    assert ('PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("muse-bench/'
            in card["text"])


def test_checkpoints_hold_the_adapters_and_resume_exactly(embedded, tmp_path):
    """Run 3 steps with a checkpoint after each (dropout on, so the RNG state matters), then
    remove the outputs and the newest checkpoint and resume from step 1: same weights."""
    every = ["train.max_steps=3", "train.save_every=1", *FAST, "peft.dropout=0.1",
             f"output_dir={tmp_path}"]
    run(load_recipe(DEMO, every))
    straight, straight_adapter, rows = weights(tmp_path), load_file(
        tmp_path / "adapter" / "adapter_model.safetensors"), log_rows(tmp_path)
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [1, 2]
    first = checkpoint_dirs(tmp_path)[0][1]
    saved = load_file(first / "model.safetensors")
    assert saved and all(".lora_" in k for k in saved)  # the adapters alone, not the base
    shutil.rmtree(checkpoint_dirs(tmp_path)[1][1])
    shutil.rmtree(tmp_path / "model")
    shutil.rmtree(tmp_path / "adapter")

    run(load_recipe(DEMO, every), resume=True)

    resumed = weights(tmp_path)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(straight_adapter[k], adapter[k]) for k in straight_adapter)
    assert log_rows(tmp_path) == rows
    from transformers import AutoModelForCausalLM

    assert hasattr(AutoModelForCausalLM.from_pretrained(first), "peft_config")  # eval --model


def test_rmu_with_lora_adapts_the_steered_modules_and_reads_the_base(embedded, tmp_path):
    unlearner = _unlearner(tmp_path, *RMU)
    trainable = [n for n, p in unlearner.model.named_parameters() if p.requires_grad]
    assert {n.split(".lora_")[0].removeprefix("base_model.model.") for n in trainable} == {
        "model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"}
    batch = _forget_batch(unlearner)
    with torch.no_grad():
        expected = hidden_at(_original(embedded), batch, 2)
    unlearner.step(0)
    with torch.no_grad():
        h_ref = hidden_at(unlearner.reference, batch, 2)
        h_model = hidden_at(unlearner.model, batch, 2)
    torch.testing.assert_close(h_ref, expected, rtol=1e-5, atol=1e-5)
    assert (h_model - expected).abs().max() > 1e-4


def test_task_vector_with_lora_negates_the_adapter(embedded, tmp_path):
    """theta - s (alpha/r) B A: the saved adapter's B is -s times the fine-tuned one, and the
    merged model is the base plus that adapter."""
    unlearner = _unlearner(tmp_path, "algorithm.combiner=task_vector", "algorithm.forget_loss=ga",
                           "algorithm.retain_loss=null", "data.retain=null",
                           "algorithm.task_vector_scale=2.0", "train.lr=0.01")
    unlearner.step(0)
    tuned = {k: v.detach().clone() for k, v in unlearner.model.state_dict().items()
             if ".lora_" in k}
    merged = load_file(unlearner.finish() / "model.safetensors")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    base = load_file(embedded / "target" / "model.safetensors")
    for key, value in tuned.items():
        saved = adapter[key.replace(".default", "")]
        torch.testing.assert_close(saved, -2.0 * value if ".lora_B." in key else value)
    w = "model.layers.0.self_attn.q_proj"
    a = tuned[f"base_model.model.{w}.lora_A.default.weight"].double()
    b = tuned[f"base_model.model.{w}.lora_B.default.weight"].double()
    delta = merged[f"{w}.weight"].double() - base[f"{w}.weight"].double()
    assert delta.abs().max() > 1e-6
    torch.testing.assert_close(delta, -2.0 * (ALPHA / R) * b @ a, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("overrides", "message"), [
    (["hardware.strategy=fsdp"], "peft: LoRA with hardware.strategy fsdp is not supported"),
    ([*RMU, "peft.target_modules=[q_proj]"], ("peft.target_modules: with the rmu losses the "
                                              "adapters go on steering.param_suffix's module")),
    ([*RMU, "steering.param_suffix=mlp.down_proj"], ("steering.param_suffix: with peft it must "
                                                      "name a weight")),
])
def test_unsupported_combinations_are_refused_by_the_recipe(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(DEMO, [*LORA, *overrides])


def test_preflight_names_missing_layers_and_a_missing_peft(embedded, monkeypatch):
    report = preflight.check_inputs(load_recipe(DEMO, [*LORA, "peft.target_modules=[qq_proj]"]))
    assert [p for p in report.problems if p.startswith("peft")] == [
        ("peft.target_modules: Target modules {'qq_proj'} not found in the base model. Please "
         "check the target modules and try again.")]
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "peft" else real(name, *a))
    report = preflight.check_inputs(load_recipe(DEMO, LORA))
    missing = "peft: the peft library is not installed (pip install 'blurctl[peft]')"
    assert missing in report.problems


def test_run_refuses_an_unknown_layer_before_writing(embedded, tmp_path):
    result = CliRunner().invoke(app, ["run", str(DEMO), *FAST, "peft.target_modules=[qq_proj]",
                                      f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2
    assert "error: peft.target_modules: Target modules {'qq_proj'} not found" in result.stderr
    assert not (tmp_path / "run").exists()


def test_resume_refuses_adapters_that_do_not_match(embedded, tmp_path):
    every = ["train.max_steps=2", "train.save_every=1", *FAST, f"output_dir={tmp_path}"]
    run(load_recipe(DEMO, every))
    ((_, path),) = checkpoint_dirs(tmp_path)
    state = load_file(path / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k.replace("lora_A", "lora_X"): v for k, v in state.items()},
              path / "model.safetensors")
    shutil.rmtree(tmp_path / "model")
    with pytest.raises(BlurctlError, match="checkpoint does not match the model .adapter entries "
                                           "differ"):
        run(load_recipe(DEMO, every), resume=True)


def test_adapter_folders_sit_beside_their_models(tmp_path):
    from blurctl.rundir import RunDir, earlier_run

    run_dir = RunDir(tmp_path)
    assert run_dir.adapter_of(run_dir.model) == tmp_path / "adapter"
    assert run_dir.adapter_of(run_dir.epoch(3)) == tmp_path / "epochs" / "epoch-3-adapter"
    (tmp_path / "adapter").mkdir()
    (tmp_path / ".adapter.tmp").mkdir()
    assert earlier_run(tmp_path) == ["adapter"]
    run_dir.clear()  # --overwrite
    assert list(tmp_path.iterdir()) == []
