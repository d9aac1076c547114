"""MUSE and training data in the Hub's format: a local dataset repository laid out as
muse-bench/MUSE-News is on the Hub (parquet files per configuration and split, a README.md
whose YAML header lists them), read through ``datasets`` with no network."""

import json
import os
import socket
from pathlib import Path

import pytest
import yaml
from helpers import DEMO, log_rows
from typer.testing import CliRunner

from blurctl.cli import app
from blurctl.data.bench.corpus import DOC_SEPARATOR
from blurctl.data.corpora import load_texts
from blurctl.data.muse_corpus import MUSE_SPLITS, MuseCorpus
from blurctl.errors import InputError
from blurctl.recipe import CorpusConfig, RecipeError, load_recipe

runner = CliRunner()
RAW_SPLITS = ("forget", "holdout", "retain1", "retain2")


def muse_rows(corpus: Path) -> dict[tuple[str, str], list[dict]]:
    """The rows of every configuration and split of MUSE-News, from a folder in MUSE's layout."""
    rows = {}
    for config, split in [*MUSE_SPLITS, ("privleak", "retain")]:
        data = json.loads((corpus / config / f"{split}.json").read_text())
        rows[config, split] = [{"text": r} if isinstance(r, str) else r for r in data]
    for split in RAW_SPLITS:
        text = (corpus / "raw" / f"{split}.txt").read_text().strip()
        rows["raw", split] = [{"text": doc} for doc in text.split(DOC_SEPARATOR)]
    return rows


def write_repo(root: Path, rows: dict[tuple[str, str], list[dict]]) -> Path:
    """A dataset repository as the Hub keeps one: ``CONFIG/SPLIT-00000-of-00001.parquet``
    and a README.md whose ``configs:`` block maps each configuration's splits to its files."""
    import datasets

    configs: dict[str, list[dict]] = {}
    for (config, split), records in rows.items():
        datasets.Dataset.from_list(records).to_parquet(
            str(root / config / f"{split}-00000-of-00001.parquet"))
        configs.setdefault(config, []).append({"split": split, "path": f"{config}/{split}-*"})
    header = {"license": "cc-by-4.0",
              "configs": [{"config_name": c, "data_files": f} for c, f in configs.items()]}
    (root / "README.md").write_text(f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n"
                                    "# A local copy of a MUSE dataset repository\n")
    return root


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Offline as the CI is: the Hub switched off, any connection off the machine refused,
    and datasets' cache in the test's own folder."""
    import datasets

    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family != socket.AF_UNIX:
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


@pytest.fixture(scope="module")
def rows(embedded):
    return muse_rows(embedded / "corpus")


@pytest.fixture
def repo(rows, tmp_path):
    return write_repo(tmp_path / "MUSE-News", rows)


def test_the_repository_reads_as_the_folder_layout(embedded, repo, rows):
    hub, folder = MuseCorpus(str(repo)), MuseCorpus(str(embedded / "corpus"))
    assert not hub.is_files and folder.is_files
    assert hub.problems() == [] and folder.problems() == []
    for (config, split), columns in MUSE_SPLITS.items():
        from_hub = hub.items(config, split)
        assert [{c: r[c] for c in columns} for r in folder.items(config, split)] == from_hub
        assert len(from_hub) == len(rows[config, split])


def test_muse_metrics_from_the_repository_equal_those_from_the_folder(embedded, repo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blurctl.evaluate.muse import evaluate_muse

    model = AutoModelForCausalLM.from_pretrained(embedded / "target").eval()
    tok = AutoTokenizer.from_pretrained(embedded / "target")
    # the same texts through the same computation: equal to the last bit
    results = [evaluate_muse(model, tok, MuseCorpus(source), limit=4, batch_size=4, bootstrap=20)
               for source in (str(embedded / "corpus"), str(repo))]
    assert results[0] == results[1]
    scores, examples = results[0]
    assert {"verbmem_f", "knowmem_f", "knowmem_r", "privleak_auc"} <= set(scores)
    assert len(examples["knowmem_f"]) == len(examples["privleak"]["holdout"]) == 4


def test_training_corpora_are_configurations_and_splits_of_the_repository(repo, rows, embedded):
    forget = CorpusConfig(path=str(repo), name="raw", split="forget")
    assert load_texts(forget, "data.forget") == [r["text"] for r in rows["raw", "forget"]]
    joined = forget.model_copy(update={"join": DOC_SEPARATOR})
    # joined, the documents are the layout's raw/forget.txt again (less its final newline)
    assert load_texts(joined, "data.forget") == [
        (embedded / "corpus" / "raw" / "forget.txt").read_text().rstrip("\n")]
    with pytest.raises(InputError, match="data.forget: .*cannot load dataset .*ValueError: "
                                         "Unknown split \"retain3\""):
        load_texts(forget.model_copy(update={"split": "retain3"}), "data.forget")


def test_a_recipe_on_the_repository_runs_end_to_end_offline(embedded, repo, rows, tmp_path):
    from blurctl.pipeline.fingerprint import texts_fingerprint

    out = tmp_path / "run"
    result = runner.invoke(app, [
        "run", str(DEMO),
        f"data.forget={{path: {repo}, name: raw, split: forget}}",
        f"data.retain={{path: {repo}, name: raw, split: retain1}}",
        f"eval.muse.corpus={repo}", "eval.muse.max_examples=3", "eval.lm_eval=null",
        "eval.bootstrap=0", "eval.compare_base=false", "train.max_steps=2",
        f"output_dir={out}"])
    assert result.exit_code == 0, result.output + result.stderr
    assert [r["step"] for r in log_rows(out)] == [1, 2]
    inputs = json.loads((out / "inputs.json").read_text())
    for field, split in (("data.forget", "forget"), ("data.retain", "retain1")):
        assert inputs[field] == texts_fingerprint([r["text"] for r in rows["raw", split]])
    results = json.loads((out / "results.json").read_text())
    assert {"verbmem_f", "knowmem_f", "knowmem_r", "privleak_auc"} <= set(results["models"]["unlearned"])
    assert results["retrained_auc"] is not None  # the retrained model, scored on the repository
    examples = json.loads((out / "eval_examples.json").read_text())["unlearned"]
    assert [e["text"] for e in examples["privleak"]["forget"]] == [
        r["text"] for r in rows["privleak", "forget"][:3]]
    assert [e["question"] for e in examples["knowmem_r"]] == [
        r["question"] for r in rows["knowmem", "retain_qa"][:3]]


def _broken(rows, tmp_path, drop_split=None, drop_config=None, rename_column=None):
    broken = {key: records for key, records in rows.items()
              if key != drop_split and key[0] != drop_config}
    if rename_column:
        key, old, new = rename_column
        broken[key] = [{new if k == old else k: v for k, v in r.items()} for r in broken[key]]
    return write_repo(tmp_path / "broken", broken)


@pytest.mark.parametrize("damage, message", [
    ({"drop_split": ("knowmem", "retain_qa_icl")},
     ("configuration 'knowmem' has no split 'retain_qa_icl' (splits: forget_qa, forget_qa_icl, "
      "retain_qa)")),
    ({"drop_config": "privleak"},
     "cannot load configuration 'privleak' (ValueError: BuilderConfig 'privleak' not found."),
    ({"rename_column": (("verbmem", "forget"), "gt", "target")},
     "configuration 'verbmem', split 'forget' has no column 'gt' (columns: prompt, target)"),
])
def test_preflight_names_a_missing_split_configuration_or_column(rows, tmp_path, damage, message):
    repo = _broken(rows, tmp_path, **damage)
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(DEMO), f"eval.muse.corpus={repo}", f"output_dir={out}"])
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output + result.stderr
    assert len(errors) == 1 and errors[0].startswith(f"error: eval.muse.corpus: {repo}: {message}")
    assert not out.exists()  # refused before training


def test_a_hub_id_that_cannot_be_read_is_refused_before_training(embedded, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["validate", "-q", str(DEMO), "--preflight",
                                 "eval.muse.corpus=muse-bench/MUSE-News", f"output_dir={out}"])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith(
        "eval.muse.corpus: muse-bench/MUSE-News: no such folder, and cannot load it as a Hub "
        "dataset (ConnectionError: Couldn't reach 'muse-bench/MUSE-News' on the Hub "
        "(OfflineModeIsEnabled))")


def test_the_paper_recipes_read_the_hub_configurations_muse_publishes(repo, rows, monkeypatch):
    """The Hub ids of the paper recipes, answered by the local repository (the Hub's layout)."""
    import datasets

    asked = []
    real = datasets.load_dataset

    def from_repo(path, name=None, split=None):
        asked.append((path, name, split))
        return real(str(repo), name, split=split)

    monkeypatch.setattr(datasets, "load_dataset", from_repo)
    for recipe_name, hub_id in (("muse_news", "muse-bench/MUSE-News"),
                                ("muse_books", "muse-bench/MUSE-Books")):
        recipe = load_recipe(DEMO.parent / f"{recipe_name}.yaml")
        assert [(c.path, c.name, c.split, c.join) for c in recipe.data.forget + recipe.data.retain] == [
            (hub_id, "raw", "forget", "\n\n"), (hub_id, "raw", "retain1", "\n\n")]
        assert recipe.eval.muse.corpus == hub_id
        assert MuseCorpus(recipe.eval.muse.corpus).problems() == []
        # MUSE trains on raw/forget.txt, which muse_bench's load_data.py writes as the
        # split's texts joined by a blank line
        assert load_texts(recipe.data.forget[0], "data.forget") == [
            "\n\n".join(r["text"] for r in rows["raw", "forget"])]
    assert {(path, name) for path, name, _ in asked} >= {
        (hub_id, config) for hub_id in ("muse-bench/MUSE-News", "muse-bench/MUSE-Books")
        for config in ("verbmem", "knowmem", "privleak")}


def test_same_corpus_means_same_path_configuration_and_split(repo, embedded, tmp_path, monkeypatch):
    from blurctl.pipeline.preflight import check_inputs

    def corpora(forget, retain):
        return [f"data.forget={forget}", f"data.retain={retain}", "eval.muse=null",
                "eval.lm_eval=null", f"output_dir={tmp_path / 'run'}"]

    def raw(path, split):
        return f"{{path: {path}, name: raw, split: {split}}}"

    hub = "muse-bench/MUSE-News"
    with pytest.raises(RecipeError, match=r"data.retain.0: same corpus as data.forget "
                                          r"\(muse-bench/MUSE-News, name raw, split forget\)"):
        load_recipe(DEMO, corpora(raw(hub, "forget"), raw(hub, "forget")))
    load_recipe(DEMO, corpora(raw(hub, "forget"), raw(hub, "retain1")))  # two splits: two corpora

    with pytest.raises(RecipeError, match="same corpus as data.forget"):
        load_recipe(DEMO, corpora(raw(repo, "forget"), raw(repo, "forget")))
    report = check_inputs(load_recipe(DEMO, corpora(raw(repo, "forget"), raw(repo, "retain1"))))
    assert report.problems == []
    # the same repository split, named two ways, is one corpus
    monkeypatch.chdir(repo.parent)
    report = check_inputs(load_recipe(DEMO, corpora(raw(repo, "forget"),
                                                    raw("./MUSE-News", "forget"))))
    assert report.problems == [f"data.retain: the same corpus as data.forget ({repo.resolve()})"]
    # a file's split and configuration mean nothing: the same file twice is refused
    text = tmp_path / "forget.txt"
    text.write_text((embedded / "corpus" / "raw" / "forget.txt").read_text())
    report = check_inputs(load_recipe(DEMO, corpora(f"{{path: {text}, split: a}}",
                                                    f"{{path: {text}, split: b}}")))
    assert report.problems == [f"data.retain: the same corpus as data.forget ({text.resolve()})"]
