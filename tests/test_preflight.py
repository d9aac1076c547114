"""validate --preflight: corpora, tokenizer, model config, RMU layers, memory."""

import pytest
from helpers import DEMO
from typer.testing import CliRunner

from blurctl import models
from blurctl.cli import app
from blurctl.pipeline import preflight
from blurctl.recipe import load_recipe

runner = CliRunner()


def test_demo_passes_preflight_with_a_memory_estimate(embedded):
    result = runner.invoke(app, ["validate", "-q", str(DEMO), "--preflight"])
    assert result.exit_code == 0, result.stderr
    assert "preflight: memory: about" in result.stderr and "preflight passed" in result.stderr


def test_every_problem_is_reported_at_once(embedded, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = runner.invoke(app, ["validate", "-q", str(DEMO), "--preflight",
                                 f"data.forget={tmp_path / 'missing.txt'}",
                                 f"data.retain={tmp_path / 'empty.txt'}",
                                 "algorithm.forget_loss=rmu", "algorithm.retain_loss=rmu",
                                 "steering.layer=9", "steering.update_layers=[1]"])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    assert "missing.txt: no such file" in errors[0]
    assert "empty.txt: corpus is empty" in errors[1]
    assert "steering: layer 9 out of range; the model has 4 layers" in errors[2]


def test_memory_that_does_not_fit_is_refused(embedded, monkeypatch):
    monkeypatch.setattr(preflight, "available_bytes", lambda recipe: (1_000_000, "free RAM"))
    report = preflight.check_inputs(load_recipe(DEMO))
    assert any(p.startswith("hardware: training needs about") for p in report.problems)


def test_data_max_len_is_checked_only_where_a_corpus_uses_it(embedded):
    from types import SimpleNamespace

    from blurctl.recipe import load_recipe

    config = SimpleNamespace(max_position_embeddings=512)
    forget = "data.forget={path: embedded:corpus/raw/forget.txt, max_len: 128}"
    own = load_recipe(DEMO, ["data.max_len=4096", forget])
    assert models.length_problems(own, config) == [
        "data.max_len: 4096 is beyond the model's 512 positions"]  # the retain corpus uses it
    both = load_recipe(DEMO, ["data.max_len=4096", forget,
                              "data.retain={path: embedded:corpus/raw/retain1.txt, max_len: 600}"])
    assert models.length_problems(both, config) == [
        "data.retain.0.max_len: 600 is beyond the model's 512 positions"]


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_before_training(embedded, tmp_path):
    """Token ids past the embedding rows would fail inside the first forward pass."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from blurctl.errors import InputError
    from blurctl.pipeline.job import run

    small = tmp_path / "small"
    LlamaForCausalLM(LlamaConfig(vocab_size=768, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4)).save_pretrained(small)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded / "tokenizer" / name, small / name)
    overrides = [f"model.path={small}", f"output_dir={tmp_path / 'run'}"]
    result = runner.invoke(app, ["validate", str(DEMO), "--preflight", *overrides])
    assert result.exit_code != 0
    assert f"model.tokenizer: {small} needs 1536 token ids but the model at {small} embeds only 768" \
        in result.output + result.stderr
    with pytest.raises(InputError, match="embeds only 768"):
        run(load_recipe(DEMO, overrides))
    assert not (tmp_path / "run" / "model").exists()
