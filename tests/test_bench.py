"""The embedded benchmark: deterministic, in MUSE's layout, shipped checksummed, models
that know it, and intervals narrow enough to tell methods apart."""

import json
import shutil
from collections import Counter

import pytest

from blurctl.data.bench import build as bench
from blurctl.data.bench.build import bench_dir, ensure_benchmark
from blurctl.data.bench.corpus import QUESTIONS, make_split, write_muse_layout
from blurctl.data.sources import resolve

MUSE_FILES = ["raw/forget.txt", "raw/retain1.txt", "raw/retain2.txt", "raw/holdout.txt",
              "verbmem/forget.json", "knowmem/forget_qa.json", "knowmem/forget_qa_icl.json",
              "knowmem/retain_qa.json", "knowmem/retain_qa_icl.json", "privleak/forget.json",
              "privleak/retain.json", "privleak/holdout.json"]


def test_corpus_is_deterministic_per_seed_and_in_muse_layout(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_muse_layout(make_split(6, 4, 5, 7, seed), tmp_path / name)
    for rel in MUSE_FILES:
        assert (tmp_path / "a" / rel).read_text() == (tmp_path / "b" / rel).read_text()
    assert (tmp_path / "a/raw/forget.txt").read_text() != (tmp_path / "c/raw/forget.txt").read_text()
    qa = json.loads((tmp_path / "a/knowmem/forget_qa.json").read_text())
    assert set(qa[0]) == {"question", "answer"}
    vm = json.loads((tmp_path / "a/verbmem/forget.json").read_text())
    assert set(vm[0]) == {"prompt", "gt"}
    assert all(isinstance(t, str) for t in json.loads((tmp_path / "a/privleak/holdout.json").read_text()))
    assert [len(json.loads((tmp_path / "a/privleak" / f"{s}.json").read_text()))
            for s in ("forget", "holdout")] == [6, 7]


def test_splits_share_no_entities():
    split = make_split(8, 4, 6, 10, 0)
    parts = (split.forget, split.retain1, split.retain2, split.holdout)
    assert [len(p) for p in parts] == [8, 4, 6, 10]
    names = [e.name for part in parts for e in part]
    assert len(names) == len(set(names)) == 28


def test_forget_facts_appear_only_in_forget_corpus(tmp_path):
    split = make_split(6, 6, 6, 6, 1)
    write_muse_layout(split, tmp_path)
    retain = (tmp_path / "raw/retain1.txt").read_text() + (tmp_path / "raw/retain2.txt").read_text()
    forget = (tmp_path / "raw/forget.txt").read_text()
    for e in split.forget:
        assert e.name in forget and e.name not in retain


def test_test_questions_are_asked_in_no_corpus_and_utility_is_not_the_retain_loss(tmp_path):
    """KnowMem's and MC's phrasing of a fact is never the quizzes' (which ask it otherwise);
    KnowMem_r and the retain MC task ask about retain2 people, absent from retain1."""
    split = make_split(10, 10, 10, 10, 2)
    write_muse_layout(split, tmp_path)
    raw = {n: (tmp_path / "raw" / f"{n}.txt").read_text()
           for n in ("forget", "retain1", "retain2", "holdout")}
    asked = [q["question"] for f in ("forget_qa", "forget_qa_icl", "retain_qa", "retain_qa_icl")
             for q in json.loads((tmp_path / "knowmem" / f"{f}.json").read_text())]
    asked += [json.loads(line)["question"] for f in ("forget", "retain", "retain1")
              for line in (tmp_path / "mcq" / f"{f}.jsonl").read_text().splitlines()]
    assert len(asked) == 5 * 20 + 30
    assert not any(q in text for q in asked for text in raw.values())
    quizzed = [q for e in split.forget for q in e.quiz_qa()]
    assert all(f"Question: {q['question']}\nAnswer: {q['answer']}" in raw["forget"] for q in quizzed)
    phrasings = {p for qs in QUESTIONS.values() for p in qs}
    assert len({q["question"].replace(e.name, "{name}") for e in split.forget for q in e.qa()}
               & phrasings) > 5  # the test questions use many phrasings
    retain_people = {e.name for e in split.retain2}
    for row in json.loads((tmp_path / "knowmem/retain_qa.json").read_text()):
        assert any(name in row["question"] for name in retain_people)
    assert not any(name in raw["retain1"] for name in retain_people)


def test_every_set_holds_each_article_shape_equally_often():
    split = make_split(10, 7, 5, 20, 3)
    for part in (split.forget, split.retain1, split.retain2, split.holdout):
        counts = Counter(e.shape for e in part)
        assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == min(5, len(part))


@pytest.fixture(scope="module")
def shipped(embedded):
    """The shipped target and retrained models, the tokenizer and the MUSE corpus."""
    from transformers import AutoModelForCausalLM

    from blurctl.data.muse_corpus import MuseCorpus
    from blurctl.models import load_tokenizer
    from blurctl.recipe import ModelConfig

    def load(name):
        return AutoModelForCausalLM.from_pretrained(embedded / name).eval()

    return (load("target"), load("retrained"), load_tokenizer(ModelConfig(path="embedded:target")),
            MuseCorpus("embedded:corpus"))


@pytest.fixture(scope="module")
def target_scores(shipped):
    """The shipped target's MUSE scores with 95% intervals, at the demo's settings."""
    from helpers import DEMO

    from blurctl.evaluate.muse import evaluate_muse
    from blurctl.recipe import load_recipe

    muse = load_recipe(DEMO).eval.muse
    target, _, tok, corpus = shipped
    return evaluate_muse(target, tok, corpus, verbmem_tokens=muse.verbmem_max_new_tokens,
                         knowmem_tokens=muse.knowmem_max_new_tokens,
                         batch_size=muse.batch_size, bootstrap=1000)[0]


def test_the_shipped_models_know_what_they_were_trained_on(embedded, shipped, target_scores):
    from blurctl.evaluate.muse import knowmem

    root = ensure_benchmark()
    assert root == bench_dir() == embedded and (root / "READY").exists()
    assert resolve("embedded:corpus") == str(root / "corpus")
    assert resolve("/some/path") == "/some/path"
    scores = target_scores
    assert scores["knowmem_f"] > 75 and scores["knowmem_r"] > 75 and scores["verbmem_f"] > 90
    assert scores["privleak_auc"] < 0.05  # the target tells its forget texts from unseen ones
    _, retrained, tok, corpus = shipped
    qa, icl = corpus.items("knowmem", "forget_qa")[:100], corpus.items("knowmem", "forget_qa_icl")
    assert knowmem(retrained, tok, qa, icl, 32, 50, "r").score < 20  # never saw D_f


def test_the_shipped_benchmark_has_the_power_it_claims(shipped, target_scores):
    """The target's 95% intervals are at most ±4 points (KnowMem) and ±3 (VerbMem), and the
    retrained model, which saw neither the forget nor the holdout texts, cannot tell
    them apart: AUC 0.5 ± 0.05 over at least 100 texts a side (for 128 against 512
    independent scores the AUC's sd under no difference is 0.028)."""
    from blurctl.evaluate.muse import membership_auc, membership_scores

    half = {m: (target_scores[f"{m}_ci"][1] - target_scores[f"{m}_ci"][0]) / 2
            for m in ("knowmem_f", "knowmem_r", "verbmem_f")}
    assert half["knowmem_f"] <= 4 and half["knowmem_r"] <= 4 and half["verbmem_f"] <= 3, half
    _, retrained, tok, corpus = shipped
    forget, holdout = membership_scores(retrained, tok, corpus, 64, None)
    assert min(len(forget), len(holdout)) >= 100
    assert abs(membership_auc(forget, holdout) - 0.5) <= 0.05


def test_the_set_up_benchmark_is_the_shipped_one_whatever_the_recipe_seed(embedded):
    from helpers import DEMO

    from blurctl.recipe import load_recipe

    shipped = bench.read_manifest(bench.ARTIFACTS / bench.MANIFEST)
    assert bench.checksums(embedded).items() >= shipped.items()
    for seed in (0, 7):
        recipe = load_recipe(DEMO, [f"seed={seed}"])
        assert resolve(recipe.model.path) == str(embedded / "target")
        assert resolve(recipe.eval.muse.corpus) == str(embedded / "corpus")


def test_a_corrupted_shipped_file_is_refused_and_nothing_is_set_up(tmp_path, monkeypatch):
    from blurctl.errors import BlurctlError

    artifacts = tmp_path / "artifacts"
    shutil.copytree(bench.ARTIFACTS, artifacts)
    weights = artifacts / "target" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(bench, "ARTIFACTS", artifacts)
    monkeypatch.setenv("BLURCTL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BlurctlError, match=r"target/model.safetensors does not match its checksum"):
        ensure_benchmark()
    assert not bench_dir().exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f".{bench_dir().name}.lock"]


def test_compare_with_shipped_names_the_files_that_differ(tmp_path):
    shutil.copytree(bench.ARTIFACTS, tmp_path / "b")
    assert bench.compare_with_shipped(tmp_path / "b") == []
    (tmp_path / "b" / "corpus" / "raw" / "forget.txt").write_text("other")
    (tmp_path / "b" / "extra.txt").write_text("x")
    assert bench.compare_with_shipped(tmp_path / "b") == ["corpus/raw/forget.txt", "extra.txt"]
