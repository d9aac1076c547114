"""Corpus loading from every supported source, and the errors for bad corpora."""

import json

import pytest

from blurctl.data.corpora import chunk_texts, collate, load_texts
from blurctl.errors import BlurctlError
from blurctl.recipe import CorpusConfig


def test_txt_json_jsonl_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.json").write_text(json.dumps([{"text": "second"}, {"text": "third"}]))
    (tmp_path / "c.jsonl").write_text('{"body": "fourth"}\n\n{"body": "fifth"}\n')
    assert load_texts(CorpusConfig(path=str(tmp_path / "a.txt")), "data.forget") == ["first document"]
    assert load_texts(CorpusConfig(path=str(tmp_path / "b.json")), "data.forget") == ["second", "third"]
    assert load_texts(CorpusConfig(path=str(tmp_path / "c.jsonl"), text_field="body"),
                      "data.forget") == ["fourth", "fifth"]
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "1.txt").write_text("one")
    (folder / "2.json").write_text(json.dumps(["two", "three"]))
    assert load_texts(CorpusConfig(path=str(folder)), "data.retain") == ["one", "two", "three"]
    assert load_texts(CorpusConfig(path=str(folder), max_examples=2), "data.retain") == ["one", "two"]


def test_saved_hf_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"content": ["x y", "z"]}).save_to_disk(tmp_path / "ds")
    texts = load_texts(CorpusConfig(path=str(tmp_path / "ds"), text_field="content"), "data.retain")
    assert texts == ["x y", "z"]
    with pytest.raises(BlurctlError, match="no column 'text'"):
        load_texts(CorpusConfig(path=str(tmp_path / "ds")), "data.retain")


def test_hub_id_reaches_datasets_and_reports_failure_in_one_line(monkeypatch):
    import datasets

    seen = {}

    def fake_load(path, name, split):
        seen.update(path=path, name=name, split=split)
        return datasets.Dataset.from_dict({"text": ["from the hub"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = CorpusConfig(path="org/corpus", name="cfg", split="test")
    assert load_texts(cfg, "data.retain") == ["from the hub"]
    assert seen == {"path": "org/corpus", "name": "cfg", "split": "test"}

    def failing(*args, **kwargs):
        raise ConnectionError("offline\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(BlurctlError) as info:
        load_texts(cfg, "data.retain")
    assert "\n" not in str(info.value) and "org/corpus" in str(info.value)


@pytest.mark.parametrize("content, message", [
    ("   \n", "corpus is empty"),
    ("[1, 2]", "record 0 has no string field 'text'"),
    ("{broken", "invalid JSON"),
])
def test_bad_corpora_are_named(tmp_path, content, message):
    path = tmp_path / ("f.txt" if "broken" not in content and "[" not in content else "f.json")
    path.write_text(content)
    with pytest.raises(BlurctlError, match=message):
        load_texts(CorpusConfig(path=str(path)), "data.forget")


def test_missing_file_names_the_field(tmp_path):
    with pytest.raises(BlurctlError, match=r"data\.forget: .*nope\.txt: no such file"):
        load_texts(CorpusConfig(path=str(tmp_path / "nope.txt")), "data.forget")


class CharTokenizer:
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, verbose=True):
        """One text or a batch of texts, as a Hugging Face tokenizer takes them."""
        if isinstance(text, list):
            return {"input_ids": [[ord(c) for c in t] for t in text]}
        return {"input_ids": [ord(c) for c in text]}


def test_chunks_start_with_bos_and_respect_max_len():
    chunks = chunk_texts(["abcdefg", "hi"], CharTokenizer(), max_len=4)
    assert chunks == [[1, 97, 98, 99], [1, 100, 101, 102], [1, 103], [1, 104, 105]]
    batch = collate(chunks[2:], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 103, 0], [1, 104, 105]]
    assert batch["labels"].tolist() == [[1, 103, -100], [1, 104, 105]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_truncate_keeps_the_first_chunk_of_each_document_as_wmdp_does(tmp_path):
    assert chunk_texts(["abcdefg", "hi"], CharTokenizer(), max_len=4, first_only=True) == [
        [1, 97, 98, 99], [1, 104, 105]]
    from blurctl.data.corpora import corpus_chunks
    from blurctl.recipe import DataConfig

    (tmp_path / "bio.jsonl").write_text('{"text": "abcdefgh"}\n{"text": "ijklmnop"}\n')
    (tmp_path / "cyber.jsonl").write_text('{"text": "qrstuvwx"}\n')
    data = DataConfig(forget=[{"path": str(tmp_path / "bio.jsonl"), "max_len": 3},
                              {"path": str(tmp_path / "cyber.jsonl")}], max_len=5, truncate=True)
    bio, cyber = corpus_chunks(data.forget, "data.forget", CharTokenizer(), data)
    assert bio == [[1, 97, 98], [1, 105, 106]]  # its own max_len, file order, one chunk each
    assert cyber == [[1, 113, 114, 115, 116]]   # data.max_len
    data = DataConfig(forget=[{"path": str(tmp_path / "bio.jsonl"), "max_len": 3}], max_len=5)
    assert len(corpus_chunks(data.forget, "data.forget", CharTokenizer(), data)[0]) == 8


def test_unshuffled_batches_follow_file_order_over_epochs():
    from blurctl.unlearn.batches import BatchPlan

    plan = BatchPlan(6, 4, 1, 0, seed=3, shuffle=False)
    assert [plan.indices(k) for k in range(3)] == [[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5]]
    ranks = [BatchPlan(6, 2, 2, r, seed=3, shuffle=False).indices(0) for r in (0, 1)]
    assert ranks == [[0, 1], [2, 3]]


def test_adam_eps_reaches_the_optimizer():
    import torch
    from helpers import DEMO

    from blurctl.recipe import load_recipe
    from blurctl.unlearn.optim import make_optimizer as _optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    opt, _ = _optimizer(params, load_recipe(DEMO, ["train.adam_eps=1e-6"]), 10)
    assert opt.param_groups[0]["eps"] == 1e-6
    assert _optimizer(params, load_recipe(DEMO), 10)[0].param_groups[0]["eps"] == 1e-8


def test_min_chars_keeps_only_longer_texts_as_the_wmdp_code_does(tmp_path):
    texts = ["x" * 50, "y" * 51, "short", "z" * 80]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert load_texts(CorpusConfig(path=str(path), min_chars=50), "data.forget") == ["y" * 51, "z" * 80]
    assert load_texts(CorpusConfig(path=str(path)), "data.forget") == texts
    with pytest.raises(BlurctlError, match=r"data\.forget: .*c\.jsonl: corpus is empty \(no text "
                                           r"longer than min_chars=100\)"):
        load_texts(CorpusConfig(path=str(path), min_chars=100), "data.forget")
