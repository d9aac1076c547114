"""Every number in results.json recomputed from the run folder by a transcription of
MUSE's own metric code (tests/muse_transcription.py, which does not import blurctl)."""

import json

import muse_transcription as muse
import pytest
from helpers import DEMO


@pytest.fixture(scope="module")
def run_dir(embedded, tmp_path_factory):
    from blurctl.pipeline.job import run
    from blurctl.recipe import load_recipe

    out = tmp_path_factory.mktemp("fidelity")
    run(load_recipe(DEMO, ["train.max_steps=4", "eval.lm_eval=null", "eval.bootstrap=0",
                           "eval.muse.max_examples=10", f"output_dir={out}"]))
    return out


def test_results_equal_muse_formulas_on_the_saved_records(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["models"]) == {"base", "unlearned", "retrained"}
    deviations = muse.largest_deviations(run_dir)
    assert set(deviations) == {"verbmem_f", "knowmem_f", "knowmem_r", "privleak_auc", "privleak"}
    for metric, dev in deviations.items():
        assert dev <= 1e-6, metric
    assert results["retrained_auc"] == results["models"]["retrained"]["privleak_auc"]
    assert results["models"]["retrained"]["privleak"] == 0.0


def test_records_are_what_muse_derives_from_the_raw_outputs(run_dir):
    from transformers import AutoTokenizer

    examples = json.loads((run_dir / "eval_examples.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    for model, records in examples.items():
        assert muse.check_records(records, tokenizer, verbmem_tokens=128) == [], model
        assert {len(records["privleak"]["forget"]), len(records["privleak"]["holdout"])} == {10}
        for e in records["knowmem_f"]:
            assert e["prompt"].startswith("Question: ") and e["prompt"].endswith(
                f"Question: {e['question']}\nAnswer: ")


def test_min_k_and_greedy_outputs_recomputed_from_the_saved_model(run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    records = json.loads((run_dir / "eval_examples.json").read_text())["unlearned"]
    for split in ("forget", "holdout"):
        for r in records["privleak"][split]:
            # batched (right-padded) vs MUSE's one text at a time, both float32:
            # the log-prob sums differ by float rounding only
            assert r["mink"] == pytest.approx(muse.min_k(r["text"], model, tokenizer), rel=1e-5)
    for e in records["verbmem_f"][:3]:
        assert e["raw_output"] == muse.greedy(model, tokenizer, e["prompt"], 128)
    for name in ("knowmem_f", "knowmem_r"):  # generation stops at the cut: the same answer
        for e in records[name][:3]:
            full = muse.greedy(model, tokenizer, e["prompt"], 32)
            assert e["output"] == muse.get_prefix_before_words_occur(
                full, ["\n\n", "\nQuestion", "Question:"]), name
