"""Hostile inputs: every bad recipe is refused before a model loads, in one line, exit 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import DEMO
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from blurctl.cli import app
from blurctl.recipe import RecipeError, validate_dict

BAD = sorted((Path(__file__).parent / "bad_recipes").glob("*.yaml"))
runner = CliRunner()


@pytest.fixture
def workdir(embedded, tmp_path, monkeypatch):
    """A folder with the good and bad files the bad recipes point at."""
    raw = embedded / "corpus" / "raw"
    (tmp_path / "forget.txt").write_text((raw / "forget.txt").read_text())
    (tmp_path / "retain.txt").write_text((raw / "retain1.txt").read_text())
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "forget.csv").write_text("a,b\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "broken.json").write_text("[{")
    (tmp_path / "records.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "corpusdir").mkdir()
    (tmp_path / "corpusdir" / "forget.txt").write_text((raw / "forget.txt").read_text())
    (tmp_path / "broken5.jsonl").write_text('{"text": "a"}\n' * 4 + '{"text": \n')
    os.mkfifo(tmp_path / "fifo.txt")  # reading it would block forever
    monkeypatch.chdir(tmp_path)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a bad recipe")

    monkeypatch.setattr("blurctl.unlearn.loop.load_model", no_model)
    return tmp_path


def test_corpus_is_large_enough():
    assert len(BAD) >= 40


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_recipe_is_refused_in_one_line(workdir, path):
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    result = runner.invoke(app, ["run", str(path)])
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.stderr + repr(result.exception)
    assert len(errors) == 1, errors
    assert errors[0].startswith("error: ") and expected in errors[0], errors[0]
    assert "Traceback" not in result.output + result.stderr
    assert not (workdir / "runs").exists() or path.stem != "output_dir_is_file"


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                                        st.text(max_size=6), inner, max_size=3), max_leaves=8),
                       max_size=6))
def test_arbitrary_mappings_fail_cleanly(raw):
    """Any mapping either validates or raises RecipeError with one line per problem."""
    try:
        validate_dict(raw, "fuzz")
    except RecipeError as exc:
        assert exc.problems and all("\n" not in p for p in exc.problems)


@settings(max_examples=100, deadline=None)
@given(section=st.sampled_from(["train", "algorithm", "hardware", "data"]),
       key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=14),
       value=st.integers() | st.text(max_size=5))
def test_unknown_keys_are_always_named(section, key, value):
    raw = yaml.safe_load(DEMO.read_text())
    if key in raw[section]:
        return
    from blurctl.recipe import Recipe
    from blurctl.recipe.loader import _models_in

    model = _models_in(Recipe.model_fields[section].annotation)[0]
    if key in model.model_fields:
        return
    raw[section][key] = value
    with pytest.raises(RecipeError) as info:
        validate_dict(raw, "fuzz")
    assert any(p.startswith(f"{section}.{key}: unknown key") for p in info.value.problems)


@settings(max_examples=60, deadline=None)
@given(lr=st.floats(allow_nan=True, allow_infinity=True), batch=st.integers(-5, 5))
def test_numeric_bounds(lr, batch):
    raw = yaml.safe_load(DEMO.read_text())
    raw["train"].update(lr=lr, batch_size=batch)
    ok = lr > 0 and lr == lr and batch > 0 and lr != float("inf")
    try:
        recipe = validate_dict(raw, "fuzz")
        assert ok and recipe.train.lr == lr
    except RecipeError:
        assert not ok


@pytest.mark.parametrize("override, expected", [
    ("train.lr=[1", "'train.lr=[1': line 1: invalid YAML: "),
    ("train.lr=!!python/object/apply:os.system [echo]", "invalid YAML: could not determine a constructor"),
    ("publish.tags=" + "[" * 30 + "x" + "]" * 30, "invalid YAML: nested deeper than 20 levels"),
    ("train.lr=true", "train.lr: Input should be a valid number"),
])
def test_bad_override_is_refused_in_one_line(override, expected):
    result = runner.invoke(app, ["validate", str(DEMO), override])
    assert result.exit_code == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and expected in errors[0], errors
    assert "Traceback" not in result.output + result.stderr


def test_yaml_1_2_floats_are_numbers():
    from blurctl.recipe import load_recipe

    assert load_recipe(DEMO, ["train.lr=1e-4", "algorithm.eps=1E-9"]).train.lr == 1e-4


def test_recipe_override_after_double_dash_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "blurctl", "run", str(DEMO), f"output_dir={tmp_path}",
                           "--", "--master_port", "29999", "train.lr=0.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: overrides: 'train.lr=0.5' comes after '--', where it would "
                                   "go to the launcher; put recipe overrides before '--'")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("repo_id", ["../demo", "org/../../etc", "org/na--me", "org/name.git", "noorg"])
def test_publish_refuses_repo_ids_the_hub_would(embedded, tmp_path, repo_id):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(DEMO.read_text())
    result = runner.invoke(app, ["publish", str(run_dir), "--repo-id", repo_id, "--dry-run"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: publish: --repo-id: ")
    assert not (run_dir / "publish").exists()
