"""A grid over recipe keys (and named variants), run one after another, then reported."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
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


def read_variants(path: Path) -> dict[str, list[str]]:
    """A YAML mapping of variant name -> list of KEY=VALUE overrides."""
    from blurctl.recipe import read_yaml

    raw = read_yaml(path)
    if not isinstance(raw, dict) or not all(
            isinstance(v, list) and all(isinstance(o, str) for o in v) for v in raw.values()):
        raise RecipeError(str(path), ["expected a mapping of variant name to a list of KEY=VALUE"])
    return {str(k): v for k, v in raw.items()}


def expand(recipe_path: Path, axes: list[str], base: list[str] | None = None,
           variants: dict[str, list[str]] | None = None) -> list[SweepPoint]:
    """Every (variant x grid point) as a validated recipe writing into ``output_dir/<name>``.

    An axis with one value is a plain override shared by every run (not in the names).
    """
    parsed = [parse_axis(a) for a in axes]
    base = [*(base or []), *(f"{key}={values[0]}" for key, values in parsed if len(values) == 1)]
    parsed = [(key, values) for key, values in parsed if len(values) > 1]
    root = Path(load_recipe(recipe_path, base).output_dir)
    points, problems = [], []
    for variant, variant_overrides in (variants or {"": []}).items():
        for combo in itertools.product(*(values for _, values in parsed)):
            chosen = list(zip((key for key, _ in parsed), combo, strict=True))
            pairs = [f"{key}={value}" for key, value in chosen]
            parts = [_slug(variant)] if variant else []
            parts += [_slug(f"{key.split('.')[-1]}-{value}") for key, value in chosen]
            name = "_".join(parts) or "default"
            overrides = [*(base or []), *variant_overrides, *pairs, f"output_dir={root / name}"]
            try:
                points.append(SweepPoint(name, [*variant_overrides, *pairs],
                                         load_recipe(recipe_path, overrides)))
            except RecipeError as exc:
                problems += [f"[{name}] {p}" for p in exc.problems]
    if problems:
        raise RecipeError(str(recipe_path), problems)
    return points


def run_points(points: list[SweepPoint], overwrite: bool = False,
               on_start: Callable[[int, SweepPoint], None] | None = None,
               on_error: Callable[[SweepPoint, Exception], None] | None = None,
               ) -> tuple[list[Path], list[str]]:
    """Run every point one after another; (run folders done, names of the runs that failed).
    A failed run is reported through ``on_error`` and the sweep goes on. The base and
    retrained models are evaluated once: later runs evaluated alike take their scores
    from the first finished run (``results.json`` says so under ``reused``)."""
    from blurctl.errors import BlurctlError
    from blurctl.evaluate.stage import reference_identity
    from blurctl.pipeline.job import run

    done, failed = [], []
    evaluated: dict[str, Path] = {}  # reference identity -> the first run evaluated that way
    for i, point in enumerate(points, 1):
        if on_start:
            on_start(i, point)
        try:
            identity = reference_identity(point.recipe)
            run(point.recipe, overwrite=overwrite, reuse_from=evaluated.get(identity))
            done.append(Path(point.recipe.output_dir))
            evaluated.setdefault(identity, done[-1])
        except BlurctlError as exc:
            failed.append(point.name)
            if on_error:
                on_error(point, exc)
    return done, failed

