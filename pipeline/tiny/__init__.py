"""Tiny models and the shapes world: test and demo scaffolding, kept apart from the product.

- Tiny checkpoints, one builder module per family (real transformers classes with small shapes,
  seeded): ``llava`` (``tiny:llava``, ``tiny:llava-bench``, and the trained, committed
  ``tiny:llava-shapes`` under ``checkpoints/``), ``llava_next``, ``qwen2_5_vl``, ``qwen3_vl``, ``qwen3_5``.
  ``checkpoint(recipe)`` is the directory of one: committed, or built once into the cache
  (``$RESPRUNE_CACHE``). The product reaches it only by name: ``model.path: tiny:<recipe>`` is
  resolved by ``pipeline.models.sources``, which imports this package when such a path is used.
- ``shapes_world``: the synthetic world of coloured shapes, its corpora (demo, held-out
  evaluation, training) and its ``python -m`` CLI; ``scoring``: its caption scoring.

    python -m pipeline.tiny [--recipe llava] [--out DIR]   # builds, prints the directory
    model.path: "tiny:llava" in a config                   # resolves to the cached directory
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import llava, llava_next, qwen2_5_vl, qwen3_5, qwen3_vl
from .common import VERSION, save_checkpoint

# recipe -> a fresh, seeded (model, processor or (tokenizer, image processor)) of that checkpoint.
BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    **{recipe: functools.partial(llava.new_tiny_llava, recipe) for recipe in llava.RECIPES},
    "llava_next": llava_next.new_tiny_llava_next,
    "qwen2_5_vl": qwen2_5_vl.new_tiny_qwen2_5_vl,
    "qwen3_vl": qwen3_vl.new_tiny_qwen3_vl,
    "qwen3_5": qwen3_5.new_tiny_qwen3_5,
}
TRAINED = llava.TRAINED  # committed checkpoints, never built at run time
CHECKPOINTS = Path(__file__).parent / "checkpoints"


def checkpoint(recipe: str) -> str:
    """The directory of tiny checkpoint ``recipe``: committed (trained), or built into the cache
    if missing."""
    if recipe not in BUILDERS:
        raise ValueError(f"no tiny model recipe for {recipe!r}; known: {', '.join(BUILDERS)}")
    if recipe in TRAINED:
        trained = CHECKPOINTS / f"tiny-{recipe}"
        if not (trained / "config.json").exists():
            raise ValueError(
                f"the trained checkpoint {trained} is missing: python jobs/train_tiny_vlm.py --out {trained}")
        return str(trained)
    from pipeline.models.sources import cache_root

    target = cache_root() / f"tiny-{recipe}-{VERSION}"  # "tiny-llava-v3"
    if not (target / "config.json").exists():
        build(recipe, target)
    return str(target)


def build(recipe: str, out: Path) -> Path:
    """Build and save the random-weight checkpoint of ``recipe`` into ``out`` (atomically)."""
    if recipe not in BUILDERS or recipe in TRAINED:
        raise ValueError(f"no buildable tiny model recipe {recipe!r}; known: {', '.join(buildable())}")
    return save_checkpoint(*BUILDERS[recipe](), out)


def buildable() -> list[str]:
    """The recipes built with random weights (every one but the trained)."""
    return [r for r in BUILDERS if r not in TRAINED]
