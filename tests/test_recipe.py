"""Recipe schema: validation, typo suggestions, overrides, and the CLI's exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from blurctl.cli import app
from blurctl.recipe import RecipeError, load_recipe, parse_override

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
runner = CliRunner()


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def demo_dict() -> dict:
    return yaml.safe_load(DEMO.read_text())


def test_demo_recipe_validates_with_defaults_filled():
    recipe = load_recipe(DEMO)
    assert recipe.algorithm.combiner == "blur"
    assert recipe.train.optimizer == "adamw"
    assert recipe.data.forget[0].text_field == "text"


def test_misspelled_key_is_named_with_suggestion(tmp_path):
    raw = demo_dict()
    raw["train"]["lrr"] = raw["train"].pop("lr")
    result = runner.invoke(app, ["validate", str(write(tmp_path, raw))])
    assert result.exit_code == 2
    assert "train.lrr: unknown key; did you mean 'lr'?" in result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_every_error_reported_at_once_with_its_yaml_path(tmp_path):
    raw = demo_dict()
    raw["train"]["batch_size"] = 0
    raw["algorithm"]["combiner"] = "blurr"
    raw["modle"] = {}
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, raw))
    text = "\n".join(info.value.problems)
    assert "train.batch_size" in text
    assert "algorithm.combiner" in text
    assert "modle: unknown key; did you mean 'model'?" in text
    assert len(info.value.problems) == 3


def test_overrides_apply_and_are_validated(tmp_path):
    recipe = load_recipe(DEMO, ["train.lr=3e-4", "algorithm.combiner=penalty"])
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.algorithm.combiner == "penalty"
    with pytest.raises(RecipeError, match=r"train\.lrate: unknown key; did you mean 'lr'"):
        load_recipe(DEMO, ["train.lrate=1"])
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        parse_override("train.lr")


def test_missing_required_section_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="model: required key is missing"):
        load_recipe(write(tmp_path, {"data": {"forget": "a.txt"}}))
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(write(tmp_path, "model: [unclosed"))
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_python_tags_are_refused(tmp_path):
    path = write(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(path)


def test_retain_loss_requires_retain_corpus(tmp_path):
    raw = demo_dict()
    del raw["data"]["retain"]
    with pytest.raises(RecipeError, match="data.retain: required by algorithm.retain_loss"):
        load_recipe(write(tmp_path, raw))


def test_validate_prints_resolved_recipe():
    result = runner.invoke(app, ["validate", str(DEMO)])
    assert result.exit_code == 0
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["grad_accum"] == 1
    assert resolved["model"]["path"] == "embedded:target"


def test_console_script_exits_2_without_traceback(tmp_path):
    raw = demo_dict()
    raw["train"]["epoch"] = 3
    proc = subprocess.run([sys.executable, "-m", "blurctl", "validate", str(write(tmp_path, raw))],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "train.epoch: unknown key; did you mean 'epochs'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_override_can_reach_into_a_list_item():
    from blurctl.recipe import RecipeError, load_recipe

    wmdp = load_recipe(ROOT / "recipes" / "wmdp.yaml", ["data.forget.1.max_len=256"])
    assert [c.max_len for c in wmdp.data.forget] == [512, 256]
    with pytest.raises(RecipeError, match=r"'data.forget.5.max_len=1': data.forget has no item 5"):
        load_recipe(ROOT / "recipes" / "wmdp.yaml", ["data.forget.5.max_len=1"])
