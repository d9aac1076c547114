"""Report and sweep: tables in three formats, the plot, and grid expansion."""

import csv
import io
import json

import pytest
import yaml
from helpers import DEMO
from typer.testing import CliRunner

from blurctl.cli import app
from blurctl.pipeline.sweep import expand, parse_axis
from blurctl.recipe import RecipeError

runner = CliRunner()


def fake_run(root, name, combiner, kf, with_refs=False):
    run_dir = root / name
    run_dir.mkdir()
    models = {"unlearned": {"verbmem_f": 20.0, "knowmem_f": kf, "knowmem_r": 50.0, "privleak": 5.0,
                            "acc:embedded_forget_mc": 0.3}}
    if with_refs:
        models["base"] = {"verbmem_f": 100.0, "knowmem_f": 80.0, "knowmem_r": 55.0, "privleak": 40.0}
        models["retrained"] = {"verbmem_f": 50.0, "knowmem_f": 10.0, "knowmem_r": 60.0, "privleak": 0.0}
    (run_dir / "results.json").write_text(json.dumps({"models": models}))
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(
        {"algorithm": {"combiner": combiner, "forget_loss": "npo", "retain_loss": "gdr"}}))
    return run_dir


def test_report_writes_table_formats_and_plot(tmp_path):
    a = fake_run(tmp_path, "blur", "blur", 20.0, with_refs=True)
    b = fake_run(tmp_path, "penalty", "penalty", 30.0)
    out = tmp_path / "rep"
    result = runner.invoke(app, ["report", str(a), str(b), "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    assert "| target (before unlearning) | reference | 100.00 | 80.00 | 55.00 | 40.00 | - |" in md
    assert "| blur | blur (npo+gdr) | 20.00 | 20.00 | 50.00 | 5.00 | 0.30 |" in md
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert [r["run"] for r in rows] == ["target (before unlearning)", "retrained (no D_f)", "blur", "penalty"]
    assert json.loads((out / "report.json").read_text())[3]["knowmem_f"] == 30.0
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_report_refuses_unevaluated_run(tmp_path):
    (tmp_path / "r").mkdir()
    result = runner.invoke(app, ["report", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "no results.json; evaluate it with: blurctl eval" in result.stderr
    (tmp_path / "report.csv").write_text("run\n")
    result = runner.invoke(app, ["report", str(tmp_path / "report.csv")])
    assert result.exit_code == 1 and "report.csv: not a run folder" in result.stderr


def test_sweep_expands_the_grid(tmp_path):
    points = expand(DEMO, ["algorithm.combiner=blur,penalty", "train.lr=1e-3,5e-4"],
                    [f"output_dir={tmp_path}"])
    assert [p.name for p in points] == ["combiner-blur_lr-1e-3", "combiner-blur_lr-5e-4",
                                        "combiner-penalty_lr-1e-3", "combiner-penalty_lr-5e-4"]
    assert points[3].recipe.algorithm.combiner == "penalty"
    assert points[3].recipe.train.lr == pytest.approx(5e-4)
    assert points[3].recipe.output_dir == str(tmp_path / "combiner-penalty_lr-5e-4")
    assert parse_axis("steering.update_layers=[1,2]") == ("steering.update_layers", ["[1,2]"])


def test_sweep_reports_every_bad_point_before_running(tmp_path):
    with pytest.raises(RecipeError) as info:
        expand(DEMO, ["train.lr=1e-3,-1,0"])
    assert len(info.value.problems) == 2
    assert "[lr--1] train.lr" in info.value.problems[0]
    result = runner.invoke(app, ["sweep", str(DEMO), "train.lrr=1,2"])
    assert result.exit_code == 2
    assert "did you mean 'lr'" in result.stderr


def test_sweep_dry_run_lists_runs():
    result = runner.invoke(app, ["sweep", str(DEMO), "algorithm.combiner=blur,blur_upper", "--dry-run"])
    assert result.exit_code == 0
    assert "combiner-blur_upper: algorithm.combiner=blur_upper" in result.stdout


def test_sweep_variants_cross_the_grid_and_single_values_are_shared(tmp_path):
    from blurctl.pipeline.sweep import read_variants

    variants = read_variants(DEMO.parents[1] / "benchmarks" / "embedded_methods.yaml")
    assert list(variants)[0] == "BLUR" and "RMU" in variants
    points = expand(DEMO, [f"output_dir={tmp_path}", "train.lr=1e-3,2e-3"], variants=variants)
    assert len(points) == 2 * len(variants)
    names = [p.name for p in points]
    assert names[:2] == ["BLUR_lr-1e-3", "BLUR_lr-2e-3"]
    rmu = points[names.index("RMU_lr-2e-3")].recipe
    assert rmu.algorithm.forget_loss == "rmu" and rmu.steering.update_layers == [0, 1, 2]
    assert rmu.output_dir == str(tmp_path / "RMU_lr-2e-3")


def test_runs_that_differ_only_in_seed_become_mean_and_sd(tmp_path):
    import statistics

    runs = []
    for seed, kf in ((0, 10.0), (1, 20.0), (2, 33.0)):
        run_dir = fake_run(tmp_path, f"BLUR_seed-{seed}", "blur", kf, with_refs=seed == 0)
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        (run_dir / "recipe.yaml").write_text(yaml.safe_dump(
            {**recipe, "seed": seed, "output_dir": str(run_dir)}))
        runs.append(run_dir)
    runs.append(fake_run(tmp_path, "penalty", "penalty", 30.0))
    out = tmp_path / "rep"
    result = runner.invoke(app, ["report", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "report.json").read_text())
    assert [r["run"] for r in rows] == ["target (before unlearning)", "retrained (no D_f)", "BLUR", "penalty"]
    blur = rows[2]
    assert blur["seeds"] == 3
    assert blur["knowmem_f"] == pytest.approx(statistics.mean([10.0, 20.0, 33.0]))
    assert blur["knowmem_f_sd"] == pytest.approx(statistics.stdev([10.0, 20.0, 33.0]))
    assert blur["verbmem_f_sd"] == 0.0 and "knowmem_f_sd" not in rows[3]
    assert f"| BLUR | blur (npo+gdr) | 20.00 ± 0.00 | 21.00 ± {blur['knowmem_f_sd']:.2f} |" in (
        out / "report.md").read_text()
    header = (out / "report.csv").read_text().splitlines()[0].split(",")
    assert {"knowmem_f_sd", "acc:embedded_forget_mc_sd"} <= set(header)
    assert "acc:embedded_forget_mc_sd" not in (out / "report.md").read_text()
