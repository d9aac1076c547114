"""The evaluation metrics, each defined once: how it is named, which way is better, how it
is shown. The CLI's results table, ``blurctl report``, its plot and the model card all
read this registry; a new metric is one ``Metric`` here (plus the code computing it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str                       # its name in results.json
    name: str                      # as shown, and as the model card's model-index names it
    better: str                    # "lower", "higher" or "zero" (closest to 0)
    hub_type: str                  # model-index metric type
    meaning: str                   # one sentence for readers of tables and model cards

    @property
    def title(self) -> str:
        return f"{self.name} {dict(lower='↓', higher='↑', zero='→0')[self.better]}"


MUSE_METRICS = (
    Metric("verbmem_f", "VerbMem_f", "lower", "rougeL",
           "ROUGE-L F1 x100 of greedy continuations of forget-set text: verbatim memory."),
    Metric("knowmem_f", "KnowMem_f", "lower", "rougeL",
           "ROUGE-L F1 x100 of answers to questions about the forget set: knowledge."),
    Metric("knowmem_r", "KnowMem_r", "higher", "rougeL",
           "ROUGE-L F1 x100 of answers to questions about the retain set: utility."),
    Metric("privleak", "PrivLeak", "zero", "privleak",
           "Min-K% membership AUC relative to the retrained model's, x100 (MUSE's convention): "
           "large negative means the forget set still looks memorised, large positive "
           "over-unlearned."),
)
BY_KEY = {m.key: m for m in MUSE_METRICS}
ACCURACY_PREFIX = "acc:"  # lm-eval task accuracies are stored as acc:<task>


def accuracy_keys(score_dicts) -> list[str]:
    """The lm-eval accuracy keys (``acc:<task>``) present in any of ``score_dicts``, sorted."""
    return sorted({k for s in score_dicts for k in s
                   if k.startswith(ACCURACY_PREFIX) and not k.endswith(("_stderr", "_sd"))})


def metric_keys(score_dicts) -> list[str]:
    """Every metric to show for these scores: MUSE's in registry order, then accuracies."""
    return [m.key for m in MUSE_METRICS] + accuracy_keys(score_dicts)


def title(key: str) -> str:
    """Column title of a metric key."""
    if key in BY_KEY:
        return BY_KEY[key].title
    return f"{key.removeprefix(ACCURACY_PREFIX)} acc"


def format_score(value, sd=None) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.2f} ± {sd:.2f}" if isinstance(sd, (int, float)) else f"{value:.2f}"


def score_cell(scores: dict, key: str, intervals: bool = False) -> str:
    """A score as every table shows it: ± the sd over seeds where there is one, else (with
    ``intervals``) ± half its 95% bootstrap interval where one was computed."""
    ci = scores.get(f"{key}_ci") if intervals else None
    spread = scores.get(f"{key}_sd")
    if not isinstance(spread, (int, float)) and ci:
        spread = (ci[1] - ci[0]) / 2
    return format_score(scores.get(key), spread)


def markdown_table(labels: list[str], rows: list[tuple[list[str], dict]], keys: list[str],
                   header=title, intervals: bool = False) -> str:
    """``labels`` columns, then one right-aligned column per metric key."""
    lines = ["| " + " | ".join([*labels, *(header(k) for k in keys)]) + " |",
             "|" + " --- |" * len(labels) + " ---: |" * len(keys)]
    for names, scores in rows:
        lines.append("| " + " | ".join([*names, *(score_cell(scores, k, intervals)
                                                  for k in keys)]) + " |")
    return "\n".join(lines)
