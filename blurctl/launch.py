"""Launching on several devices: accelerate/torchrun commands and Slurm batch scripts.

``blurctl run`` re-executes itself under the launcher when ``hardware`` asks for more
than one process; the launched processes see ``LOCAL_RANK`` and run the job. FSDP is
applied by blurctl itself (torch FSDP2), so the launcher only starts the processes.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from blurctl.recipe import Recipe


def needs_launch(recipe: Recipe) -> bool:
    """More than one process wanted, and we are not already one of them."""
    return recipe.hardware.world_size > 1 and "LOCAL_RANK" not in os.environ


def _blurctl_args(recipe_path: Path, overrides: list[str], resume: bool) -> list[str]:
    return ["-m", "blurctl", "run", str(recipe_path), *overrides, *(["--resume"] if resume else [])]


def launch_command(recipe: Recipe, recipe_path: Path, overrides: list[str], resume: bool = False,
                   launcher_args: list[str] | None = None, python: str = "python") -> list[str]:
    """The command that starts every local process of this job.

    On CPU it is ``torchrun`` (``accelerate launch --cpu`` would start one process); on
    GPUs ``accelerate launch --multi_gpu``.
    """
    hw, extra = recipe.hardware, list(launcher_args or [])
    job = _blurctl_args(recipe_path, overrides, resume)
    if hw.device == "cpu":
        return [python, "-m", "torch.distributed.run", "--nproc_per_node", str(hw.num_processes),
                "--nnodes", str(hw.num_machines), *extra, *job]
    return ["accelerate", "launch", "--multi_gpu", "--num_processes", str(hw.world_size),
            "--num_machines", str(hw.num_machines), "--mixed_precision", hw.mixed_precision,
            *extra, *job]


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"
    cpus_per_task: int = 8
    port: int = 29500


def slurm_script(recipe: Recipe, recipe_path: Path, overrides: list[str], opts: SlurmOptions,
                 resume: bool = False, launcher_args: list[str] | None = None) -> str:
    """An sbatch script: one task per node, each starting that node's processes.

    Per-node values (``$SLURM_NODEID``) sit inside single quotes so each task expands
    its own, not the batch shell's. With ``container.image`` each task runs inside
    ``apptainer exec --nv`` (or ``docker run``) with ``container.binds`` mounted.
    """
    hw, c = recipe.hardware, recipe.container
    job = " ".join(shlex.quote(a) for a in ["python", *_blurctl_args(recipe_path, overrides, resume)])
    extra = " ".join(shlex.quote(a) for a in (launcher_args or []))
    inner = (f"accelerate launch --multi_gpu --num_processes {hw.world_size} "
             f"--num_machines {hw.num_machines} --machine_rank $SLURM_NODEID "
             f"--main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT "
             f"--mixed_precision {hw.mixed_precision} {extra} {job}").replace("  ", " ")
    wrapper = ""
    if c.image:
        binds = " ".join(f"--bind {shlex.quote(b)}" for b in c.binds)
        if c.runtime == "apptainer":
            wrapper = f"apptainer exec --nv {binds} {shlex.quote(c.image)} ".replace("  ", " ")
        else:
            vols = " ".join(f"-v {shlex.quote(b)}" for b in c.binds)
            wrapper = (f"docker run --rm --gpus all --network host -e SLURM_NODEID -e MASTER_ADDR "
                       f"-e MASTER_PORT {vols} {shlex.quote(c.image)} ").replace("  ", " ")
    out_dir = Path(recipe.output_dir)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=blurctl-{out_dir.name}",
        f"#SBATCH --nodes={hw.num_machines}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={hw.num_processes}",
        f"#SBATCH --cpus-per-task={opts.cpus_per_task}",
        f"#SBATCH --time={opts.time}",
        f"#SBATCH --output={out_dir}/slurm-%j.out",
        *([f"#SBATCH --partition={opts.partition}"] if opts.partition else []),
        *([f"#SBATCH --account={opts.account}"] if opts.account else []),
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(str(out_dir))}",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"export MASTER_PORT={opts.port}",
        f"srun --kill-on-bad-exit=1 {wrapper}bash -c {shlex.quote(inner)}",
        "",
    ]
    return "\n".join(lines)
