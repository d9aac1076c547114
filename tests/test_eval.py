"""MUSE metrics (docs/method.md), lm-eval, and the eval command."""

import json

import pytest
import torch
from helpers import DEMO
from typer.testing import CliRunner

from blurctl.cli import app
from blurctl.data.muse_corpus import MuseCorpus
from blurctl.errors import BlurctlError
from blurctl.evaluate.muse import (
    auc_ci,
    bootstrap_ci,
    cut_answer,
    generate,
    membership_auc,
    mink_scores,
    privleak,
    rouge_l_f1,
)
from blurctl.recipe import load_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def target(embedded):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(embedded / "target").eval(),
            AutoTokenizer.from_pretrained(embedded / "target"))


def test_batched_greedy_equals_one_at_a_time(embedded, target):
    model, tok = target
    corpus = MuseCorpus(str(embedded / "corpus"))
    icl = corpus.items("knowmem", "forget_qa_icl")
    shots = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in icl)
    prompts = [shots + f"Question: {q['question']}\nAnswer: "
               for q in corpus.items("knowmem", "retain_qa")[:12]]
    prompts += [v["prompt"] for v in corpus.items("verbmem", "forget")[:6]]
    batched = generate(model, tok, prompts, 24, batch_size=9)
    single = generate(model, tok, prompts, 24, batch_size=1)
    assert batched == single
    assert len({len(tok(p)["input_ids"]) for p in prompts}) > 1  # padding really happened


def test_rouge_and_cut_rules():
    assert rouge_l_f1("Golden Compass", "Golden Compass") == 1.0
    assert rouge_l_f1("a b", "a c") == pytest.approx(0.5)
    assert rouge_l_f1("", "x") == 0.0
    assert cut_answer(" Blue Heron\n\nQuestion: next") == " Blue Heron"
    assert cut_answer("1996\nQuestion what") == "1996"
    assert cut_answer("1996 Question: what") == "1996 "
    assert cut_answer("Jade Anchor\nmore") == "Jade Anchor\nmore"
    # a bare "Question" inside an answer is part of it (MUSE cuts only at the three stops)
    assert cut_answer("the Question Mark prize") == "the Question Mark prize"


def test_verbmem_reference_keeps_the_bos_slot(target):
    from blurctl.evaluate.muse import verbmem_reference

    _, tok = target
    gt = "A somewhat longer text with more tokens in it, to cut somewhere."
    ids = tok(gt, add_special_tokens=False)["input_ids"]
    assert tok(gt)["input_ids"][0] == tok.bos_token_id
    # 5 slots: the BOS takes one, so 4 ids of the text remain
    assert verbmem_reference(tok, gt, 5) == tok.decode(ids[:4])


def test_mink_matches_hand_computation(target):
    model, tok = target
    texts = ["Short text here.", "A somewhat longer text with more tokens in it, to pad."]
    got = mink_scores(model, tok, texts, batch_size=2)
    for text, score in zip(texts, got, strict=True):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        per_token = logp.gather(1, ids[0, 1:, None])[:, 0].sort().values
        k = max(1, int(0.4 * len(per_token)))  # MUSE: int(len * ratio), floor
        assert score == pytest.approx(-per_token[:k].mean().item(), rel=1e-4)


def test_auc_orientation_and_intervals():
    members, unseen = [0.1, 0.2, 0.3], [1.0, 1.1, 1.2]
    # MUSE: a model that memorised D_f (low Min-K% on forget texts) has AUC near 0
    assert membership_auc(members, unseen) == 0.0
    assert membership_auc(unseen, members) == 1.0
    assert membership_auc([0.5, 0.7], [0.5, 0.7]) == 0.5
    assert privleak(0.75, 0.5) == pytest.approx(50.0)
    # with MUSE's published News retrained AUC, a fully memorising model is about -100
    # and a model identical to the retrained one is exactly 0
    assert privleak(membership_auc(members, unseen), 0.4772) == pytest.approx(-100.0)
    assert privleak(0.4772, 0.4772) == 0.0
    ci = bootstrap_ci([10.0, 20.0, 30.0, 40.0], 500)
    assert ci[0] <= 25.0 <= ci[1] and ci == bootstrap_ci([10.0, 20.0, 30.0, 40.0], 500)
    assert bootstrap_ci([1.0, 2.0], 0) is None
    lo, hi = auc_ci([0.1, 0.5, 0.3, 0.9], [0.4, 1.0, 0.8, 0.2], 300)
    assert 0 <= lo <= membership_auc([0.1, 0.5, 0.3, 0.9], [0.4, 1.0, 0.8, 0.2]) <= hi <= 1


def test_lm_eval_in_memory_and_checkpoint_agree(embedded, target):
    from blurctl.evaluate.harness import run_lm_eval

    model, tok = target
    cfg = load_recipe(DEMO).eval.lm_eval
    in_memory = run_lm_eval(model, tok, cfg)
    from_dir = run_lm_eval(str(embedded / "target"), tok, cfg)
    assert set(in_memory) == {"embedded_forget_mc", "embedded_retain_mc", "embedded_retain1_mc"}
    for task in in_memory:
        assert in_memory[task]["acc"] == pytest.approx(from_dir[task]["acc"])
    assert in_memory["embedded_forget_mc"]["acc"] > 0.6  # the target knows D_f; chance is 0.25


def test_unknown_lm_eval_task_is_named(embedded, target):
    from blurctl.evaluate.harness import run_lm_eval

    cfg = load_recipe(DEMO, ["eval.lm_eval.tasks=[embedded_forget_mcq]"]).eval.lm_eval
    with pytest.raises(BlurctlError, match="unknown task 'embedded_forget_mcq' .did you mean 'embedded_forget_mc'"):
        run_lm_eval(*target, cfg)


def test_eval_crash_keeps_model_and_eval_finishes_later(embedded, tmp_path, monkeypatch):
    import blurctl.evaluate.stage as evaluation
    from blurctl.pipeline.job import run

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(evaluation, "evaluate_muse", crash, raising=False)
    monkeypatch.setattr("blurctl.evaluate.muse.evaluate_muse", crash)
    recipe = load_recipe(DEMO, ["train.max_steps=2", "eval.compare_base=false", "eval.lm_eval=null",
                                "eval.muse.max_examples=3", "eval.bootstrap=50", f"output_dir={tmp_path}"])
    with pytest.raises(BlurctlError, match=r"evaluation failed: RuntimeError: CUDA error.*blurctl eval"):
        run(recipe)
    assert (tmp_path / "model" / "model.safetensors").exists()
    monkeypatch.undo()

    result = runner.invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "results.json").read_text())["models"]["unlearned"]
    assert {"verbmem_f", "knowmem_f", "knowmem_r", "privleak", "knowmem_f_ci"} <= set(scores)


def test_eval_of_a_recipe_evaluates_its_base_model(embedded, tmp_path):
    result = runner.invoke(app, ["eval", str(DEMO), "eval.lm_eval=null", "eval.muse.max_examples=3",
                                 "eval.bootstrap=0", f"output_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    models = json.loads((tmp_path / "eval" / "results.json").read_text())["models"]
    assert set(models) == {"base", "retrained"}
    assert models["retrained"]["privleak"] == pytest.approx(0.0)


def test_privleak_is_left_undefined_when_the_retrained_auc_is_zero(embedded, tmp_path):
    # the target as "retrained": it separates its forget texts from unseen ones perfectly
    result = runner.invoke(app, ["eval", str(DEMO), "eval.lm_eval=null", "eval.muse.max_examples=4",
                                 "eval.muse.retrained_model=embedded:target", "eval.bootstrap=0",
                                 f"output_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert "PrivLeak is undefined: the retrained model's privleak AUC is 0" in result.stderr
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["retrained_auc"] == 0.0
    assert all("privleak" not in s and "privleak_auc" in s for s in results["models"].values())
