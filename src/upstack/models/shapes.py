"""A model's shape before it exists: read from a checkpoint's config.json, or derived from the recipe
for a stage this run has yet to build, so a mismatch is refused before the stages ahead of it run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from upstack.core import registry
from upstack.core.recipe import Recipe
from upstack.core.refs import Reference

# config.json fields that must agree for two models' tensors to line up one by one
SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    # a mixture of experts: experts per layer; None when dense. transformers 5 writes it as
    # num_local_experts, a Qwen3-MoE config.json that transformers 4 wrote as num_experts
    "num_local_experts",
    "num_experts",
)
# what names the tensors: the class transformers builds, mergekit's architecture key, and whether
# the head is the embedding matrix (tied: the checkpoint holds no lm_head tensor of its own)
ARCHITECTURE_KEYS = ("architectures", "model_type", "tie_word_embeddings")
Shape = dict[str, Any]  # SHAPE_KEYS and ARCHITECTURE_KEYS; None: not known before the stage runs
InputShape = Callable[[str], Shape | None]  # a stage's reference key -> that input's shape


def read_shape(model_dir: Path) -> Shape | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return {key: config.get(key) for key in (*SHAPE_KEYS, *ARCHITECTURE_KEYS)}


def planned_shape(recipe: Recipe, ref: Reference, pending: frozenset[str]) -> Shape | None:
    """The shape of the model `ref` names, as it is or will be once this run built it; None when
    it cannot be known offline (a Hub model, a stage kind that does not say)."""
    if ref.origin == "hub":
        return None
    if ref.origin == "path" or ref.stage not in pending:
        return read_shape(Path(ref.location))
    spec = recipe.stages[ref.stage]
    refs = {r.key: r for r in recipe.refs(ref.stage)}

    def input_shape(key: str) -> Shape | None:
        return planned_shape(recipe, refs[key], pending) if key in refs else None

    return registry.kind(spec.kind).output_shape(spec, input_shape)


def differences(shape: Shape, other: Shape, keys: tuple[str, ...] = SHAPE_KEYS) -> list[str]:
    """`key: a vs b` for every key both shapes know and disagree on."""
    return [
        f"{key}: {shape[key]} vs {other[key]}"
        for key in keys
        if shape.get(key) is not None and other.get(key) is not None and shape[key] != other[key]
    ]


def expert_count(shape: Shape) -> int | None:
    """Experts per layer of a mixture (whichever key its config reads); None when dense."""
    return shape.get("num_local_experts") or shape.get("num_experts")
