"""Every supported model family, as a tiny random model with the embedded tokenizer: its
decoder layers, BLUR steps and MUSE evaluation through `blurctl run`, RMU at a middle layer
with the family's default parameter, and 2-process FSDP2 for two families."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from helpers import DEMO, free_port, log_rows, weights
from safetensors.torch import load_file
from typer.testing import CliRunner

from blurctl.cli import app
from blurctl.models import (
    MLP_OUTPUT,
    decoder_layers,
    load_model,
    model_skeleton,
    prepare_for_training,
    rmu_parameter_names,
    steering_problems,
)
from blurctl.recipe import load_recipe

LAYERS = 3
VOCAB = 1536  # the embedded tokenizer's size (a preflight check refuses a smaller model)
SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GATED = dict(SIZES, intermediate_size=64, num_key_value_heads=2)
# family -> (config class, its arguments, the full name RMU trains at layer 1 by default)
FAMILIES = {
    "llama": ("LlamaConfig", GATED, "model.layers.1.mlp.down_proj.weight"),
    "mistral": ("MistralConfig", dict(GATED, sliding_window=None),
                "model.layers.1.mlp.down_proj.weight"),
    "qwen2": ("Qwen2Config", GATED, "model.layers.1.mlp.down_proj.weight"),
    "gemma": ("GemmaConfig", dict(GATED, head_dim=8), "model.layers.1.mlp.down_proj.weight"),
    "gpt_neox": ("GPTNeoXConfig", dict(SIZES, intermediate_size=64),
                 "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"),
    "phi3": ("Phi3Config", GATED, "model.layers.1.mlp.down_proj.weight"),
    # OPT's default dropout of 0.1 would make the runs of one and of two processes differ
    "opt": ("OPTConfig", dict(SIZES, ffn_dim=64, word_embed_proj_dim=32, dropout=0.0),
            "model.decoder.layers.1.fc2.weight"),
}
FAST = ["train.max_steps=2", "train.batch_size=2", "data.max_len=32", "eval.lm_eval=null",
        "eval.muse.max_examples=3", "eval.muse.verbmem_max_new_tokens=4",
        "eval.muse.knowmem_max_new_tokens=4", "eval.muse.retrained_model=null",
        "eval.muse.retrained_auc=0.5", "eval.bootstrap=0", "hardware.device=cpu"]
runner = CliRunner()


@pytest.fixture(scope="module")
def family_dirs(embedded, tmp_path_factory):
    """family -> a folder holding the tiny random model and the embedded tokenizer."""
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for family, (cls, kwargs, _) in FAMILIES.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kwargs))
        model.save_pretrained(root / family)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(embedded / "tokenizer" / name, root / family / name)
        dirs[family] = root / family
    return dirs


def recipe_for(path, *overrides):
    return load_recipe(DEMO, [f"model.path={path}", *FAST, *overrides])


@pytest.mark.parametrize("family", sorted(MLP_OUTPUT))
def test_every_listed_default_names_a_parameter_of_the_family(family):
    """Each MLP_OUTPUT entry against the family's real modules (meta device, no weights)."""
    config = transformers.AutoConfig.for_model(family)
    config.num_hidden_layers = 2
    recipe = load_recipe(DEMO, ["algorithm.forget_loss=rmu", "algorithm.retain_loss=rmu",
                                "steering.layer=1", "steering.update_layers=[1]"])
    skeleton = model_skeleton(config, recipe)
    [name] = rmu_parameter_names(skeleton, recipe)
    assert name in dict(skeleton.named_parameters()) and name.endswith(f".1.{MLP_OUTPUT[family]}")


def test_a_family_without_a_default_is_one_clear_error():
    config = transformers.AutoConfig.for_model("mixtral")  # MoE: no single MLP output
    config.num_hidden_layers = 2
    recipe = load_recipe(DEMO, ["algorithm.forget_loss=rmu", "algorithm.retain_loss=rmu",
                                "steering.layer=1", "steering.update_layers=[1]"])
    [problem] = steering_problems(recipe, config)
    layer = decoder_layers(model_skeleton(config, recipe))[0]
    own = ", ".join(n for n, _ in layer.named_parameters())
    assert problem == ("steering.param_suffix: no default for model type 'mixtral'; name the "
                       f"parameter of a decoder layer to train (a layer's parameters: {own})")


@pytest.mark.parametrize("family", FAMILIES)
def test_blur_steps_and_muse_eval_through_blurctl_run(family_dirs, tmp_path, family):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(DEMO), f"model.path={family_dirs[family]}", *FAST,
                                 f"output_dir={out}"])
    assert result.exit_code == 0, result.output + str(result.exception)
    rows = log_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["forget_loss"]) and r["forget_sq"] > 0 for r in rows)
    before = load_file(family_dirs[family] / "model.safetensors")
    after = weights(out)
    assert after.keys() == before.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the steps trained it
    scores = json.loads((out / "results.json").read_text())["models"]["unlearned"]
    for key in ("verbmem_f", "knowmem_f", "knowmem_r", "privleak_auc", "privleak"):
        assert math.isfinite(scores[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_rmu_at_a_middle_layer_trains_the_familys_mlp_output(family_dirs, family):
    """The default parameter of layer 1 of 3 trains and nothing else; the loss reads that
    layer's own output (transformers' hidden_states[2] for a layer that is not the last)."""
    from blurctl.data.corpora import collate, corpus_chunks
    from blurctl.models import load_tokenizer
    from blurctl.unlearn.losses import LossContext, control_vector, rmu_forget

    recipe = recipe_for(family_dirs[family], "algorithm.forget_loss=rmu",
                        "algorithm.retain_loss=rmu", "steering.layer=1",
                        "steering.update_layers=[1]", "steering.coeff=5.0")
    assert steering_problems(recipe, load_model(recipe.model).config) == []
    model = load_model(recipe.model)
    prepare_for_training(model, recipe)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == [FAMILIES[family][2]]

    tokenizer = load_tokenizer(recipe.model)
    [chunks] = corpus_chunks(recipe.data.forget, "data.forget", tokenizer, recipe.data)
    batch = collate(chunks[:2], tokenizer.pad_token_id)
    u = control_vector(model.config.hidden_size, 0)
    ctx = LossContext(recipe.algorithm, recipe.steering, u, 5.0)
    loss = rmu_forget(model, None, batch, ctx)
    with torch.no_grad():
        h = model(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                  output_hidden_states=True).hidden_states[2]
    mask = batch["attention_mask"].bool()
    by_hand = (h - 5.0 * u).pow(2).mean(-1)[mask].mean()
    torch.testing.assert_close(loss.detach(), by_hand, rtol=1e-5, atol=1e-6)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert changed == trained
    assert len(decoder_layers(model)) == LAYERS


@pytest.mark.parametrize("family, loss", [("llama", "ga"), ("gpt_neox", "ga"), ("opt", "rmu")])
def test_gradient_checkpointing_gives_the_same_gradients(family_dirs, family, loss):
    """Checkpointing recomputes the same float operations: gradients agree to float32
    rounding (the recomputed forward may pick other kernels' summation order). With RMU
    the loss reads a middle layer's output through a hook, which must still see it."""
    from blurctl.unlearn.losses import LossContext, control_vector, nll, rmu_forget

    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    rmu = ["algorithm.retain_loss=rmu", "steering.layer=1", "steering.update_layers=[0,1]"]
    grads = {}
    for checkpointing in (False, True):
        recipe = recipe_for(family_dirs[family], f"algorithm.forget_loss={loss}",
                            f"train.gradient_checkpointing={str(checkpointing).lower()}",
                            *(rmu if loss == "rmu" else []))
        model = load_model(recipe.model)
        prepare_for_training(model, recipe)
        model.train()
        if loss == "rmu":
            ctx = LossContext(recipe.algorithm, recipe.steering, control_vector(32, 0), 5.0)
            rmu_forget(model, None, batch, ctx).backward()
        else:
            nll(model, batch).backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert model.config.use_cache is not checkpointing
    assert any(m.gradient_checkpointing for m in model.modules()
               if hasattr(m, "gradient_checkpointing"))
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        assert g is not None and g.abs().max() > 0, name
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-7, msg=name)


# SGD: equal runs differ only by lr x float32 rounding of the reduced gradients (as in
# tests/test_distributed.py), so one process and two agree on any CPU.
EQUAL = ["train.optimizer=sgd", "train.lr=0.01", "eval.muse=null", "eval.lm_eval=null",
         "train.max_steps=2",
         "hardware.device=cpu", "data.max_len=32"]


@pytest.mark.parametrize("family", ["opt", "gpt_neox"])
def test_two_process_fsdp2_matches_one_process(family_dirs, tmp_path, family):
    path = f"model.path={family_dirs[family]}"
    single = tmp_path / "single"
    result = runner.invoke(app, ["run", str(DEMO), path, *EQUAL, "train.batch_size=4",
                                 f"output_dir={single}"])
    assert result.exit_code == 0, result.output
    multi = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "blurctl", "run", str(DEMO), path, *EQUAL, "train.batch_size=2",
           "hardware.strategy=fsdp", f"output_dir={multi}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for one, two in zip(log_rows(single), log_rows(multi), strict=True):
        for key in ("forget_loss", "retain_loss", "dot", "forget_sq", "retain_sq"):
            assert two[key] == pytest.approx(one[key], rel=2e-4, abs=1e-7), (key, one["step"])
    a, b = weights(single), weights(multi)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=2e-5, msg=name)
    start = load_file(family_dirs[family] / "model.safetensors")
    assert max((a[n] - start[n]).abs().max().item() for n in a) > 1e-4  # the runs trained
