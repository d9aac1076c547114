"""Publishing: staged files, model card with model-index, Hub calls (mocked), no token leak."""

import base64
import json

import pytest
import yaml
from helpers import DEMO
from typer.testing import CliRunner

from blurctl.cli import app
from blurctl.pipeline.job import run
from blurctl.recipe import load_recipe

TOKEN = "hf_plantedSecretToken1234567890abcdef"
runner = CliRunner()


@pytest.fixture(scope="module")
def evaluated_run(embedded, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run(load_recipe(DEMO, ["train.max_steps=1", "eval.compare_base=false", "eval.lm_eval=null",
                           "eval.muse.max_examples=3", "eval.bootstrap=20", f"output_dir={out}"]))
    return out


class FakeHub:
    """An httpx2 mock transport answering the create / preupload / commit calls."""

    def __init__(self):
        self.requests = []

    def handler(self, request):
        import httpx2

        self.requests.append(request)
        path = request.url.path
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": "https://huggingface.co/org/demo-blur"})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if path == "/api/validate-yaml":  # the card's metadata, checked before the commit
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if path == "/api/agent-harnesses":  # huggingface_hub's own lookup, unrelated to us
            return httpx2.Response(200, json={})
        if "/commit/" in path:
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/org/demo-blur/commit/1",
                                               "commitOid": "1" * 40, "pullRequestUrl": None})
        return httpx2.Response(404, json={"error": f"unexpected {request.method} {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    import httpx2
    import huggingface_hub

    hub = FakeHub()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True, raising=False)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub.handler)))
    yield hub
    huggingface_hub.set_client_factory(lambda: httpx2.Client())


def committed_files(request) -> dict[str, bytes]:
    files = {}
    for line in request.content.decode().splitlines():
        item = json.loads(line)
        if item["key"] == "file":
            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
    return files


def test_publish_uploads_staged_files_with_model_card(evaluated_run, fake_hub):
    result = runner.invoke(app, ["publish", str(evaluated_run), "--repo-id", "org/demo-blur"])
    assert result.exit_code == 0, result.output + result.stderr
    paths = [r.url.path for r in fake_hub.requests if r.url.path != "/api/agent-harnesses"]
    assert paths[0] == "/api/repos/create"
    assert any("/preupload/" in p for p in paths) and "/commit/" in paths[-1]
    create = json.loads(next(r for r in fake_hub.requests if r.url.path == "/api/repos/create").content)
    assert (create["name"], create["organization"], create["visibility"]) == ("demo-blur", "org", "private")
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in fake_hub.requests
               if r.url.path.startswith(("/api/repos", "/api/models")))

    files = committed_files(fake_hub.requests[-1])
    staged = {p.name for p in (evaluated_run / "publish").iterdir()}
    assert set(files) == staged
    assert {"README.md", "model.safetensors", "config.json", "recipe.yaml", "results.json",
            "tokenizer.json", "environment.json"} <= staged
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    index = meta["model-index"][0]["results"]
    names = {m["name"] for r in index for m in r["metrics"]}
    assert {"KnowMem_f", "VerbMem_f", "KnowMem_r", "PrivLeak"} <= names
    results = json.loads((evaluated_run / "results.json").read_text())["models"]["unlearned"]
    kf = next(m["value"] for r in index for m in r["metrics"] if m["name"] == "KnowMem_f")
    assert kf == pytest.approx(results["knowmem_f"], abs=1e-3)
    assert "blur" in meta["tags"] and "torch" in card


def test_dry_run_stages_without_any_request(evaluated_run, fake_hub):
    result = runner.invoke(app, ["publish", str(evaluated_run), "--repo-id", "org/x", "--dry-run"])
    assert result.exit_code == 0
    assert "nothing uploaded" in result.stdout and "README.md" in result.stdout
    assert fake_hub.requests == []


def test_token_never_lands_in_files_or_output(evaluated_run, fake_hub):
    result = runner.invoke(app, ["publish", str(evaluated_run), "--repo-id", "org/demo-blur"])
    assert TOKEN not in result.output + result.stderr
    for path in evaluated_run.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_unevaluated_run_is_refused(embedded, tmp_path, fake_hub):
    run(load_recipe(DEMO, ["train.max_steps=1", "eval.muse=null", "eval.lm_eval=null",
                           f"output_dir={tmp_path}"]))
    result = runner.invoke(app, ["publish", str(tmp_path), "--repo-id", "org/x"])
    assert result.exit_code == 1
    assert "no results.json; a run is published only with its evaluation" in result.stderr
    assert fake_hub.requests == []


def test_hub_refusal_is_one_line(evaluated_run, monkeypatch):
    import httpx2
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(
        lambda r: httpx2.Response(401, json={"error": "Invalid credentials"}))))
    try:
        result = runner.invoke(app, ["publish", str(evaluated_run), "--repo-id", "org/x"])
    finally:
        huggingface_hub.set_client_factory(lambda: httpx2.Client())
    assert result.exit_code == 1
    assert "HTTP 401" in result.stderr and "HF_TOKEN" in result.stderr
    assert TOKEN not in result.stderr


def test_model_card_is_rendered_from_its_template(evaluated_run, fake_hub):
    from blurctl.evaluate.metrics import MUSE_METRICS

    result = runner.invoke(app, ["publish", str(evaluated_run), "--repo-id", "org/demo-blur", "--dry-run"])
    assert result.exit_code == 0, result.output
    card = (evaluated_run / "publish" / "README.md").read_text()
    assert "\n# demo-blur\n" in card
    assert "`embedded:target` after unlearning with **blur** (forget loss `npo`," in card
    for metric in MUSE_METRICS:
        assert f"- {metric.title}: {metric.meaning}" in card
    assert "| model | VerbMem_f | KnowMem_f | KnowMem_r | PrivLeak |" in card
    assert "```yaml\nmodel:\n  path: embedded:target" in card and "{{" not in card
