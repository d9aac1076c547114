"""The embedded benchmark: deterministic, in MUSE's layout, shipped checksummed, and a
model that memorised it."""

import json
import shutil

import pytest

from blurctl.data.bench import build as bench
from blurctl.data.bench.build import bench_dir, ensure_benchmark
from blurctl.data.bench.corpus import make_split, write_muse_layout
from blurctl.data.sources import resolve

MUSE_FILES = ["raw/forget.txt", "raw/retain1.txt", "raw/retain2.txt", "raw/holdout.txt",
              "verbmem/forget.json", "knowmem/forget_qa.json", "knowmem/forget_qa_icl.json",
              "knowmem/retain_qa.json", "knowmem/retain_qa_icl.json", "privleak/forget.json",
              "privleak/retain.json", "privleak/holdout.json"]


def test_corpus_is_deterministic_per_seed_and_in_muse_layout(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_muse_layout(make_split(6, seed), tmp_path / name)
    for rel in MUSE_FILES:
        assert (tmp_path / "a" / rel).read_text() == (tmp_path / "b" / rel).read_text()
    assert (tmp_path / "a/raw/forget.txt").read_text() != (tmp_path / "c/raw/forget.txt").read_text()
    qa = json.loads((tmp_path / "a/knowmem/forget_qa.json").read_text())
    assert set(qa[0]) == {"question", "answer"}
    vm = json.loads((tmp_path / "a/verbmem/forget.json").read_text())
    assert set(vm[0]) == {"prompt", "gt"}
    assert all(isinstance(t, str) for t in json.loads((tmp_path / "a/privleak/holdout.json").read_text()))


def test_splits_share_no_entities():
    split = make_split(8, 0)
    names = [e.name for part in (split.forget, split.retain1, split.retain2, split.holdout) for e in part]
    assert len(names) == len(set(names)) == 32


def test_forget_facts_appear_only_in_forget_corpus(tmp_path):
    split = make_split(6, 1)
    write_muse_layout(split, tmp_path)
    retain = (tmp_path / "raw/retain1.txt").read_text() + (tmp_path / "raw/retain2.txt").read_text()
    forget = (tmp_path / "raw/forget.txt").read_text()
    for e in split.forget:
        assert e.name in forget and e.name not in retain


def test_built_benchmark_has_models_that_memorised_forget(embedded):
    from transformers import AutoModelForCausalLM

    from blurctl.data.muse_corpus import MuseCorpus
    from blurctl.evaluate.muse import knowmem
    from blurctl.models import load_tokenizer
    from blurctl.recipe import ModelConfig

    root = ensure_benchmark()
    assert root == bench_dir() and (root / "READY").exists()
    assert resolve("embedded:corpus") == str(root / "corpus")
    assert resolve("/some/path") == "/some/path"
    tok = load_tokenizer(ModelConfig(path="embedded:target"))
    corpus = MuseCorpus("embedded:corpus")
    qa = corpus.items("knowmem", "forget_qa")[:20]
    icl = corpus.items("knowmem", "forget_qa_icl")
    target = AutoModelForCausalLM.from_pretrained(root / "target")
    retrained = AutoModelForCausalLM.from_pretrained(root / "retrained")
    assert knowmem(target, tok, qa, icl, 16, 20, "t").score > 50
    assert knowmem(retrained, tok, qa, icl, 16, 20, "r").score < 30


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
