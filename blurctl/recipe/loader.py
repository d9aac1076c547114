"""Reading a recipe: YAML (safe loader only), dot-list overrides, validation.

``load_recipe`` raises ``RecipeError`` with every problem at once, each naming its YAML
path and, for a misspelled key, the nearest valid one.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from blurctl.recipe.schema import Recipe


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
