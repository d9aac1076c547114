"""Two CPU processes (gloo) give the same run as one process on the same global batch."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import DEMO, free_port, log_rows, weights

from blurctl.pipeline.job import run
from blurctl.recipe import load_recipe

# SGD, so that weights of equal runs differ only by lr x float32 rounding of the reduced
# gradients (see test_algorithms.EQUAL_RUNS): comparable on any CPU.
COMMON = ["train.max_steps=3", "train.optimizer=sgd", "train.lr=0.01", "eval.muse=null",
          "hardware.device=cpu", "algorithm.combiner=blur"]


def torchrun(out, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "blurctl", "run", str(DEMO), *COMMON, "train.batch_size=2",
           f"output_dir={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize(("strategy", "extra"), [
    ("ddp", []), ("fsdp", []),
    ("ddp", ["peft.r=4"]),  # LoRA: DDP over the adapters, pi_ref the base without them
], ids=["ddp", "fsdp", "ddp-lora"])
def test_two_processes_match_one(embedded, tmp_path, strategy, extra):
    single = tmp_path / "single"
    run(load_recipe(DEMO, [*COMMON, *extra, "train.batch_size=4", f"output_dir={single}"]))
    multi = tmp_path / strategy
    torchrun(multi, f"hardware.strategy={strategy}", *extra)

    for one, two in zip(log_rows(single), log_rows(multi), strict=True):
        for key in ("forget_loss", "retain_loss", "dot", "forget_sq", "retain_sq", "xi", "cosine"):
            assert two[key] == pytest.approx(one[key], rel=2e-4, abs=1e-7), (key, one["step"])
    a, b = weights(single), weights(multi)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=2e-5, msg=name)
    moved = max((a[n] - weights_base(embedded)[n]).abs().max().item() for n in a)
    assert moved > 1e-4  # the runs really trained


def weights_base(embedded):
    from safetensors.torch import load_file

    return load_file(embedded / "target" / "model.safetensors")


def test_run_relaunches_itself_with_two_processes(embedded, tmp_path):
    """hardware.num_processes=2 on CPU: blurctl run starts torchrun, launcher args after --."""
    out = tmp_path / "relaunched"
    cmd = [sys.executable, "-m", "blurctl", "run", str(DEMO), *COMMON, "train.batch_size=2",
           "hardware.num_processes=2", f"output_dir={out}", "--",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching: " in proc.stderr and "torch.distributed.run --nproc_per_node 2" in proc.stderr
    import json

    assert json.loads((out / "environment.json").read_text())["hardware"]["world_size"] == 2
    assert len(log_rows(out)) == 3
