"""The training memory estimate: each part against what torch really allocates on a small
model, the activation formula against autograd's saved tensors, the fit advice, the CLI, and
the README's 7B tables."""

import pytest
import torch
from helpers import DEMO, ROOT
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from blurctl.cli import app
from blurctl.models import prepare_for_training
from blurctl.pipeline import memory
from blurctl.recipe import load_recipe

runner = CliRunner()


def part(estimate, name):
    return {p.name: p.bytes for p in estimate.parts}.get(name, 0)


def shape_of(model, recipe):
    from blurctl.models import model_skeleton

    return memory.model_shape(model_skeleton(model.config, recipe), recipe)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_static_parts_equal_what_torch_allocates(embedded, dtype):
    """Weights, both gradient buffers and AdamW's moments (kept in the weights' dtype)."""
    from blurctl.models import load_model

    recipe = load_recipe(DEMO, [f"model.dtype={dtype}"])
    model = load_model(recipe.model)
    est = memory.estimate(recipe, shape_of(model, recipe))
    weights = sum(p.nbytes for p in model.parameters())
    assert part(est, "weights") == weights and part(est, "reference") == weights  # npo: a copy
    opt = torch.optim.AdamW(model.parameters())
    out = model(input_ids=torch.tensor([[1, 5, 9, 4]]), labels=torch.tensor([[1, 5, 9, 4]]))
    out.loss.backward()
    assert part(est, "gradients") == 2 * sum(p.grad.nbytes for p in model.parameters())
    opt.step()
    moments = sum(s[k].nbytes for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert part(est, "optimizer") == moments


def test_parts_follow_the_recipe(embedded):
    from blurctl.models import load_model

    base = load_recipe(DEMO, ["algorithm.forget_loss=ga"])
    shape = shape_of(load_model(base.model), base)
    ga = memory.estimate(base, shape)
    assert part(ga, "reference") == 0  # ga + gdr need no reference
    sgd = memory.estimate(load_recipe(DEMO, ["algorithm.forget_loss=ga", "train.optimizer=sgd"]),
                          shape)
    assert part(sgd, "optimizer") == 0
    fsdp = memory.estimate(load_recipe(DEMO, ["algorithm.forget_loss=ga", "hardware.strategy=fsdp",
                                              "hardware.num_processes=2"]), shape)
    for name in ("weights", "gradients", "optimizer"):
        assert part(fsdp, name) == pytest.approx(part(ga, name) / 2, abs=1)
    assert part(fsdp, "gathered layers") == 2 * shape.largest_layer * 4
    rmu = load_recipe(DEMO, ["algorithm.forget_loss=rmu", "algorithm.retain_loss=rmu",
                             "steering.layer=2", "steering.update_layers=[1,2]"])
    rmu_est = memory.estimate(rmu, shape_of(load_model(rmu.model), rmu))
    down = 128 * 384  # the embedded model's mlp.down_proj: hidden 128 x intermediate 384
    assert part(rmu_est, "gradients") == 2 * 2 * down * 4 and part(rmu_est, "logits") == 0
    checkpointed = memory.estimate(load_recipe(DEMO, ["algorithm.forget_loss=ga",
                                                      "train.gradient_checkpointing=true"]), shape)
    assert part(checkpointed, "activations") < part(ga, "activations") / 2


def saved_bytes(model, batch) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of the NLL (weights excluded)."""
    from blurctl.unlearn.losses import nll

    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll(model, batch)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in weights)


@pytest.mark.parametrize("dtype, attn, checkpointing", [
    ("float32", "sdpa", False), ("bfloat16", "sdpa", False), ("bfloat16", "eager", False),
    ("float32", "sdpa", True), ("bfloat16", "sdpa", True),
])
def test_activation_formula_matches_autograds_saved_tensors_per_layer(dtype, attn, checkpointing):
    """Per decoder layer (4 layers minus 2 layers, so the embedding and loss cancel). The
    formula leaves out a few per-token scalars (norm statistics) of the hundreds of values a
    layer keeps per token, so it agrees to within 2%."""
    batch_size, length, hidden, inter = 2, 96, 64, 176
    overrides = [f"model.dtype={dtype}", f"model.attn_implementation={attn}",
                 f"train.batch_size={batch_size}", f"data.max_len={length}",
                 f"train.gradient_checkpointing={str(checkpointing).lower()}",
                 "algorithm.forget_loss=ga"]
    recipe = load_recipe(DEMO, overrides)
    measured, estimated = {}, {}
    for layers in (2, 4):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=inter,
                             num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=4, attn_implementation=attn)
        model = LlamaForCausalLM(config).to(getattr(torch, dtype)).train()
        prepare_for_training(model, recipe)  # checkpointing as training enables it
        ids = torch.randint(3, 300, (batch_size, length))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        measured[layers] = saved_bytes(model, batch)
        width = 2 if dtype == "bfloat16" else 4
        estimated[layers] = memory.activation_bytes(recipe, shape_of(model, recipe), width)[0]
    per_layer = (measured[4] - measured[2]) / 2
    assert (estimated[4] - estimated[2]) / 2 == pytest.approx(per_layer, rel=0.02)


def test_advice_names_options_that_fit(embedded):
    from blurctl.models import load_model

    recipe = load_recipe(DEMO, ["data.max_len=512", "train.batch_size=8"])
    shape = shape_of(load_model(recipe.model), recipe)
    need = memory.estimate(recipe, shape).total
    with_checkpointing = memory.estimate(
        load_recipe(DEMO, ["data.max_len=512", "train.batch_size=8",
                           "train.gradient_checkpointing=true"]), shape).total
    have = (need + with_checkpointing) // 2
    [problem] = memory.memory_problems(recipe, shape, have, "free RAM")
    assert problem.startswith(f"hardware: training needs about {memory.gib(need)} GiB per device")
    options = memory.fitting_options(recipe, shape, have)
    assert options and options[0].startswith("train.gradient_checkpointing=true (about")
    for option in options:
        changed = memory.with_overrides(recipe, option.split(" (about")[0].split())
        assert memory.estimate(changed, shape).total <= have
    assert memory.memory_problems(recipe, shape, need, "free RAM") == []


def test_memory_command_prints_the_table_from_config_alone(embedded):
    result = runner.invoke(app, ["memory", str(DEMO), "--gpu-gib", "1e-6"])
    assert result.exit_code == 0, result.output
    assert "activations" in result.stdout and "total" in result.stdout
    assert "training needs about" in result.stdout and "would fit with" not in result.stdout


def test_readme_7b_tables_are_the_scripts_output(tmp_path):
    import importlib.util

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("memory_7b", ROOT / "benchmarks" / "memory_7b.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    published = {"llama-2-7b": 6_738_415_616, "zephyr-7b-beta": 7_241_732_096}
    for name, count in published.items():
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(
                AutoConfig.from_pretrained(script.write_config(name, tmp_path)))
        assert sum(p.numel() for p in model.parameters()) == count
    assert script.tables(tmp_path / "again") in (ROOT / "README.md").read_text()
