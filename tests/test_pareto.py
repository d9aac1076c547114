"""benchmarks/pareto.py: the grid it runs and how it summarises seeds."""

import importlib.util
import json

import pytest
import yaml
from helpers import ROOT


def _pareto():
    spec = importlib.util.spec_from_file_location("pareto", ROOT / "benchmarks" / "pareto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_grid_crosses_losses_combiners_weights_and_seeds(tmp_path):
    points = _pareto().grid(tmp_path, ["1", "5"], ["0", "1", "2"], [])
    assert len(points) == 2 * 2 * 2 * 3
    combos = {(p.recipe.algorithm.forget_loss, p.recipe.algorithm.combiner,
               p.recipe.algorithm.retain_weight, p.recipe.seed) for p in points}
    assert len(combos) == 24
    r = points[0].recipe
    assert r.eval.every_epoch and r.train.save_every_epoch
    assert r.eval.selection == "muse_first_below_retrained"


def test_seeds_become_mean_and_sd(tmp_path):
    pareto = _pareto()
    runs = []
    for i, (combiner, kf) in enumerate([("blur", 10.0), ("blur", 20.0), ("penalty", 30.0)]):
        run = tmp_path / f"r{i}"
        run.mkdir()
        (run / "recipe.yaml").write_text(yaml.safe_dump({"algorithm": {
            "forget_loss": "npo", "retain_loss": "gdr", "combiner": combiner, "retain_weight": 5.0}}))
        scores = {"knowmem_f": kf, "privleak": -50.0 + i, "knowmem_r": 60.0 + i, "verbmem_f": 40.0}
        (run / "results.json").write_text(json.dumps({
            "models": {"unlearned": scores, "retrained": {**scores, "knowmem_f": 5.0}},
            "selected": {"epoch": i + 1}}))
        runs.append(run)
    summary = pareto.summarise(runs)
    blur, penalty = summary["settings"]
    assert (blur["combiner"], blur["seeds"], blur["epochs"]) == ("blur", 2, [1, 2])
    assert blur["knowmem_f"] == 15.0 and blur["knowmem_f_sd"] == pytest.approx(7.0710678)
    assert penalty["knowmem_f"] == 30.0 and penalty["knowmem_f_sd"] == 0.0
    assert summary["retrained"]["knowmem_f"] == 5.0
    table = pareto.to_markdown(summary)
    assert "| npo+gdr | blur | 5.0 | 15.0 ± 7.1 |" in table
    pareto.plot(summary, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_finished_runs_are_kept_and_parts_split_the_grid(tmp_path, monkeypatch):
    pareto = _pareto()
    points = pareto.grid(tmp_path, ["5"], ["0", "1"], [])
    finished = tmp_path / points[0].name
    finished.mkdir(parents=True)
    (finished / "results.json").write_text("{}")
    ran = []
    monkeypatch.setattr(pareto, "run_points", lambda todo, **kw: ran.extend(todo) or ([], []))
    assert pareto.run_part(points, overwrite=False) == []
    assert [p.name for p in ran] == [p.name for p in points[1:]]
    ran.clear()
    pareto.run_part(points, overwrite=True)
    assert len(ran) == len(points)
    parts = [points[k::2] for k in range(2)]
    assert sorted(p.name for part in parts for p in part) == sorted(p.name for p in points)
