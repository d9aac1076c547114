"""Launching on several devices: accelerate/torchrun commands and Slurm batch scripts.

``blurctl run`` re-executes itself under the launcher when ``hardware`` asks for more
than one process; the launched processes see ``LOCAL_RANK`` and run the job. FSDP is
applied by blurctl itself (torch FSDP2), so the launcher only starts the processes.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from blurctl.recipe import Recipe


def needs_launch(recipe: Recipe) -> bool:
    """More than one process wanted, and we are not already one of them."""
    return recipe.hardware.world_size > 1 and "LOCAL_RANK" not in os.environ


def _blurctl_args(recipe_path: Path, overrides: list[str], resume: bool,
                  overwrite: bool = False) -> list[str]:
    """``-m blurctl run ...``: the module form, which both torchrun and accelerate take."""
    return ["-m", "blurctl", "run", str(recipe_path), *overrides,
            *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else [])]


def _accelerate(python: str) -> str:
    """The ``accelerate`` command of ``python``'s environment (beside it), else from PATH."""
    beside = Path(python).parent / "accelerate"
    return str(beside) if beside.is_file() else "accelerate"


def uses_torchrun(recipe: Recipe) -> bool:
    """CPU recipes start with torchrun (``accelerate launch --cpu`` starts one process)."""
    return recipe.hardware.device == "cpu"


def launch_command(recipe: Recipe, recipe_path: Path, overrides: list[str], resume: bool = False,
                   launcher_args: list[str] | None = None, python: str = sys.executable,
                   overwrite: bool = False) -> list[str]:
    """The command that starts every local process of this job.

    On CPU it is ``torchrun`` (as ``python -m torch.distributed.run``); otherwise
    ``accelerate launch --multi_gpu`` (whose processes fall back to CPU and gloo where
    no GPU is found).
    """
    hw, extra = recipe.hardware, list(launcher_args or [])
    job = _blurctl_args(recipe_path, overrides, resume, overwrite)
    if uses_torchrun(recipe):
        return [python, "-m", "torch.distributed.run", "--nproc_per_node", str(hw.num_processes),
                "--nnodes", str(hw.num_machines), *extra, *job]
    return [_accelerate(python), "launch", "--multi_gpu", "--num_processes", str(hw.world_size),
            "--num_machines", str(hw.num_machines), "--mixed_precision", hw.mixed_precision,
            *extra, *job]


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int = 8


def _node_command(recipe: Recipe, job: list[str], launcher_args: list[str], python: str) -> str:
    """What one Slurm task runs: its node's launcher, ranked by ``$SLURM_NODEID``."""
    hw = recipe.hardware
    if uses_torchrun(recipe):
        argv = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(hw.num_processes),
                "--nnodes", str(hw.num_machines)]
        ranked = "--node_rank $SLURM_NODEID --master_addr $MASTER_ADDR --master_port $MASTER_PORT"
    else:
        argv = [_accelerate(python), "launch", "--multi_gpu", "--num_processes", str(hw.world_size),
                "--num_machines", str(hw.num_machines), "--mixed_precision", hw.mixed_precision]
        ranked = ("--machine_rank $SLURM_NODEID --main_process_ip $MASTER_ADDR "
                  "--main_process_port $MASTER_PORT")
    quoted = " ".join(shlex.quote(a) for a in argv)
    rest = " ".join(shlex.quote(a) for a in [*launcher_args, *job])
    return f"{quoted} {ranked} {rest}"


def slurm_script(recipe: Recipe, recipe_path: Path, overrides: list[str], opts: SlurmOptions,
                 resume: bool = False, launcher_args: list[str] | None = None,
                 workdir: Path | None = None) -> str:
    """An sbatch script: one task per node, each starting that node's processes.

    It runs in ``workdir`` (default: the current folder), so the recipe and output
    paths mean what they meant when the script was written; Slurm's log goes to the
    absolute output folder, which must exist before the job starts (``blurctl launch``
    creates it). The rendezvous is the first node of the job, on a port derived from the
    job id. Per-node values (``$SLURM_NODEID``) sit inside single quotes so each task
    expands its own. With ``container.image`` each task runs inside ``apptainer exec
    --nv`` (or ``docker run``) with ``container.binds`` mounted, using the image's own
    Python. Only the job's global rank 0 writes the run folder.
    """
    hw, c = recipe.hardware, recipe.container
    workdir = (workdir or Path.cwd()).resolve()
    python = "python" if c.image else sys.executable
    inner = _node_command(recipe, _blurctl_args(recipe_path, overrides, resume),
                          list(launcher_args or []), python)
    task = ["bash", "-c", inner]
    gpu = not uses_torchrun(recipe)
    if c.image and c.runtime == "apptainer":
        task = ["apptainer", "exec", *(["--nv"] if gpu else []),
                *(a for b in c.binds for a in ("--bind", b)), c.image, *task]
    elif c.image:  # docker: the image's entrypoint is blurctl, so bash is named instead
        task = ["docker", "run", "--rm", *(["--gpus", "all"] if gpu else []), "--network", "host",
                "-e", "SLURM_NODEID", "-e", "MASTER_ADDR", "-e", "MASTER_PORT",
                "-v", f"{workdir}:{workdir}", "-w", str(workdir),
                *(a for b in c.binds for a in ("-v", b)), "--entrypoint", "bash", c.image,
                "-c", inner]
    out_dir = workdir / recipe.output_dir
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=blurctl-{out_dir.name}",
        f"#SBATCH --nodes={hw.num_machines}",
        "#SBATCH --ntasks-per-node=1",
        *([f"#SBATCH --gpus-per-node={hw.num_processes}"] if gpu else []),
        f"#SBATCH --cpus-per-task={opts.cpus_per_task}",
        f"#SBATCH --time={opts.time}",
        f"#SBATCH --output={out_dir}/slurm-%j.out",
        *([f"#SBATCH --partition={opts.partition}"] if opts.partition else []),
        *([f"#SBATCH --account={opts.account}"] if opts.account else []),
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        f"mkdir -p {shlex.quote(str(out_dir))}",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "srun --kill-on-bad-exit=1 " + " ".join(shlex.quote(a) for a in task),
        "",
    ]
    return "\n".join(lines)


def submit(script: Path) -> str:
    """``sbatch script``; the job id Slurm answers with."""
    import re
    import shutil
    import subprocess

    from blurctl.errors import BlurctlError

    if shutil.which("sbatch") is None:
        raise BlurctlError(f"launch --submit: sbatch is not on PATH; the script is at {script}")
    proc = subprocess.run(["sbatch", str(script)], capture_output=True, text=True)
    found = re.search(r"Submitted batch job (\d+)", proc.stdout)
    if proc.returncode != 0 or found is None:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise BlurctlError(f"launch --submit: sbatch failed: {detail[-1] if detail else proc.returncode}")
    return found.group(1)
