"""MUSE's metric code, transcribed, to recompute a run folder's results without blurctl.

Each function follows muse_bench (``metrics/verbmem.py``, ``knowmem.py``, ``privleak.py``,
``logger.py``, ``eval.py``) line for line in what it computes; it imports nothing from
blurctl, so it is an independent check of ``results.json`` from ``eval_examples.json``
(and, for Min-K% and generation, from the saved model).

    python tests/muse_transcription.py RUN_DIR     # prints the largest deviation per metric
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import auc as get_auc
from sklearn.metrics import roc_curve as get_roc_curve

SCORER = rouge_scorer.RougeScorer(rouge_types=["rouge1", "rouge2", "rougeL", "rougeLsum"],
                                  use_stemmer=False)


def rouge_l(gt: str, output: str) -> float:  # RougeEvalLogger.log
    return SCORER.score(gt, output)["rougeL"].fmeasure


def get_prefix_before_words_occur(string: str, words: list[str]) -> str:  # knowmem.py
    for word in words:
        string = string.split(word)[0]
    return string


def verbmem_gt_short(tokenizer, gt: str, max_new_tokens: int) -> str:  # verbmem.py
    gt_ids = tokenizer(gt, return_tensors="pt", add_special_tokens=True).input_ids[:, :max_new_tokens]
    return clean_up(tokenizer.batch_decode(gt_ids, skip_special_tokens=True)[0])


def clean_up(text: str) -> str:
    """transformers' clean_up_tokenization (MUSE decodes with clean_up_tokenization_spaces=True)."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
            .replace(" 've", "'ve").replace(" 're", "'re"))


def greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:  # verbmem.py / knowmem.py
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True).input_ids
    output_ids = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    output_ids = output_ids[:, len(input_ids[0]):]
    return clean_up(tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0])


def min_k(text: str, model, tokenizer, ratio: float = 0.4) -> float:  # privleak.py inference
    input_ids = torch.tensor(tokenizer.encode(text)).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids, labels=input_ids).logits
    probabilities = torch.nn.functional.log_softmax(logits, dim=-1)
    all_prob = [probabilities[0, i, token_id].item() for i, token_id in enumerate(input_ids[0][1:])]
    k_length = int(len(all_prob) * ratio)
    topk_prob = np.sort(all_prob)[:k_length]
    return float(-np.mean(topk_prob).item())


def forget_holdout_auc(forget: list[float], holdout: list[float]) -> float:  # privleak.py
    ppl = np.array(forget + holdout)  # log0 = forget (nonmember, 0), log1 = holdout (member, 1)
    y = np.array([0] * len(forget) + [1] * len(holdout))
    fpr, tpr, _ = get_roc_curve(y, -ppl)
    return get_auc(fpr, tpr)


def recompute_scores(examples: dict, retrained_auc: float | None) -> dict[str, float]:
    """Every MUSE number of one model from its records, as MUSE's eval.py computes it."""
    out = {}
    for name in ("verbmem_f", "knowmem_f", "knowmem_r"):
        if name in examples:
            vals = [rouge_l(e["reference"], e["output"]) for e in examples[name]]
            out[name] = sum(vals) / len(vals) * 100
    leak = examples.get("privleak")
    if leak:
        auc = forget_holdout_auc([r["mink"] for r in leak["forget"]],
                                 [r["mink"] for r in leak["holdout"]])
        out["privleak_auc"] = auc
        if retrained_auc is not None:
            out["privleak"] = (auc - retrained_auc) / retrained_auc * 100
    return out


def check_records(examples: dict, tokenizer, verbmem_tokens: int) -> list[str]:
    """Records whose cut output or reference is not what MUSE derives from the raw ones."""
    wrong = []
    for i, e in enumerate(examples.get("verbmem_f", [])):
        if e["reference"] != verbmem_gt_short(tokenizer, e["gt"], verbmem_tokens):
            wrong.append(f"verbmem_f[{i}].reference")
    for name in ("knowmem_f", "knowmem_r"):
        for i, e in enumerate(examples.get(name, [])):
            if e["output"] != get_prefix_before_words_occur(
                    e["raw_output"], ["\n\n", "\nQuestion", "Question:"]):
                wrong.append(f"{name}[{i}].output")
    return wrong


def largest_deviations(run_dir: Path) -> dict[str, float]:
    results = json.loads((run_dir / "results.json").read_text())
    examples = json.loads((run_dir / "eval_examples.json").read_text())
    worst: dict[str, float] = {}
    for model, scores in results["models"].items():
        for key, value in recompute_scores(examples[model], results["retrained_auc"]).items():
            worst[key] = max(worst.get(key, 0.0), abs(value - scores[key]))
    return worst


if __name__ == "__main__":
    for metric, dev in largest_deviations(Path(sys.argv[1])).items():
        print(f"{metric}: largest |blurctl - MUSE transcription| = {dev:.3g}")
