"""Where evaluation runs: the device and dtype chosen from the recipe, models loaded straight
there, and `blurctl eval` evaluating every model so placed; the attention kernel option."""

import json

import pytest
import torch
from helpers import DEMO
from typer.testing import CliRunner

from blurctl.cli import app
from blurctl.errors import InputError
from blurctl.models import Placement, eval_placement, load_model
from blurctl.recipe import load_recipe

runner = CliRunner()


@pytest.mark.parametrize("gpu, overrides, expected", [
    (True, ["hardware.device=auto", "hardware.mixed_precision=bf16"],
     Placement("cuda", torch.bfloat16)),
    (True, ["hardware.device=cuda", "hardware.mixed_precision=fp16"],
     Placement("cuda", torch.float16)),
    (True, ["hardware.device=auto"], Placement("cuda", None)),  # the checkpoint's own dtype
    (True, ["hardware.device=auto", "hardware.mixed_precision=bf16", "model.dtype=float32"],
     Placement("cuda", torch.float32)),  # an explicit model.dtype wins
    (True, ["hardware.device=cpu", "hardware.mixed_precision=bf16"], Placement("cpu", None)),
    (False, ["hardware.device=auto", "hardware.mixed_precision=bf16"], Placement("cpu", None)),
    (False, ["hardware.device=cpu", "model.dtype=bfloat16"], Placement("cpu", torch.bfloat16)),
])
def test_device_and_dtype_follow_the_recipe(monkeypatch, gpu, overrides, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert eval_placement(load_recipe(DEMO, overrides)) == expected


def test_cuda_without_a_gpu_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match=r"^hardware.device: 'cuda', but no GPU is visible here"):
        eval_placement(load_recipe(DEMO, ["hardware.device=cuda"]))


@pytest.mark.parametrize("device, dtype", [("meta", torch.bfloat16), ("cpu", torch.bfloat16),
                                           ("cpu", None)])
def test_models_load_straight_onto_the_device_in_the_dtype(embedded, device, dtype):
    from safetensors.torch import load_file

    model = load_model(load_recipe(DEMO).model, placement=Placement(device, dtype))
    stored = load_file(embedded / "target" / "model.safetensors")
    for name, p in model.named_parameters():
        assert p.device.type == device and p.dtype == (dtype or torch.float32), name
        if device == "cpu":
            torch.testing.assert_close(p, stored[name].to(p.dtype), rtol=0, atol=0)


def test_eval_evaluates_every_model_where_the_placement_says(embedded, tmp_path, monkeypatch):
    import blurctl.evaluate.muse as muse

    seen = []
    real_muse, real_auc = muse.evaluate_muse, muse.forget_auc

    def spy_muse(model, *args, **kwargs):
        seen.append((next(model.parameters()).device.type, model.dtype))
        return real_muse(model, *args, **kwargs)

    def spy_auc(model, *args, **kwargs):
        seen.append((next(model.parameters()).device.type, model.dtype))
        return real_auc(model, *args, **kwargs)

    monkeypatch.setattr(muse, "evaluate_muse", spy_muse)
    monkeypatch.setattr(muse, "forget_auc", spy_auc)
    result = runner.invoke(app, ["eval", str(DEMO), "eval.lm_eval=null", "eval.muse.max_examples=3",
                                 "eval.muse.verbmem_max_new_tokens=8",
                                 "eval.muse.knowmem_max_new_tokens=8",
                                 "eval.bootstrap=0", "eval.compare_base=false",
                                 "model.dtype=bfloat16", f"output_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert seen == [("cpu", torch.bfloat16)] * 2  # the base model, then the retrained one's AUC
    scores = json.loads((tmp_path / "eval" / "results.json").read_text())["models"]["base"]
    assert 0 <= scores["privleak_auc"] <= 1


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_attn_implementation_reaches_from_pretrained(embedded, kernel):
    model = load_model(load_recipe(DEMO, [f"model.attn_implementation={kernel}"]).model)
    assert model.config._attn_implementation == kernel


def test_flash_attention_without_its_package_is_refused_by_preflight(embedded, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real(name, *a))
    result = runner.invoke(app, ["validate", "-q", str(DEMO), "--preflight",
                                 "model.attn_implementation=flash_attention_2"])
    assert result.exit_code == 2
    assert ("model.attn_implementation: flash_attention_2 needs the flash-attn package, which is "
            "not installed (pip install flash-attn; or use sdpa)") in result.stderr


def test_a_deleted_model_is_freed_before_the_next_one_loads(embedded):
    """A transformers model can sit in reference cycles (a freshly loaded one does in a new
    process), which ``del`` alone leaves allocated until the collector runs;
    ``release_memory`` (called between the models evaluation loads, and after training)
    frees it at once."""
    import gc
    import weakref

    from blurctl.models import release_memory

    gc.disable()  # so that only release_memory can collect
    try:
        model = load_model(load_recipe(DEMO).model, placement=Placement("cpu", None))
        alive = weakref.ref(model)
        del model
        release_memory()
        assert alive() is None
    finally:
        gc.enable()
