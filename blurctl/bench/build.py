"""Build and cache the embedded benchmark: corpus, tokenizer, target and retrained models.

Everything is derived from one seed, deterministically, and written once under
``cache_root()/embedded-v{VERSION}-seed{seed}``; later calls reuse it. The build
writes into a temporary folder and renames it into place, so an interrupted build
never leaves a half-made benchmark behind.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from blurctl.bench.corpus import DOC_SEPARATOR, make_split, write_muse_layout
from blurctl.progress import progress_bar

VERSION = 4
EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class BenchSpec:
    """Sizes of the embedded benchmark; the defaults run in a few minutes on 2 CPU cores."""

    entities_per_split: int = 16
    vocab_size: int = 768
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    epochs: int = 80
    batch_size: int = 16
    lr: float = 3e-3


def cache_root() -> Path:
    """Where built artefacts live: ``$BLURCTL_CACHE`` or ``~/.cache/blurctl``."""
    return Path(os.environ.get("BLURCTL_CACHE", Path.home() / ".cache" / "blurctl"))


def bench_dir(seed: int = 0) -> Path:
    return cache_root() / f"embedded-v{VERSION}-seed{seed}"


def resolve(ref: str, seed: int = 0) -> str:
    """Map ``embedded:<relative path>`` to a file in the (built) benchmark; pass others through."""
    if not ref.startswith(EMBEDDED_PREFIX):
        return ref
    return str(ensure_benchmark(seed) / ref[len(EMBEDDED_PREFIX):])


def ensure_benchmark(seed: int = 0, spec: BenchSpec = BenchSpec()) -> Path:
    """Return the benchmark folder for ``seed``, building it first if it is missing."""
    final = bench_dir(seed)
    if (final / "READY").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "READY").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
            try:
                _build(tmp, seed, spec)
                write_lm_eval_tasks(tmp / "lm_eval_tasks", final / "corpus" / "mcq")
                (tmp / "READY").write_text("ok\n")
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


LM_EVAL_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_lm_eval_tasks(folder: Path, mcq: Path) -> None:
    """lm-evaluation-harness tasks over the benchmark's multiple-choice files.

    ``embedded_forget_mc`` asks about D_f (like WMDP: lower is better after
    unlearning), ``embedded_retain_mc`` about D_r (like MMLU: utility).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for tag in ("forget", "retain"):
        name = f"embedded_{tag}_mc"
        (folder / f"{name}.yaml").write_text(
            LM_EVAL_TASK.format(name=name, data=(mcq / f"{tag}.jsonl").resolve()))


def _build(root: Path, seed: int, spec: BenchSpec) -> None:
    split = make_split(spec.entities_per_split, seed)
    corpus = root / "corpus"
    write_muse_layout(split, corpus)
    docs = {name: (corpus / "raw" / f"{name}.txt").read_text().strip().split(DOC_SEPARATOR)
            for name in ("forget", "retain1", "retain2", "holdout")}
    tokenizer = build_tokenizer(sum(docs.values(), []), spec.vocab_size)
    tokenizer.save_pretrained(root / "tokenizer")
    retain = docs["retain1"] + docs["retain2"]
    for name, texts in (("target", docs["forget"] + retain), ("retrained", retain)):
        model = train_tiny_llama(texts, tokenizer, spec, seed, desc=f"building {name} model")
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Every space is a token of its own, so text splits the same way wherever a prompt
    # ends: "Answer: " (MUSE) and "Answer:" + " 1996" (lm-eval) match the corpus.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=512, padding_side="right")


def train_tiny_llama(texts: list[str], tokenizer, spec: BenchSpec, seed: int, desc: str):
    """Train a tiny Llama from scratch until it has memorised ``texts``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 3, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.heads,
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    enc = tokenizer([t + tokenizer.eos_token for t in texts],
                    padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    steps = -(-spec.epochs * len(texts) // spec.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps,
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with progress_bar(desc, total=steps) as advance:
        for _ in range(steps):
            idx = torch.randperm(len(texts), generator=gen)[: spec.batch_size]
            loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            advance(loss=loss.item())
    model.eval()
    return model
