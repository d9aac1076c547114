"""The training memory estimate of the paper recipes on one 80 GB GPU, from config alone.

    python benchmarks/memory_7b.py          # prints the README's tables

The two models' configs are written from their published sizes (Llama-2-7B, the MUSE-News
target's architecture; Zephyr-7B-beta, a Mistral-7B), so nothing is downloaded; the
parameter counts equal the published 6,738,415,616 and 7,241,732,096 (tests/test_memory.py).
Each recipe runs as written but in one process on one GPU (hardware.num_processes=1).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU_GIB = 79.0  # what torch reports for an 80 GB A100/H100 (80 GiB less the driver's share)

CONFIGS = {
    "llama-2-7b": ("LlamaConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        dtype="float16")),
    "zephyr-7b-beta": ("MistralConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        sliding_window=4096, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False, dtype="bfloat16")),
}
CASES = [("Llama-2-7B / MUSE-News", "recipes/muse_news.yaml", "llama-2-7b"),
         ("Zephyr-7B-beta / WMDP", "recipes/wmdp.yaml", "zephyr-7b-beta")]
ONE_GPU = ["hardware.num_processes=1", "hardware.strategy=ddp"]


def write_config(name: str, folder: Path) -> Path:
    """Write ``CONFIGS[name]`` as a config.json into ``folder/name``; return that folder."""
    import transformers

    cls, kwargs = CONFIGS[name]
    target = folder / name
    getattr(transformers, cls)(**kwargs).save_pretrained(target)
    return target


def markdown(title: str, recipe_path: str, config_dir: Path, gpu_gib: float = GPU_GIB) -> str:
    """One recipe's estimate as a markdown table, with the verdict for one GPU."""
    from blurctl.pipeline.memory import GIB, estimate, gib, memory_problems, recipe_shape
    from blurctl.recipe import load_recipe

    recipe = load_recipe(ROOT / recipe_path, [f"model.path={config_dir}", *ONE_GPU])
    shape = recipe_shape(recipe)
    result = estimate(recipe, shape)
    lines = [f"**{title}** (`{recipe_path}`, one process):", "",
             "| part | GiB | how it is counted |", "| --- | ---: | --- |"]
    lines += [f"| {part} | {size} | {how} |" for part, size, how in result.table()]
    problems = memory_problems(recipe, shape, int(gpu_gib * GIB), f"one {gpu_gib:g} GiB GPU")
    verdict = (problems[0].removeprefix("hardware: ") if problems else
               f"fits: about {gib(result.total)} GiB of {gpu_gib:g} GiB")
    return "\n".join([*lines, "", verdict])


def tables(folder: Path) -> str:
    """Every case's markdown, as printed into the README."""
    return "\n\n".join(markdown(title, recipe, write_config(name, folder))
                       for title, recipe, name in CASES)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        print(tables(Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
