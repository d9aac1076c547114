"""Speed-up of batched MUSE evaluation over one-at-a-time, on the embedded benchmark.

    python benchmarks/eval_speed.py [--batch-size 16]

Runs VerbMem_f, KnowMem_f and KnowMem_r on the target model once with batch size 1
and once batched (left padding), checks the outputs are identical, and prints both
times and their ratio.
"""

from __future__ import annotations

import argparse
import time

from transformers import AutoModelForCausalLM, AutoTokenizer

from blurctl.data.bench.build import ensure_benchmark
from blurctl.data.muse_corpus import MuseCorpus
from blurctl.evaluate.muse import knowmem, verbmem


def run_all(model, tok, corpus: MuseCorpus, batch_size: int) -> tuple[float, list]:
    start = time.perf_counter()
    vm = verbmem(model, tok, corpus.items("verbmem", "forget"), 128, batch_size)
    kf = knowmem(model, tok, corpus.items("knowmem", "forget_qa"),
                 corpus.items("knowmem", "forget_qa_icl"), 32, batch_size, "KnowMem_f")
    kr = knowmem(model, tok, corpus.items("knowmem", "retain_qa"),
                 corpus.items("knowmem", "retain_qa_icl"), 32, batch_size, "KnowMem_r")
    outputs = [e["output"] for r in (vm, kf, kr) for e in r.examples]
    return time.perf_counter() - start, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    root = ensure_benchmark()
    model = AutoModelForCausalLM.from_pretrained(root / "target").eval()
    tok = AutoTokenizer.from_pretrained(root / "target")
    corpus = MuseCorpus(str(root / "corpus"))
    corpus.problems()  # read every file once, so neither timing includes it
    t_one, out_one = run_all(model, tok, corpus, 1)
    t_batch, out_batch = run_all(model, tok, corpus, args.batch_size)
    print(f"one at a time: {t_one:.1f} s   batched ({args.batch_size}): {t_batch:.1f} s   "
          f"speed-up: {t_one / t_batch:.1f}x   identical outputs: {out_one == out_batch}")


if __name__ == "__main__":
    main()
