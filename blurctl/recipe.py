"""The recipe: one declarative YAML file describing an unlearning run.

Every section is a small pydantic model that forbids unknown keys. ``load_recipe``
reads YAML (safe loader only), applies dot-list overrides and validates, raising
``RecipeError`` with every problem at once, each naming its YAML path and, for a
misspelled key, the nearest valid one.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    reference: str = Field("copy", description="Frozen reference for npo/klr/rmu-retain: 'copy' "
                                               "(of the model), a model path, or 'none'.")


class CorpusConfig(Section):
    """A text corpus: a .txt/.json/.jsonl file, a local folder, or a hub dataset id."""

    path: str
    text_field: str = "text"
    split: str = "train"
    name: str | None = Field(None, description="Hub dataset configuration name.")
    max_examples: int | None = Field(None, gt=0)
    max_len: int | None = Field(None, gt=1, description="Tokens per chunk for this corpus "
                                                        "(default: data.max_len).")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


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


ForgetLoss = Literal["ga", "npo", "simnpo", "rmu"]
RetainLoss = Literal["gdr", "klr", "rmu"]
Combiner = Literal["blur", "blur_upper", "penalty", "task_vector"]
BILEVEL = ("blur", "blur_upper")
NEEDS_REFERENCE = {("forget", "npo"), ("retain", "klr"), ("retain", "rmu")}


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

    @property
    def reference_losses(self) -> list[str]:
        """The chosen losses that need a frozen reference model, as ``kind_loss='name'``."""
        return [f"{kind}_loss={name!r}" for kind, name in
                (("forget", self.forget_loss), ("retain", self.retain_loss))
                if (kind, name) in NEEDS_REFERENCE]


class SteeringConfig(Section):
    """RMU steering: layer, coefficient and the parameters that train."""

    layer: Layer = Field(7, description="Decoder layer whose output is steered (0-based).")
    coeff: float | list[float] = Field(
        6.5, description="Steering coefficient c (one per forget corpus, or one for all).")
    update_layers: list[Layer] = Field(default_factory=lambda: [5, 6, 7], min_length=1)
    param_suffix: str = Field("mlp.down_proj.weight",
                              description="Which parameter of each updated layer trains.")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="Seed of the random control vector u.")

    @property
    def trained_suffixes(self) -> list[str]:
        """Name endings of the parameters RMU trains, one per updated layer."""
        return [f"layers.{i}.{self.param_suffix}" for i in self.update_layers]

    def trains(self, name: str) -> bool:
        return name.endswith(tuple(self.trained_suffixes))


class TrainConfig(Section):
    epochs: int = Field(10, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    lr: float = Field(2.5e-5, gt=0)
    batch_size: int = Field(4, gt=0, description="Per-device micro-batch size.")
    grad_accum: int = Field(1, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    adam_eps: float = Field(1e-8, gt=0, description="AdamW's epsilon (the WMDP code uses 1e-6).")
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)
    global_batch_size: int | None = Field(
        None, gt=0, description="Examples per optimizer step over all processes; sets grad_accum.")
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(2, gt=0, description="How many recent checkpoints to keep.")


class HardwareConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_processes: int = Field(1, gt=0)
    num_machines: int = Field(1, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"

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


class EvalConfig(Section):
    muse: MuseEvalConfig | None = None
    lm_eval: LmEvalConfig | None = None
    compare_base: bool = Field(True, description="Also evaluate the model before unlearning.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for 95% intervals (0: none).")


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
    if alg.combiner == "task_vector":
        if alg.forget_loss != "ga" or alg.retain_loss is not None:
            problems.append("algorithm.combiner: task_vector fine-tunes on D_f and subtracts; "
                            "set forget_loss: ga and retain_loss: null")
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
    if r.hardware.strategy == "deepspeed" and alg.combiner in BILEVEL:
        problems.append(f"hardware.strategy: deepspeed shards gradients across ranks and is not "
                        f"supported with combiner {alg.combiner!r}; use fsdp")
    forget_paths = {c.path for c in r.data.forget}
    for i, c in enumerate(r.data.retain or []):
        if c.path in forget_paths:
            problems.append(f"data.retain.{i}: same corpus as data.forget ({c.path})")
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


class RecipeError(Exception):
    """A recipe that cannot be used; ``problems`` holds one line per error."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic models inside a type annotation (through unions and lists)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class found by following ``loc`` down from ``model``."""
    for key in loc:
        if isinstance(key, int):  # a list index: stay on the item model
            continue
        field = model.model_fields.get(key)
        nested = _models_in(field.annotation) if field else []
        if not nested:
            return None
        model = nested[0]
    return model


_TYPE_TAG = re.compile(r"^(float|int|str|bool|none|(list|dict|function-\w+)\[.*\]|\w+Config)$")


def _describe(error: dict[str, Any]) -> str:
    raw_loc = error["loc"]
    keep_last = error["type"] == "extra_forbidden"
    loc = tuple(k for i, k in enumerate(raw_loc)
                if not (isinstance(k, str) and _TYPE_TAG.match(k)
                        and not (keep_last and i == len(raw_loc) - 1)))
    path = ".".join(str(k) for k in loc) or "(top level)"
    if error["type"] == "extra_forbidden" and loc:
        parent = _model_at(Recipe, loc[:-1])
        valid = list(parent.model_fields) if parent else []
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        return f"{path}: unknown key{suggestion} (valid: {', '.join(valid)})"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    msg = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return msg
    return f"{path}: {msg} (got {error.get('input')!r})"


def validate_dict(raw: Any, source: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(source, ["(top level): a recipe must be a mapping of sections"])
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = [line for e in exc.errors() for line in _describe(e).splitlines()]
        seen: set[str] = set()  # one line per path (a union reports each of its branches)
        unique = [ln for ln in lines if not (ln.split(":")[0] in seen or seen.add(ln.split(":")[0]))]
        raise RecipeError(source, unique) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` as (["a", "b", "c"], value), the value read as recipe YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError("override", [f"{text!r}: expected KEY.PATH=VALUE"])
    try:
        return key.split("."), _parse(value) if value else None
    except (yaml.YAMLError, RecursionError) as exc:
        where, problem = _yaml_problem(exc)
        raise RecipeError("override", [f"{text!r}: {where}invalid YAML: {problem}"]) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``a.b.c=value``; a number indexes a list (``data.forget.1.max_len=512``)."""
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = raw
        for i, key in enumerate(keys):
            last = i == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise RecipeError("override", [f"{text!r}: {'.'.join(keys[:i])} has no item {key}"])
                key = int(key)
            elif not isinstance(node.get(key), (dict, list)) and not last:
                node[key] = {}
            if last:
                node[key] = value
            else:
                node = node[key]
    return raw


MAX_ALIASES = 50
MAX_DEPTH = 20
MAX_RECIPE_BYTES = 1_000_000
# YAML 1.1 reads 1e-3 as a string; a recipe means the number (as YAML 1.2 does).
_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


class _RecipeLoader(yaml.SafeLoader):
    """The safe loader, refusing duplicate keys, documents nested deeper than
    ``MAX_DEPTH`` and more than ``MAX_ALIASES`` aliases (an anchor bomb expands
    exponentially once anything walks the result)."""

    def compose_node(self, parent, index):  # noqa: ANN001 (PyYAML's signature)
        if self.check_event(yaml.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*refs); refusing to expand")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.MarkedYAMLError(problem=f"nested deeper than {MAX_DEPTH} levels",
                                           problem_mark=mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 (PyYAML's signature)
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}",
                                           problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _parse(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader)


def _yaml_problem(exc: BaseException) -> tuple[str, str]:
    """(``line N: `` or nothing, what is wrong) of a YAML failure."""
    if isinstance(exc, RecursionError):
        return "", f"nested deeper than {MAX_DEPTH} levels"
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return (f"line {mark.line + 1}: " if mark else ""), problem


def read_yaml(path: Path) -> Any:
    """Parse ``path`` with the recipe loader (safe: no tags that build Python objects)."""
    if not path.is_file():
        raise RecipeError(str(path), ["file not found"])
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(str(path), [f"larger than {MAX_RECIPE_BYTES} bytes; not a recipe"])
    try:
        return _parse(path.read_text())
    except UnicodeDecodeError:
        raise RecipeError(str(path), ["not UTF-8 text"]) from None
    except (yaml.YAMLError, RecursionError) as exc:
        where, problem = _yaml_problem(exc)
        raise RecipeError(str(path), [f"{where}invalid YAML: {problem}"]) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    raw = read_yaml(path)
    if isinstance(raw, dict) and overrides:
        raw = apply_overrides(raw, overrides)
    return validate_dict(raw, str(path))


def recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML, every default written out."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
