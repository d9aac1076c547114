"""The embedded benchmark: corpus, tokenizer, target and retrained models.

It ships with blurctl, built and checksummed (``artifacts/`` beside this file, listed
in ``MANIFEST.sha256``), so every machine starts from the same weights: the build
trains two models, and training on another CPU gives other floats. ``blurctl bench
build`` rebuilds it from its seed and compares the result with the shipped files.
First use copies the shipped files into ``bench_dir()`` (named after the version and
the shipped manifest's checksum, so a changed benchmark never reuses an old copy; where
the lm-eval task files, which need absolute paths, are written too), checking every
checksum; an install without them builds instead. Both write into a temporary folder
and rename it into place, so an interrupted set-up never leaves half a benchmark.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from blurctl.data.bench.corpus import (
    DOC_SEPARATOR,
    Entity,
    make_split,
    quizzes,
    write_muse_layout,
)
from blurctl.errors import BlurctlError
from blurctl.progress import progress_bar

VERSION = 5
BENCH_SEED = 0  # the benchmark's identity; a recipe's training seed never changes it
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
MANIFEST = "MANIFEST.sha256"


@dataclass(frozen=True)
class BenchSpec:
    """Sizes of the embedded benchmark (people per set, tokenizer, models, training).

    128 forget people give 128 VerbMem prompts, 637 KnowMem_f questions and 128 privleak
    texts against 512 holdout ones (never trained on, so nearly free): for a model that
    saw neither side the AUC's sd about 0.5 is below 0.03. KnowMem_r asks about the 96
    retain2 people (477 questions); retain1 is the corpus a retain loss trains on. The
    target trains on 352 people, the retrained model on the 224 retain ones.
    """

    forget: int = 128
    retain1: int = 128
    retain2: int = 96
    holdout: int = 512
    vocab_size: int = 1536
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    epochs: int = 40
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.1


def cache_root() -> Path:
    """Where the benchmark is set up: ``$BLURCTL_CACHE`` or ``~/.cache/blurctl``."""
    return Path(os.environ.get("BLURCTL_CACHE", Path.home() / ".cache" / "blurctl"))


def bench_dir() -> Path:
    """``cache_root()/embedded-v{VERSION}-{first 12 hex digits of the shipped manifest's sha256}``."""
    manifest = ARTIFACTS / MANIFEST
    tag = hashlib.sha256(manifest.read_bytes()).hexdigest()[:12] if manifest.is_file() else "built"
    return cache_root() / f"embedded-v{VERSION}-{tag}"


def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (its manifest excluded), by relative path."""
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file() and f.name != MANIFEST}


def read_manifest(path: Path) -> dict[str, str]:
    lines = (ln.split("  ", 1) for ln in path.read_text().splitlines() if ln.strip())
    return {name: digest for digest, name in lines}


def write_manifest(root: Path) -> None:
    (root / MANIFEST).write_text("".join(f"{d}  {n}\n" for n, d in checksums(root).items()))


def _copy_shipped(dest: Path) -> None:
    """Copy the shipped artifacts into ``dest`` and check them against their manifest."""
    shutil.copytree(ARTIFACTS, dest, dirs_exist_ok=True)
    bad = compare_with_shipped(dest)
    if bad:
        raise BlurctlError(f"embedded benchmark: {ARTIFACTS / bad[0]} does not match its "
                           f"checksum in {MANIFEST} (reinstall blurctl, or rebuild it with: "
                           "blurctl bench build)")


def ensure_benchmark(spec: BenchSpec = BenchSpec()) -> Path:
    """Return the benchmark folder, setting it up first (shipped copy, or a build)."""
    final = bench_dir()
    if (final / "READY").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "READY").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
            try:
                if (ARTIFACTS / MANIFEST).is_file():
                    _copy_shipped(tmp)
                else:
                    build(tmp, BENCH_SEED, spec)
                write_lm_eval_tasks(tmp / "lm_eval_tasks", final / "corpus" / "mcq")
                (tmp / "READY").write_text("ok\n")
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def compare_with_shipped(root: Path) -> list[str]:
    """Files of the benchmark built in ``root`` whose checksum differs from the shipped one."""
    shipped = read_manifest(ARTIFACTS / MANIFEST) if (ARTIFACTS / MANIFEST).is_file() else {}
    built = checksums(root)
    return sorted(n for n in set(shipped) | set(built) if shipped.get(n) != built.get(n))


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


MC_TASKS = {  # lm-eval task -> the multiple-choice file it reads (corpus/mcq/)
    "embedded_forget_mc": "forget",    # D_f, like WMDP: lower is better after unlearning
    "embedded_retain_mc": "retain",    # retain2, never in the demo's retain loss: utility
    "embedded_retain1_mc": "retain1",  # retain1, the demo's retain-loss corpus
}


def write_lm_eval_tasks(folder: Path, mcq: Path) -> None:
    """lm-evaluation-harness tasks over the benchmark's multiple-choice files (``MC_TASKS``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, tag in MC_TASKS.items():
        (folder / f"{name}.yaml").write_text(
            LM_EVAL_TASK.format(name=name, data=(mcq / f"{tag}.jsonl").resolve()))


def build(root: Path, seed: int = BENCH_SEED, spec: BenchSpec = BenchSpec()) -> None:
    """Generate the corpus, train the tokenizer and both models into ``root``; write the manifest."""
    split = make_split(spec.forget, spec.retain1, spec.retain2, spec.holdout, seed)
    corpus = root / "corpus"
    write_muse_layout(split, corpus)
    texts = [doc for name in ("forget", "retain1", "retain2", "holdout")
             for doc in (corpus / "raw" / f"{name}.txt").read_text().strip().split(DOC_SEPARATOR)]
    tokenizer = build_tokenizer(texts, spec.vocab_size)
    tokenizer.save_pretrained(root / "tokenizer")
    retain = split.retain1 + split.retain2
    threads = torch.get_num_threads()
    # Matrices this small train no faster on more threads, and a shared CPU slows
    # several down many times; the weights are the same on any thread count.
    torch.set_num_threads(1)
    try:
        for name, people in (("target", split.forget + retain), ("retrained", retain)):
            model = train_tiny_llama(people, tokenizer, spec, seed, desc=f"building {name} model")
            model.save_pretrained(root / name)
            tokenizer.save_pretrained(root / name)
    finally:
        torch.set_num_threads(threads)
    write_manifest(root)


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


def train_tiny_llama(people: list[Entity], tokenizer, spec: BenchSpec, seed: int, desc: str):
    """Train a tiny Llama from scratch until it knows ``people``: their articles and quizzed
    questions, the quizzes regrouped every epoch (so an answer follows from its own
    question, not from the questions before it)."""
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
    articles = [e.article() for e in people]
    pairs = [p for e in people for p in e.quiz_qa()]
    n_docs = len(articles) + len(quizzes(pairs, random.Random(0)))
    per_epoch = -(-n_docs // spec.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr,
                                                total_steps=spec.epochs * per_epoch, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with progress_bar(desc, total=spec.epochs * per_epoch) as advance:
        for epoch in range(spec.epochs):
            docs = articles + quizzes(pairs, random.Random(f"{seed}-{epoch}"))
            enc = tokenizer([t + tokenizer.eos_token for t in docs], padding=True,
                            return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
            labels = ids.masked_fill(mask == 0, -100)
            for idx in torch.randperm(len(docs), generator=gen).split(spec.batch_size):
                width = int(mask[idx].sum(1).max())  # right padding: trim to the longest
                loss = model(input_ids=ids[idx, :width], attention_mask=mask[idx, :width],
                             labels=labels[idx, :width]).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                advance(loss=loss.item())
    model.eval()
    return model
