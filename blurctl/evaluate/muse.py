"""MUSE metrics (docs/method.md, "Evaluation"): VerbMem_f, KnowMem_f, KnowMem_r, PrivLeak.

Each rule follows MUSE's own evaluation code (muse_bench ``metrics/``), conventions
included, so the numbers compare with published tables. Generation is greedy and
batched with left padding; Min-K% scoring is batched with right padding; both give
what MUSE's one-text-at-a-time loops give. Every metric returns its mean and the
per-example records that ``eval_examples.json`` keeps for recomputation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from rouge_score import rouge_scorer

from blurctl.data.muse_corpus import MuseCorpus
from blurctl.models import token_logprobs
from blurctl.progress import progress_bar

MINK_FRACTION = 0.4
KNOWMEM_STOPS = ("\n\n", "\nQuestion", "Question:")


@dataclass
class MetricResult:
    score: float
    examples: list[dict] = field(default_factory=list)


@functools.cache
def _rouge_l() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l_f1(prediction: str, reference: str) -> float:
    return _rouge_l().score(reference, prediction)["rougeL"].fmeasure


def decode(tokenizer, ids) -> str:
    """Decode as MUSE does: special tokens skipped, tokenization spaces cleaned up.

    MUSE passes ``clean_up_tokenization_spaces=True``; transformers 5 ignores that flag
    for BPE tokenizers (Llama's among them), so the clean-up is applied here explicitly.
    """
    return tokenizer.clean_up_tokenization(tokenizer.decode(ids, skip_special_tokens=True))


@contextmanager
def _padding_side(tokenizer, side: str) -> Iterator[None]:
    """Pad on ``side`` inside the block; the tokenizer's own setting comes back after."""
    before, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        yield
    finally:
        tokenizer.padding_side = before


class _StopOnceCut:
    """A stopping criterion: a row is done once its continuation (decoded as MUSE decodes)
    holds one of ``stops``; what follows is cut away anyway (``cut_answer``)."""

    def __init__(self, tokenizer, start: int, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.start, self.stops = tokenizer, start, stops

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = [decode(self.tokenizer, row[self.start:]) for row in input_ids]
        return torch.tensor([any(s in t for s in self.stops) for t in texts],
                            device=input_ids.device)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             desc: str = "generating", stops: tuple[str, ...] = ()) -> list[str]:
    """Greedy continuations of ``prompts``, batched with left padding; with ``stops``, a
    row stops once its continuation holds one of them (the text before it is unchanged)."""
    from transformers import StoppingCriteriaList

    outputs: list[str] = []
    device = next(model.parameters()).device
    with _padding_side(tokenizer, "left"), \
            progress_bar(desc, total=math.ceil(len(prompts) / batch_size)) as advance:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
            start = enc["input_ids"].shape[1]
            criteria = StoppingCriteriaList([_StopOnceCut(tokenizer, start, stops)] if stops else [])
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, stopping_criteria=criteria)
            outputs += [decode(tokenizer, row) for row in out[:, start:]]
            advance()
    return outputs


def verbmem_reference(tokenizer, gt: str, max_new_tokens: int) -> str:
    """The ground truth as MUSE scores it: tokenized *with* special tokens (a BOS takes a
    slot), cut to ``max_new_tokens`` ids, decoded without special tokens."""
    return decode(tokenizer, tokenizer(gt, add_special_tokens=True)["input_ids"][:max_new_tokens])


def _record(prompt: str, reference: str, raw: str, output: str, **extra) -> dict:
    return {**extra, "prompt": prompt, "reference": reference, "raw_output": raw,
            "output": output, "score": 100 * rouge_l_f1(output, reference)}


def _mean_score(examples: list[dict]) -> MetricResult:
    return MetricResult(sum(e["score"] for e in examples) / len(examples), examples)


def verbmem(model, tokenizer, items: list[dict], max_new_tokens: int, batch_size: int) -> MetricResult:
    """ROUGE-L F1 x100 of greedy continuations against the ground truth cut to the same length."""
    prompts = [it["prompt"] for it in items]
    outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size, "VerbMem_f")
    return _mean_score([_record(p, verbmem_reference(tokenizer, it["gt"], max_new_tokens), out, out,
                                gt=it["gt"]) for p, it, out in zip(prompts, items, outputs, strict=True)])


def cut_answer(text: str) -> str:
    """MUSE's answer cut: everything before the first of "\\n\\n", "\\nQuestion", "Question:".

    Nothing else is removed (MUSE does not strip; ROUGE-L ignores the whitespace anyway).
    """
    for stop in KNOWMEM_STOPS:
        text = text.split(stop)[0]
    return text


def knowmem(model, tokenizer, qa: list[dict], icl: list[dict], max_new_tokens: int,
            batch_size: int, desc: str) -> MetricResult:
    """Few-shot QA: mean ROUGE-L F1 x100 of the cut greedy answers."""
    shots = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in icl)
    prompts = [f"{shots}Question: {it['question']}\nAnswer: " for it in qa]
    outputs = generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc, KNOWMEM_STOPS)
    return _mean_score([_record(p, it["answer"], out, cut_answer(out), question=it["question"])
                        for p, it, out in zip(prompts, qa, outputs, strict=True)])


@torch.no_grad()
def mink_scores(model, tokenizer, texts: list[str], batch_size: int,
                fraction: float = MINK_FRACTION) -> list[float]:
    """Min-K% score per text as MUSE computes it: the log-probs of tokens 1..n of the
    BOS-encoded text, the lowest ``int(fraction * n)`` of them (at least one), averaged
    and negated. Higher means less likely under the model."""
    device = next(model.parameters()).device
    scores: list[float] = []
    with _padding_side(tokenizer, "right"):
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            logp, mask = token_logprobs(logits, labels)
            lowest = []
            for row, m in zip(logp, mask, strict=True):
                vals = row[m].sort().values
                lowest.append(-vals[: max(1, int(fraction * len(vals)))].mean())
            scores += torch.stack(lowest).double().tolist()  # one host sync per batch
    return scores


def bootstrap_ci(values: list[float], resamples: int, seed: int = 0) -> list[float] | None:
    """95% percentile-bootstrap interval of the mean of ``values`` (scipy's bootstrap)."""
    if resamples <= 0 or len(values) < 2:
        return None
    return _percentile_interval((values,), lambda x, axis: x.mean(axis=axis), resamples, seed,
                                vectorized=True)


def auc_ci(forget: list[float], holdout: list[float], resamples: int,
           seed: int = 0) -> list[float] | None:
    """95% bootstrap interval of the membership AUC, resampling each group separately."""
    if resamples <= 0 or min(len(forget), len(holdout)) < 2:
        return None
    return _percentile_interval((forget, holdout), lambda f, h: membership_auc(list(f), list(h)),
                                resamples, seed, vectorized=False)


def _percentile_interval(samples: tuple, statistic, resamples: int, seed: int,
                         vectorized: bool) -> list[float]:
    import numpy as np
    from scipy.stats import bootstrap

    result = bootstrap(tuple(np.asarray(s, dtype=float) for s in samples), statistic,
                       n_resamples=resamples, method="percentile", paired=False,
                       vectorized=vectorized, random_state=np.random.default_rng(seed))
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def membership_auc(forget_scores: list[float], holdout_scores: list[float]) -> float:
    """MUSE's privleak AUC: forget texts labelled 0, holdout texts 1, ROC over the
    *negated* Min-K% scores (``roc_curve(y, -scores)`` in MUSE's code).

    Memorised forget texts score lower than unseen ones, so a model that still
    remembers D_f gives an AUC near 0 and a model that never saw it about 0.5.
    """
    from sklearn.metrics import roc_auc_score

    labels = [0] * len(forget_scores) + [1] * len(holdout_scores)
    return float(roc_auc_score(labels, [-s for s in forget_scores + holdout_scores]))


def privleak(auc: float, retrained_auc: float) -> float:
    """(AUC - AUC_retrained) / AUC_retrained x100: ~0 is ideal; large negative means
    under-unlearned (D_f still looks memorised), large positive over-unlearned."""
    return (auc - retrained_auc) / retrained_auc * 100


def membership_scores(model, tokenizer, corpus: MuseCorpus, batch_size: int,
                      limit: int | None) -> tuple[list[float], list[float]]:
    """Min-K% scores of the privleak forget and holdout texts."""
    forget = corpus.texts("privleak", "forget")[:limit]
    holdout = corpus.texts("privleak", "holdout")[:limit]
    return (mink_scores(model, tokenizer, forget, batch_size),
            mink_scores(model, tokenizer, holdout, batch_size))


def forget_auc(model, tokenizer, corpus: MuseCorpus, batch_size: int, limit: int | None) -> float:
    return membership_auc(*membership_scores(model, tokenizer, corpus, batch_size, limit))


def privleak_records(corpus: MuseCorpus, limit: int | None, forget: list[float],
                     holdout: list[float]) -> dict[str, list[dict]]:
    """Per-text Min-K% scores of the privleak forget and holdout texts, with the texts."""
    return {split: [{"text": t, "mink": s} for t, s in zip(
                corpus.texts("privleak", split)[:limit], scores, strict=True)]
            for split, scores in (("forget", forget), ("holdout", holdout))}


def evaluate_muse(model, tokenizer, corpus: MuseCorpus, *, verbmem_tokens: int = 128,
                  knowmem_tokens: int = 32, batch_size: int = 8, limit: int | None = None,
                  bootstrap: int = 0) -> tuple[dict, dict[str, list]]:
    """All MUSE metrics of ``model``: (scores with 95% intervals, per-example records)."""
    model.eval()
    vm = verbmem(model, tokenizer, corpus.items("verbmem", "forget")[:limit],
                 verbmem_tokens, batch_size)
    kf = knowmem(model, tokenizer, corpus.items("knowmem", "forget_qa")[:limit],
                 corpus.items("knowmem", "forget_qa_icl"), knowmem_tokens, batch_size,
                 "KnowMem_f")
    kr = knowmem(model, tokenizer, corpus.items("knowmem", "retain_qa")[:limit],
                 corpus.items("knowmem", "retain_qa_icl"), knowmem_tokens, batch_size,
                 "KnowMem_r")
    forget, holdout = membership_scores(model, tokenizer, corpus, batch_size, limit)
    scores = {"verbmem_f": vm.score, "knowmem_f": kf.score, "knowmem_r": kr.score,
              "privleak_auc": membership_auc(forget, holdout)}
    if bootstrap:
        for name, result in (("verbmem_f", vm), ("knowmem_f", kf), ("knowmem_r", kr)):
            scores[f"{name}_ci"] = bootstrap_ci([e["score"] for e in result.examples], bootstrap)
        scores["privleak_auc_ci"] = auc_ci(forget, holdout, bootstrap)
    return scores, {"verbmem_f": vm.examples, "knowmem_f": kf.examples,
                    "knowmem_r": kr.examples,
                    "privleak": privleak_records(corpus, limit, forget, holdout)}
