"""benchmarks/gpu_check.py: its CPU mode runs every part the GPU check runs; without a GPU
the GPU check stops at once with a clear message."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from helpers import ROOT


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_tiny_mode_measures_both_combiners_and_evaluates(embedded, gpu_check, tmp_path,
                                                             capsys):
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["variants"]) == {"blur", "penalty"}
    for row in report["variants"].values():
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["peak_gib"] is None
    assert math.isfinite(report["blur_over_penalty_time"])
    assert report["blur_over_penalty_peak"] is None
    run = report["pipeline"]
    assert (run["eval_device"], run["eval_dtype"]) == ("cpu", "bfloat16")
    assert all(math.isfinite(v) for k, v in run["scores"].items() if not k.endswith("_ci"))
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "blur / penalty: time" in printed and "evaluation on cpu (bfloat16)" in printed


def test_without_a_gpu_it_stops_with_a_clear_message(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "gpu_check: no CUDA GPU is visible" in capsys.readouterr().err


def test_the_script_stops_without_a_gpu():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert "gpu_check: no CUDA GPU is visible" in proc.stderr
