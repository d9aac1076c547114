"""Launch commands, Slurm scripts, containers, and the shipped paper recipes."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from helpers import DEMO, ROOT
from packaging.requirements import Requirement
from typer.testing import CliRunner

from blurctl.cli import app
from blurctl.launch.launcher import SlurmOptions, launch_command, slurm_script
from blurctl.recipe import grad_accum, load_recipe

runner = CliRunner()
RECIPES = ["muse_news", "muse_books", "wmdp", "demo"]


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_validate_and_start_with_their_command(name):
    path = ROOT / "recipes" / f"{name}.yaml"
    load_recipe(path)
    head = path.read_text().splitlines()[:3]
    assert any(line.strip() == f"#   blurctl run recipes/{name}.yaml" for line in head)


def test_paper_hyperparameters():
    news = load_recipe(ROOT / "recipes" / "muse_news.yaml")
    assert (news.model.path, news.model.tokenizer) == ("muse-bench/MUSE-News_target", "meta-llama/Llama-2-7b-hf")
    assert (news.data.max_len, news.train.epochs, news.train.lr) == (2048, 10, 2.5e-5)
    # 4 examples per optimizer step, as the original (one process, batch 4), never clipped
    examples_per_step = news.train.batch_size * grad_accum(news) * news.hardware.world_size
    assert (examples_per_step, news.train.max_grad_norm) == (4, None)
    assert (news.algorithm.combiner, news.algorithm.forget_weight, news.algorithm.retain_weight) == ("blur", 1.0, 1.0)
    assert (news.algorithm.forget_loss, news.algorithm.retain_loss) == ("npo", "gdr")
    assert (news.train.optimizer, news.train.scheduler, news.hardware.mixed_precision) == ("adamw", "constant", "bf16")
    wmdp = load_recipe(ROOT / "recipes" / "wmdp.yaml")
    assert wmdp.model.path == "HuggingFaceH4/zephyr-7b-beta"
    assert [c.path for c in wmdp.data.forget] == ["data/wmdp/bio_remove_dataset.jsonl", "cais/wmdp-corpora"]
    assert (wmdp.steering.layer, wmdp.steering.update_layers, wmdp.steering.coeff) == (7, [5, 6, 7], [6.5, 6.5])
    assert (wmdp.algorithm.retain_weight, wmdp.train.lr, wmdp.train.max_steps, wmdp.seed) == ([800, 800], 5e-5, 150, 0)
    # one truncated chunk per document, in file order; transformers' AdamW eps
    assert [c.max_len for c in wmdp.data.forget + wmdp.data.retain] == [512, 768, 512, 512]
    assert (wmdp.data.truncate, wmdp.data.shuffle, wmdp.train.batch_size) == (True, False, 4)
    assert (wmdp.train.adam_eps, wmdp.train.weight_decay, wmdp.train.max_grad_norm) == (1e-6, 0.0, None)


def test_cpu_launch_uses_torchrun_and_gpu_uses_accelerate():
    cpu = load_recipe(DEMO, ["hardware.num_processes=2"])
    cmd = launch_command(cpu, DEMO, ["hardware.num_processes=2"], launcher_args=["--master_port", "29511"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert cmd[cmd.index("--master_port") + 1] == "29511"
    assert cmd[-4:] == ["blurctl", "run", str(DEMO), "hardware.num_processes=2"]
    gpu = load_recipe(ROOT / "recipes" / "muse_news.yaml")
    cmd = launch_command(gpu, Path("recipes/muse_news.yaml"), [], resume=True)
    assert Path(cmd[0]).name == "accelerate" and cmd[1:3] == ["launch", "--multi_gpu"]
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("--mixed_precision") + 1] == "bf16"
    assert cmd[-1] == "--resume"


def test_slurm_script_expands_node_rank_per_task(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "muse_news.yaml",
                         ["hardware.num_machines=2", "train.global_batch_size=8",
                          "container.image=/images/blurctl.sif",
                          "container.binds=[/scratch/hf:/data/hf]", f"output_dir={tmp_path}"])
    script = slurm_script(recipe, Path("recipes/muse_news.yaml"), ["hardware.num_machines=2"],
                          SlurmOptions(partition="gpu"))
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=4" in script
    assert "#SBATCH --partition=gpu" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    argv = shlex.split(srun)
    assert argv[:7] == ["srun", "--kill-on-bad-exit=1", "apptainer", "exec", "--nv", "--bind", "/scratch/hf:/data/hf"]
    inner = argv[argv.index("-c") + 1]
    assert "--machine_rank $SLURM_NODEID" in inner and "--num_processes 8" in inner
    assert "'" in srun.split("bash -c", 1)[1]  # single-quoted: each task expands its own node id
    assert inner.endswith(" -m blurctl run recipes/muse_news.yaml hardware.num_machines=2")
    assert inner.startswith("accelerate launch --multi_gpu")  # the image's own accelerate
    # bash accepts it, and per task the rank comes from that task's environment
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    echoed = subprocess.run(["bash", "-c", f"echo {shlex.quote(inner)}"], capture_output=True, text=True,
                            env={"SLURM_NODEID": "1", "PATH": "/usr/bin:/bin"}).stdout
    assert "$SLURM_NODEID" in echoed  # not expanded by the outer shell


def test_launch_cli_writes_sbatch(tmp_path):
    out = tmp_path / "job.sbatch"
    result = runner.invoke(app, ["launch", str(ROOT / "recipes" / "muse_news.yaml"), "--slurm",
                                 "-o", str(out), "--time", "02:00:00"])
    assert result.exit_code == 0, result.output
    assert "#SBATCH --time=02:00:00" in out.read_text()


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _base_image(text: str, keyword: str) -> str:
    return next(line.split()[-1] for line in text.splitlines() if line.startswith(keyword))


def test_images_share_base_and_lock_and_the_lock_matches_the_project():
    docker = (ROOT / "Dockerfile").read_text()
    apptainer = (ROOT / "containers" / "blurctl.def").read_text()
    assert _base_image(docker, "FROM") == _base_image(apptainer, "From:")
    assert "-r requirements.lock" in docker and "-r /opt/blurctl/requirements.lock" in apptainer
    assert "USER 1000" in docker and "ENTRYPOINT [\"blurctl\"]" in docker
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[name.lower().replace("_", "-")] = version
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    base_torch = re.match(r"[^:]+:(\d+\.\d+\.\d+)", _base_image(docker, "FROM")).group(1)
    for dep in map(Requirement, deps):
        name = dep.name.lower().replace("_", "-")
        if name == "torch":
            assert dep.specifier.contains(base_torch), f"base image torch {base_torch} not in {dep}"
            continue
        assert name in lock, f"{name} missing from requirements.lock"
        assert dep.specifier.contains(lock[name]), f"{name}=={lock[name]} violates {dep}"
    assert "torch" not in lock


LOCAL = ["hardware.device=cpu", "hardware.num_processes=1", "hardware.mixed_precision=no",
         "hardware.strategy=ddp", "model.dtype=float32", "train.max_steps=2", "train.batch_size=2",
         "data.max_len=128", "eval.muse=null", "eval.lm_eval=null", "train.save_every=null"]


@pytest.fixture
def hub_standins(embedded, monkeypatch):
    """Hub model/tokenizer/dataset loads answered by local stand-ins, recording what was asked."""
    import datasets
    import transformers

    asked = {"model": [], "config": [], "tokenizer": [], "dataset": []}
    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_config = transformers.AutoConfig.from_pretrained
    real_tok = transformers.AutoTokenizer.from_pretrained
    real_ds = datasets.load_dataset

    def model(source, **kw):
        asked["model"].append(str(source))
        return real_model(embedded / "target")

    def config(source, **kw):
        if not str(source).startswith("/"):  # transformers also reads the stand-in's own config
            asked["config"].append(str(source))
        return real_config(embedded / "target", **kw)

    def tokenizer(source, **kw):
        asked["tokenizer"].append(str(source))
        return real_tok(embedded / "target")

    def dataset(path, name=None, split=None, **kw):
        asked["dataset"].append((path, name, split))
        return datasets.Dataset.from_dict({"text": [f"{path} {name} text number {i}." * 5 for i in range(6)]})

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config)
    monkeypatch.setattr(datasets, "load_dataset", dataset)
    del real_ds
    return asked


def test_muse_recipe_loads_hub_model_and_hub_corpora(hub_standins, tmp_path):
    from blurctl.pipeline.job import run

    run(load_recipe(ROOT / "recipes" / "muse_news.yaml", [*LOCAL, f"output_dir={tmp_path / 'out'}"]))
    assert set(hub_standins["model"]) == set(hub_standins["config"]) == {"muse-bench/MUSE-News_target"}
    assert set(hub_standins["tokenizer"]) == {"meta-llama/Llama-2-7b-hf"}
    assert set(hub_standins["dataset"]) == {("muse-bench/MUSE-News", "raw", "forget"),
                                            ("muse-bench/MUSE-News", "raw", "retain1")}
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()


def test_wmdp_recipe_loads_local_jsonl_and_hub_corpora(hub_standins, tmp_path, monkeypatch):
    import json

    from blurctl.pipeline.job import run

    bio = tmp_path / "data" / "wmdp" / "bio_remove_dataset.jsonl"
    bio.parent.mkdir(parents=True)
    texts = [f"Bio paper {i} about proteins, how they fold and what that means." for i in range(5)]
    bio.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*texts, "Too short."]))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    run(load_recipe(ROOT / "recipes" / "wmdp.yaml",
                    [*LOCAL, "steering.layer=2", "steering.update_layers=[0,1,2]",
                     "data.forget.1.max_len=256", f"output_dir={out}"]))  # the stand-in has 512 positions
    assert hub_standins["model"] == ["HuggingFaceH4/zephyr-7b-beta"]
    assert ("cais/wmdp-corpora", "cyber-forget-corpus", "train") in hub_standins["dataset"]
    assert ("wikitext", "wikitext-2-raw-v1", "test") in hub_standins["dataset"]
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["corpus"] for r in rows] == [0, 1]  # bio and cyber take turns


# Every launch command blurctl writes, prints or runs, executed on this CPU machine.
STANDINS = ROOT / "tests" / "slurm_standins"  # srun (one task per node), scontrol, sbatch
SHORT = ["train.max_steps=2", "train.optimizer=sgd", "train.lr=0.01", "eval.lm_eval=null",
         "eval.muse.max_examples=3", "eval.bootstrap=0", "algorithm.combiner=blur"]
STATS = ("forget_loss", "retain_loss", "dot", "forget_sq", "retain_sq", "xi", "cosine")


def _env(**extra):
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "BLURCTL_NO_PROGRESS": "1",
            "PATH": f"{STANDINS}:{os.environ['PATH']}", **extra}


def _matches_single_process(run_dir, tmp_path):
    """The multi-process run logged what one process with the same global batch logs."""
    import json

    from helpers import log_rows

    from blurctl.pipeline.job import run

    single = tmp_path / "single"
    run(load_recipe(DEMO, [*SHORT, "eval.muse=null", "train.batch_size=4", f"output_dir={single}"]))
    for one, many in zip(log_rows(single), log_rows(run_dir), strict=True):
        for key in STATS:
            assert many[key] == pytest.approx(one[key], rel=2e-4, abs=1e-7), (key, one["step"])
    assert json.loads((run_dir / "environment.json").read_text())["hardware"]["world_size"] == 2
    assert "unlearned" in json.loads((run_dir / "results.json").read_text())["models"]


def _slurm_job_id() -> int:
    """A job id whose derived MASTER_PORT (20000 + id % 20000) is free on this machine."""
    import random
    import socket

    for _ in range(100):
        port = random.randrange(20000, 40000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port - 20000
    raise RuntimeError("no free port in 20000-39999")


@pytest.mark.parametrize("device, launcher", [("auto", "accelerate launch --multi_gpu"),
                                              ("cpu", "torch.distributed.run")])
def test_sbatch_script_runs_two_nodes_on_localhost(embedded, tmp_path, monkeypatch, device, launcher):
    """The script as written, run by bash with srun/scontrol stand-ins: 2 nodes x 1 process."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = runner.invoke(app, ["launch", str(DEMO), *SHORT, f"hardware.device={device}",
                                 "hardware.num_machines=2", "train.batch_size=2", "output_dir=run",
                                 "--slurm"])
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)  # the script finds its folders wherever it is started
    text = (work / "run" / "launch.sbatch").read_text()
    assert launcher in text and "python -m blurctl" not in text
    assert f"#SBATCH --output={work}/run/slurm-%j.out" in text  # absolute, and the folder exists
    proc = subprocess.run(["bash", str(work / "run" / "launch.sbatch")], capture_output=True,
                          text=True, timeout=600,
                          env=_env(SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID=str(_slurm_job_id()),
                                   SLURM_JOB_NODELIST="node[1-2]"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _matches_single_process(work / "run", tmp_path)


def test_gpu_relaunch_command_runs_on_cpu(embedded, tmp_path):
    """blurctl run's own GPU launch (accelerate launch --multi_gpu), executed: gloo on CPU."""
    from helpers import free_port

    out = tmp_path / "relaunched"
    proc = subprocess.run([sys.executable, "-m", "blurctl", "run", str(DEMO), *SHORT,
                           "hardware.device=auto", "hardware.num_processes=2", "train.batch_size=2",
                           f"output_dir={out}", "--", "--main_process_port", str(free_port())],
                          capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accelerate launch --multi_gpu --num_processes 2" in proc.stderr
    _matches_single_process(out, tmp_path)


def test_printed_launch_command_runs_as_printed(embedded, tmp_path):
    from helpers import free_port

    out = tmp_path / "printed"
    launch = subprocess.run([sys.executable, "-m", "blurctl", "launch", str(DEMO), *SHORT,
                             "hardware.num_processes=2", "train.batch_size=2", f"output_dir={out}",
                             "--", "--master_addr", "127.0.0.1", "--master_port", str(free_port())],
                            capture_output=True, text=True, env=_env())
    assert launch.returncode == 0, launch.stderr
    printed = launch.stdout.strip()
    assert printed.startswith(shlex.quote(sys.executable) + " -m torch.distributed.run")
    proc = subprocess.run(["bash", "-c", printed], capture_output=True, text=True, timeout=600,
                          env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    _matches_single_process(out, tmp_path)


def test_launch_submit_calls_sbatch_and_prints_the_job_id(tmp_path, monkeypatch):
    record = tmp_path / "sbatch.calls"
    for key, value in _env(SBATCH_RECORD=str(record)).items():
        monkeypatch.setenv(key, value)
    script = tmp_path / "job.sbatch"
    base = ["launch", str(ROOT / "recipes" / "muse_news.yaml"), "--slurm", "-o", str(script),
            f"output_dir={tmp_path / 'run'}"]
    result = runner.invoke(app, base)  # --dry-run is the default: nothing submitted
    assert result.exit_code == 0 and not record.exists() and script.exists()
    result = runner.invoke(app, [*base, "--submit"])
    assert result.exit_code == 0, result.output
    assert "submitted batch job 4242" in result.stdout
    assert record.read_text().split() == [str(script)]
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    result = runner.invoke(app, [*base, "--submit"])
    assert result.exit_code == 1
    assert f"launch --submit: sbatch is not on PATH; the script is at {script}" in result.stderr


def test_launch_refuses_an_unwritable_script_path_in_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["launch", str(DEMO), "--slurm", "-o", str(tmp_path / "file" / "x"),
                                 f"output_dir={tmp_path / 'run'}"])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: launch: cannot write {tmp_path / 'file' / 'x'}")
    assert "Traceback" not in result.output
