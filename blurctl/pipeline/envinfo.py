"""What ran a job: package versions, git commit, hardware. Saved beside every run.

Gathered here rather than with ``torch.utils.collect_env``, which starts pip, conda and
nvidia-smi subprocesses and formats text for people; this records the facts that change
results (among them the CPU kernel level PyTorch picked) as JSON in milliseconds."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata

PACKAGES = ("blurctl", "torch", "transformers", "accelerate", "datasets", "lm_eval",
            "huggingface_hub", "safetensors", "tokenizers", "pydantic")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cpu_model() -> str | None:
    """The CPU's model name (Linux's /proc/cpuinfo, else what platform reports)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment() -> dict:
    import torch

    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_sha": git_sha(),
        "hardware": {"cpu_count": os.cpu_count(), "cpu": cpu_model(),
                     "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                     "cuda_devices": cuda, "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if cuda else None,
                     "world_size": int(os.environ.get("WORLD_SIZE", "1"))},
        "command": sys.argv,
    }
