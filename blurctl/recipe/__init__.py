"""The recipe: one declarative YAML file describing an unlearning run (schema.py: its
sections and rules; loader.py: reading YAML, overrides and error messages)."""

from blurctl.recipe.loader import (
                                   RecipeError,
                                   apply_overrides,
                                   load_recipe,
                                   parse_override,
                                   read_yaml,
                                   recipe_yaml,
                                   validate_dict,
)
from blurctl.recipe.schema import (
                                   AlgorithmConfig,
                                   ContainerConfig,
                                   CorpusConfig,
                                   DataConfig,
                                   EvalConfig,
                                   HardwareConfig,
                                   LmEvalConfig,
                                   ModelConfig,
                                   MuseEvalConfig,
                                   PeftConfig,
                                   PublishConfig,
                                   Recipe,
                                   SteeringConfig,
                                   TrainConfig,
                                   check_repo_id,
                                   cross_field_problems,
                                   grad_accum,
                                   per_corpus,
)

__all__ = ["AlgorithmConfig", "ContainerConfig", "CorpusConfig", "DataConfig", "EvalConfig",
           "HardwareConfig", "LmEvalConfig", "ModelConfig", "MuseEvalConfig", "PeftConfig",
           "PublishConfig", "Recipe", "RecipeError", "SteeringConfig", "TrainConfig",
           "apply_overrides", "check_repo_id", "cross_field_problems", "grad_accum",
           "load_recipe", "parse_override", "per_corpus", "read_yaml", "recipe_yaml",
           "validate_dict"]
