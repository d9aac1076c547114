"""A grid over recipe keys, run one after another, then compared in one report."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from blurctl.recipe import Recipe, RecipeError, load_recipe


@dataclass(frozen=True)
class SweepPoint:
    name: str
    overrides: list[str]
    recipe: Recipe


def parse_axis(text: str) -> tuple[str, list[str]]:
    """``key=v1,v2,v3`` -> (key, [v1, v2, v3]); a value in [...] stays whole."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise RecipeError("sweep", [f"{text!r}: expected KEY=VALUE1,VALUE2,..."])
    parts = [values] if values.startswith("[") else [v for v in values.split(",") if v != ""]
    return key, parts


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")


def expand(recipe_path: Path, axes: list[str], base: list[str] | None = None) -> list[SweepPoint]:
    """Every grid point as a validated recipe writing into ``output_dir/<key-value_...>``."""
    parsed = [parse_axis(a) for a in axes]
    root = Path(load_recipe(recipe_path, base or []).output_dir)
    points, problems = [], []
    for combo in itertools.product(*(values for _, values in parsed)):
        pairs = [f"{key}={value}" for (key, _), value in zip(parsed, combo)]
        name = "_".join(_slug(f"{key.split('.')[-1]}-{value}") for (key, _), value in
                        zip(parsed, combo)) or "default"
        overrides = [*(base or []), *pairs, f"output_dir={root / name}"]
        try:
            points.append(SweepPoint(name, pairs, load_recipe(recipe_path, overrides)))
        except RecipeError as exc:
            problems += [f"[{name}] {p}" for p in exc.problems]
    if problems:
        raise RecipeError(str(recipe_path), problems)
    return points
