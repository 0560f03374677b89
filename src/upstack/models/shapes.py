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
# what a memory plan reads besides (upstack.models.memory), never compared between models
SIZE_KEYS = (
    "head_dim",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "dtype",
    "torch_dtype",
    "peer",  # a PEER model's branch settings (upscale method peer): its tables and retrieval
)
Shape = dict[str, Any]  # SHAPE_KEYS and ARCHITECTURE_KEYS; None: not known before the stage runs
InputShape = Callable[[str], Shape | None]  # a stage's reference key -> that input's shape
HubShape = Callable[[Reference], Shape | None]  # a Hub model's shape, where a caller knows one

# The config.json values of the Hub models upstack's own recipes start from, so a plan of them
# works offline (`upstack plan recipes/solar-10.7b.yaml`); any other Hub model's shape comes from
# the local Hub cache (huggingface-cli download MODEL config.json).
PUBLISHED: dict[str, Shape] = {
    # huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json
    "mistralai/Mistral-7B-v0.1": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
}


def read_shape(model_dir: Path, sizes: bool = False) -> Shape | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return shape_of(config, sizes)


def shape_of(config: dict, sizes: bool = False) -> Shape:
    """The shape keys of a config.json's data; with `sizes`, the SIZE_KEYS it has too."""
    shape = {key: config.get(key) for key in (*SHAPE_KEYS, *ARCHITECTURE_KEYS)}
    if sizes:
        shape.update({key: config[key] for key in SIZE_KEYS if config.get(key) is not None})
    return shape


def planned_shape(
    recipe: Recipe,
    ref: Reference,
    pending: frozenset[str],
    hub: HubShape | None = None,
    sizes: bool = False,
) -> Shape | None:
    """The shape of the model `ref` names, as it is or will be once this run built it; None when
    it cannot be known offline (a Hub model, unless `hub` knows it; a stage kind that does not
    say). `sizes`: with the SIZE_KEYS config.json files have (a plan's)."""
    if ref.origin == "hub":
        return hub(ref) if hub is not None else None
    if ref.origin == "path" or ref.stage not in pending:
        return read_shape(Path(ref.location), sizes)
    spec = recipe.stages[ref.stage]
    refs = {r.key: r for r in recipe.refs(ref.stage)}

    def input_shape(key: str) -> Shape | None:
        return planned_shape(recipe, refs[key], pending, hub, sizes) if key in refs else None

    return registry.kind(spec.kind).output_shape(spec, input_shape)


def hub_shape(ref: Reference) -> Shape | None:
    """A Hub model's shape offline: its config.json in the local Hub cache, else PUBLISHED."""
    from upstack.models.checkpoints import config_json

    config = config_json(ref)
    if config is not None:
        return shape_of(config, sizes=True)
    known = PUBLISHED.get(ref.location)
    return dict(known) if known else None


def plan_shape(recipe: Recipe, ref: Reference, pending: frozenset[str]) -> Shape | None:
    """The shape a plan counts with: planned from the recipe (a Hub source from its cached or
    published config), with what the recipe leaves open (init's vocabulary, which its tokenizer
    decides) read from the stage's output where one exists."""
    shape = planned_shape(recipe, ref, pending, hub_shape, sizes=True)
    if shape is None or ref.origin != "stage":
        return shape
    found = read_shape(Path(ref.location), sizes=True) or {}
    missing = {
        key: found[key] for key in found if shape.get(key) is None and key != "num_hidden_layers"
    }
    return {**shape, **missing}


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
