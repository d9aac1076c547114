"""The recipe's schema: one small pydantic model per section, unknown keys forbidden,
and the rules that involve more than one key."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from blurctl.unlearn.combine import COMBINERS
from blurctl.unlearn.losses import FORGET_LOSSES, RETAIN_LOSSES
from blurctl.unlearn.methods import METHODS
from blurctl.unlearn.optim import BNB_OPTIMIZERS, OPTIMIZERS

SEED_LIMIT = 2**32  # numpy's seeds run from 0 to 2**32 - 1
Layer = Annotated[int, Field(ge=0)]

class Section(BaseModel):
    """Unknown keys are errors and types are strict: ``lr: true`` is not 1.0, ``batch_size: on``
    is not 1 (YAML's ``1e-3`` is read as a number by the recipe loader)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              strict=True)


class ModelConfig(Section):
    """The model to unlearn from."""

    path: str = Field(description="Hub id, local folder, or 'embedded:target'.")
    tokenizer: str | None = Field(None, description="Tokenizer source when not the model's own.")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel passed to from_pretrained (null: transformers' choice); "
                          "flash_attention_2 needs the flash-attn package and a GPU.")
    reference: str = Field("copy", description="Frozen reference for npo/klr/rmu-retain: 'copy' "
                                               "(of the model), a model path, or 'none'.")


class CorpusConfig(Section):
    """A text corpus: a .txt/.json/.jsonl file, a local folder, or a dataset in the Hub's
    format (a Hub id, or a local copy of a dataset repository) read by configuration and split."""

    path: str
    text_field: str = "text"
    split: str = "train"
    name: str | None = Field(None, description="Hub dataset configuration name.")
    join: str | None = Field(None, description="Join the texts into one document with this "
                                               "separator before chunking (MUSE's raw/*.txt: "
                                               "'\\n\\n').")
    min_chars: int = Field(0, ge=0, description="Keep only texts longer than this many "
                                                "characters (the WMDP code keeps > 50).")
    max_examples: int | None = Field(None, gt=0)
    max_len: int | None = Field(None, gt=1, description="Tokens per chunk for this corpus "
                                                        "(default: data.max_len).")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @property
    def identity(self) -> tuple[str, str | None, str]:
        """Two corpora are the same when path, configuration name and split are."""
        return (self.path, self.name, self.split)


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) or value is None else [value]


class DataConfig(Section):
    """Forget and retain corpora. Several forget corpora take turns, one per step (WMDP's
    bio and cyber); retain corpora pair with them one to one, or one serves all."""

    forget: list[CorpusConfig] = Field(min_length=1)
    retain: list[CorpusConfig] | None = Field(None, min_length=1)
    max_len: int = Field(2048, gt=1, description="Tokens per training chunk (BOS included).")
    truncate: bool = Field(False, description="Keep only the first chunk of each document (as "
                                              "the WMDP code does) instead of all its chunks.")
    shuffle: bool = Field(True, description="Draw batches from a seeded permutation each epoch; "
                                            "false: in file order (as the WMDP code does).")

    @field_validator("forget", "retain", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return _as_list(value)


# Allowed names come from the registries (unlearn/losses.py, combine.py, methods.py, optim.py).
ForgetLoss = Literal[tuple(FORGET_LOSSES)]
RetainLoss = Literal[tuple(RETAIN_LOSSES)]
Combiner = Literal[(*COMBINERS, *METHODS)]
Optimizer = Literal[tuple(OPTIMIZERS)]
BILEVEL = tuple(name for name, rule in COMBINERS.items() if rule.bilevel)


class AlgorithmConfig(Section):
    """Losses and how their gradients are combined (docs/method.md)."""

    forget_loss: ForgetLoss = "npo"
    retain_loss: RetainLoss | None = "gdr"
    combiner: Combiner = "blur"
    forget_weight: float = Field(
        1.0, ge=0, description="w_f, the weight of the forget gradient. MUSE's gamma for blur "
                               "(BLO_forget_lower); 1 in MUSE's blur_upper and penalty.")
    retain_weight: float | list[float] = Field(
        1.0, description="w_r, the weight of the retain gradient (one per forget corpus, or one "
                         "for all). WMDP's alpha for blur; MUSE's gamma for blur_upper and penalty.")
    beta: float = Field(0.1, gt=0, description="Inverse temperature of NPO/SimNPO.")
    delta: float = Field(0.0, description="SimNPO margin.")
    eps: float = Field(1e-12, gt=0, description="Added to squared norms in projections.")
    task_vector_scale: float = Field(1.0, gt=0, description="task_vector: theta - s*(theta_ft - theta).")

    @property
    def uses_rmu(self) -> bool:
        return "rmu" in (self.forget_loss, self.retain_loss)

    def losses(self) -> list:
        """The registered losses the algorithm uses (forget, then retain)."""
        return [FORGET_LOSSES[self.forget_loss],
                *([RETAIN_LOSSES[self.retain_loss]] if self.retain_loss else [])]

    @property
    def reference_losses(self) -> list[str]:
        """The chosen losses that need a frozen reference model, as ``kind_loss='name'``."""
        return [f"{kind}_loss={name!r}" for kind, name, table in
                (("forget", self.forget_loss, FORGET_LOSSES),
                 ("retain", self.retain_loss, RETAIN_LOSSES))
                if name is not None and table[name].needs_reference]


class SteeringConfig(Section):
    """RMU steering: layer, coefficient and the parameters that train."""

    layer: Layer = Field(7, description="Decoder layer whose output is steered (0-based).")
    coeff: float | list[float] = Field(
        6.5, description="Steering coefficient c (one per forget corpus, or one for all).")
    update_layers: list[Layer] = Field(default_factory=lambda: [5, 6, 7], min_length=1)
    param_suffix: str | None = Field(
        None, description="Which parameter of each updated layer trains, named within the layer "
                          "(null: the MLP output projection of the model's family, e.g. "
                          "mlp.down_proj.weight for Llama and Mistral, fc2.weight for OPT).")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="Seed of the random control vector u.")


# accelerate's tracker names (accelerate.tracking.LOGGER_TYPE_TO_CLASS; a test keeps them equal)
Tracker = Literal["tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml",
                  "dvclive", "swanlab"]
SELECTION_RULES = ("final", "muse_first_below_retrained")


class TrainConfig(Section):
    epochs: int = Field(10, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    lr: float = Field(2.5e-5, gt=0)
    batch_size: int = Field(4, gt=0, description="Per-device micro-batch size.")
    grad_accum: int = Field(1, gt=0)
    optimizer: Optimizer = Field("adamw", description=(
        "adamw (torch), sgd, adafactor (transformers', factored second moment, no first "
        "moment, the lr given), adamw_8bit / paged_adamw_8bit (bitsandbytes, GPU only: pip "
        "install 'blurctl[bnb]')."))
    adam_eps: float = Field(1e-8, gt=0, description="Epsilon of adamw and the 8-bit AdamWs "
                                                    "(the WMDP code uses 1e-6).")
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)
    global_batch_size: int | None = Field(
        None, gt=0, description="Examples per optimizer step over all processes; sets grad_accum.")
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(2, gt=0, description="How many recent checkpoints to keep.")
    precompute_reference: bool = Field(
        False, description="Compute pi_ref's log-probability of every forget chunk once, before "
                           "training, and keep no reference model (npo; klr and rmu-retain need "
                           "the reference model at every step).")
    offload_forget_grad: bool = Field(
        False, description="Keep the set-aside forget gradient in CPU memory during the retain "
                           "pass (saves one gradient buffer on the accelerator at its peak).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in the backward pass "
                           "instead of keeping them: less memory, about a third more compute.")
    save_every_epoch: bool = Field(False, description="Save the model after every epoch in "
                                                      "epochs/epoch-N (loadable, never pruned).")
    report_to: list[Tracker] = Field(default_factory=list, description=(
        "Experiment trackers (accelerate's): every logged statistic per step, the resolved "
        "recipe as config, evaluation scores at the end. Install the tracker's package "
        "(e.g. pip install 'blurctl[tensorboard]')."))

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return _as_list(value)


class HardwareConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_processes: int = Field(1, gt=0)
    num_machines: int = Field(1, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: a whole copy per process; fsdp: parameters, gradients and "
                           "optimizer state sharded with torch FSDP2.")

    @field_validator("strategy", mode="before")
    @classmethod
    def _no_deepspeed(cls, value: Any) -> Any:
        if value == "deepspeed":
            raise ValueError("deepspeed shards gradients across ranks, where BLUR's projection "
                             "needs them whole, and is not supported; use fsdp (FSDP2 shards "
                             "parameters, gradients and optimizer state)")
        return value

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads a bare `no` as false

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines


class MuseEvalConfig(Section):
    """MUSE metrics (docs/method.md) on a corpus in MUSE's layout."""

    corpus: str = Field(description="Folder in MUSE's layout, or 'embedded:corpus'.")
    retrained_model: str | None = Field(None, description="Model trained without D_f.")
    retrained_auc: float | None = Field(None, gt=0, le=1,
                                        description="Published AUC of the retrained model.")
    verbmem_max_new_tokens: int = Field(128, gt=0)
    knowmem_max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(8, gt=0)
    max_examples: int | None = Field(None, gt=0)


class LmEvalConfig(Section):
    """Zero-shot multiple choice through lm-evaluation-harness (docs/method.md)."""

    tasks: list[str] = Field(min_length=1, description="e.g. [wmdp_bio, wmdp_cyber, mmlu].")
    include_path: str | None = Field(None, description="Folder of extra task YAMLs.")
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, gt=0, description="At most this many examples per task.")
    batch_size: int = Field(8, gt=0)
    bootstrap_iters: int = Field(1000, ge=0)


class PeftConfig(Section):
    """LoRA adapters through the peft library (pip install 'blurctl[peft]'): only the
    adapters train; pi_ref is the base model with them disabled (docs/method.md §3)."""

    r: int = Field(8, gt=0, description="Rank of each adapter.")
    alpha: float = Field(16.0, gt=0, description="lora_alpha: the update is (alpha/r)·B·A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(None, description=(
        "Module names (or name endings) to adapt; 'all-linear': every linear layer but the "
        "output head; null: peft's default for the model type (Llama, Mistral: q_proj, "
        "v_proj). With the rmu losses: steering.param_suffix's module in "
        "steering.update_layers."))
    merge: bool = Field(True, description="blurctl publish uploads the merged model (true) or "
                                          "the adapter alone (false).")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return value if value == "all-linear" else _as_list(value)


class EvalConfig(Section):
    muse: MuseEvalConfig | None = None
    lm_eval: LmEvalConfig | None = None
    compare_base: bool = Field(True, description="Also evaluate the model before unlearning.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for 95% intervals (0: none).")
    every_epoch: bool = Field(False, description="Evaluate the MUSE metrics of every epoch's "
                                                 "model (needs train.save_every_epoch).")
    selection: str = Field("final", description=(
        "Which model the run reports and publishes: 'final'; 'muse_first_below_retrained' (the "
        "first epoch whose KnowMem_f is at or below the retrained model's, else the last: "
        "MUSE's protocol); or 'max:<metric>' / 'min:<metric>' over the epochs."))

    @field_validator("selection")
    @classmethod
    def _known_rule(cls, value: str) -> str:
        from blurctl.evaluate.metrics import BY_KEY

        goal, _, metric = value.partition(":")
        if value in SELECTION_RULES or (goal in ("max", "min") and metric in BY_KEY):
            return value
        raise ValueError(f"expected {', '.join(SELECTION_RULES)}, max:<metric> or min:<metric> "
                         f"with a metric of {', '.join(BY_KEY)}")


class PublishConfig(Section):
    repo_id: str | None = Field(None, description="ORG/NAME on the Hub.")

    @field_validator("repo_id")
    @classmethod
    def _hub_repo_id(cls, value: str | None) -> str | None:
        if value is not None:
            check_repo_id(value)
        return value
    private: bool = True
    tags: list[str] = Field(default_factory=list)


class ContainerConfig(Section):
    image: str | None = None
    runtime: Literal["apptainer", "docker"] = "apptainer"
    binds: list[str] = Field(default_factory=list)


class Recipe(Section):
    """A whole unlearning run."""

    model: ModelConfig
    data: DataConfig
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    steering: SteeringConfig | None = None
    peft: PeftConfig | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    container: ContainerConfig = Field(default_factory=ContainerConfig)
    output_dir: str = Field("runs/latest", min_length=1)
    seed: int = Field(0, ge=0, lt=SEED_LIMIT,
                      description="Training seed (batch order, initialisation); the embedded "
                                  "benchmark does not depend on it.")

    @model_validator(mode="after")
    def _cross_field(self) -> Recipe:
        problems = cross_field_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


def cross_field_problems(r: Recipe) -> list[str]:
    """Rules that involve more than one key, each as 'path: message'."""
    alg, problems = r.algorithm, []
    if alg.combiner in BILEVEL and alg.retain_loss is None:
        problems.append(f"algorithm.retain_loss: combiner {alg.combiner!r} needs a retain loss")
    method = METHODS.get(alg.combiner)
    if method is not None and any(getattr(alg, k) != v for k, v in method.requires.items()):
        problems.append(f"algorithm.combiner: {method.why}")
    if r.model.reference == "none" and alg.reference_losses:
        problems.append(f"model.reference: 'none', but algorithm.{alg.reference_losses[0]} needs "
                        "a frozen reference model (use 'copy' or a model path)")
    world = r.hardware.world_size
    if r.train.global_batch_size is not None:
        per_pass = r.train.batch_size * world
        if r.train.global_batch_size % per_pass:
            problems.append(f"train.global_batch_size: {r.train.global_batch_size} is not a multiple "
                            f"of batch_size x processes = {r.train.batch_size} x {world} = {per_pass}")
        elif r.train.grad_accum != 1 and r.train.grad_accum != r.train.global_batch_size // per_pass:
            problems.append(f"train.grad_accum: {r.train.grad_accum} contradicts global_batch_size "
                            f"{r.train.global_batch_size} (which implies "
                            f"{r.train.global_batch_size // per_pass}); set only one")
    if alg.retain_loss is not None and r.data.retain is None:
        problems.append(f"data.retain: required by algorithm.retain_loss={alg.retain_loss!r}")
    if alg.uses_rmu and r.steering is None:
        problems.append("steering: required by the rmu loss (layer, coeff, update_layers)")
    if r.steering is not None and not alg.uses_rmu:
        problems.append("steering: only the rmu losses use it, and neither algorithm loss is rmu; "
                        "remove the section or choose rmu")
    forget = {c.identity for c in r.data.forget}
    for i, c in enumerate(r.data.retain or []):
        if c.identity in forget:
            problems.append(f"data.retain.{i}: same corpus as data.forget ({c.path}, name "
                            f"{c.name}, split {c.split})")
    if r.train.precompute_reference:
        model_refs = [f"{loss.kind}_loss={loss.name!r}" for loss in alg.losses()
                      if loss.needs_reference and not loss.precomputable]
        if model_refs:
            problems.append(f"train.precompute_reference: algorithm.{model_refs[0]} needs the "
                            "reference model at every step; only npo's can be precomputed")
        elif not alg.reference_losses:
            problems.append("train.precompute_reference: no loss of this algorithm uses a "
                            "reference; remove the setting")
    if r.eval.every_epoch and not r.train.save_every_epoch:
        problems.append("eval.every_epoch: needs train.save_every_epoch: true (the epochs' "
                        "models are what it evaluates)")
    if r.eval.every_epoch and r.eval.muse is None:
        problems.append("eval.every_epoch: evaluates the MUSE metrics; set eval.muse")
    if r.eval.selection != "final" and not r.eval.every_epoch:
        problems.append(f"eval.selection: {r.eval.selection!r} chooses among the epochs; set "
                        "eval.every_epoch: true (and train.save_every_epoch: true)")
    if r.eval.selection == "muse_first_below_retrained" and not (
            r.eval.muse and r.eval.muse.retrained_model):
        problems.append("eval.selection: muse_first_below_retrained compares with the retrained "
                        "model; set eval.muse.retrained_model")
    problems += _peft_and_optimizer_problems(r)
    n = len(r.data.forget)
    if r.data.retain and len(r.data.retain) not in (1, n):
        problems.append(f"data.retain: {len(r.data.retain)} corpora for {n} forget corpora; "
                        f"give 1 or {n}")
    per_corpus = [("algorithm.retain_weight", alg.retain_weight)]
    if r.steering is not None:
        per_corpus.append(("steering.coeff", r.steering.coeff))
    for path, value in per_corpus:
        values = value if isinstance(value, list) else [value]
        if len(values) not in (1, n):
            problems.append(f"{path}: {len(values)} values for {n} forget corpora; give 1 or {n}")
        if any(v < 0 for v in values) or (path == "steering.coeff" and any(v == 0 for v in values)):
            problems.append(f"{path}: must be positive (got {value})")
    return problems


def _peft_and_optimizer_problems(r: Recipe) -> list[str]:
    """Combinations that LoRA or the 8-bit optimizers do not support."""
    problems, fsdp = [], r.hardware.strategy == "fsdp"
    if r.train.optimizer in BNB_OPTIMIZERS and fsdp:
        problems.append(f"train.optimizer: {r.train.optimizer!r} does not work with "
                        "hardware.strategy fsdp (bitsandbytes' 8-bit states do not handle FSDP2's "
                        "sharded parameters); use ddp, or adamw or adafactor")
    if r.peft is None:
        return problems
    if fsdp:
        problems.append("peft: LoRA with hardware.strategy fsdp is not supported (sharding the "
                        "base beneath the adapters is not implemented); use ddp")
    method = METHODS.get(r.algorithm.combiner)
    if method is not None and method.finish is not None and method.finish_adapter is None:
        problems.append(f"peft: the {method.name} method rewrites the final weights and has no "
                        "rule for LoRA adapters; remove the peft section")
    if r.algorithm.uses_rmu and r.steering is not None:
        if r.peft.target_modules is not None:
            problems.append("peft.target_modules: with the rmu losses the adapters go on "
                            "steering.param_suffix's module in steering.update_layers; leave "
                            "target_modules unset")
        suffix = r.steering.param_suffix
        if suffix is not None and not suffix.endswith(".weight"):
            problems.append(f"steering.param_suffix: with peft it must name a weight (ending "
                            f"in '.weight', got {suffix!r}): LoRA adapts the "
                            "module that holds it")
    return problems


def grad_accum(r: Recipe) -> int:
    """Micro-batches per optimizer step: from global_batch_size when given."""
    if r.train.global_batch_size is None:
        return r.train.grad_accum
    return r.train.global_batch_size // (r.train.batch_size * r.hardware.world_size)


def per_corpus(value: float | list[float], index: int) -> float:
    """The value for forget corpus ``index`` of a scalar-or-list setting."""
    return value[index] if isinstance(value, list) and len(value) > 1 else (
        value[0] if isinstance(value, list) else value)


def check_repo_id(repo_id: str) -> None:
    """ValueError unless ``repo_id`` is ORG/NAME as the Hub accepts it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1:
        raise ValueError(f"{repo_id!r} is not ORG/NAME")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(str(exc).rstrip(".")) from None
