"""Shared helpers for tests that run the training loop."""

import json
import socket
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def log_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_run(*args: str, capture: bool = False):
    """``blurctl run DEMO *args`` in a child process (for tests that signal it)."""
    import os
    import subprocess
    import sys

    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "blurctl", "run", str(DEMO), *args],
                            stdout=out, stderr=out, text=True,
                            env={**os.environ, "BLURCTL_NO_PROGRESS": "1"})


def newest_checkpoint(run_dir: Path) -> int:
    from blurctl.unlearn.checkpoint import checkpoint_dirs

    found = checkpoint_dirs(run_dir)
    return found[-1][0] if found else 0


def wait_for_checkpoints(run_dir: Path, proc, after_step: int = 0, timeout: float = 300) -> None:
    """Poll until ``run_dir`` has a checkpoint newer than ``after_step`` (or the child exits)."""
    import time

    deadline = time.time() + timeout
    while newest_checkpoint(run_dir) <= after_step and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
