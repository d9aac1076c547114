"""Experiment trackers through accelerate (``train.report_to``): the resolved recipe as the
run's config, every logged statistic per step, evaluation scores at the end."""

from __future__ import annotations

import json

from blurctl.recipe import Recipe


def flat_config(recipe: Recipe) -> dict[str, bool | int | float | str]:
    """The resolved recipe as ``section.key`` -> scalar (lists as JSON, None as "null"):
    what every tracker accepts as hyperparameters."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (bool, int, float, str)):
                flat[prefix + key] = value
            else:
                flat[prefix + key] = json.dumps(value)
    walk(recipe.model_dump(mode="json"), "")
    return flat


def tracker_problems(recipe: Recipe) -> list[str]:
    """Trackers whose package is not installed, as recipe errors."""
    from accelerate.utils import imports

    missing = [name for name in recipe.train.report_to
               if not getattr(imports, f"is_{name}_available")()]
    return [f"train.report_to: {name!r} needs its package (pip install {name}"
            + (" or 'blurctl[tensorboard]'" if name == "tensorboard" else "") + ")"
            for name in missing]


def score_values(results: dict) -> dict[str, float]:
    """``eval/<model>/<metric>`` -> value for every numeric score (intervals left out)."""
    return {f"eval/{model}/{key}": float(value)
            for model, scores in results.get("models", {}).items()
            for key, value in scores.items() if isinstance(value, (int, float))}
