"""The layer map of a grown model: where each output layer came from and what it is (original,
duplicate, seam, new), and the layers a training stage's `train_layers` names through it."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

from upstack.core import registry
from upstack.core.recipe import Recipe
from upstack.core.rundir import read_manifest

# What an output layer can be. One layer may have two roles: a DUS seam layer is often a duplicate.
#   original   the first copy of a source layer
#   duplicate  a later copy of a source layer (DUS's second half, Gstack's copies)
#   seam       either side of a join: neighbours whose source layers do not follow each other
#   new        a block that starts as the identity (LLaMA Pro's expand); never a seam or duplicate
#   expert     a mixture-of-experts layer (upscale's moe): the base's attention, experts for its FFN;
#              its entry also lists `experts`, the source of each expert's FFN
#   peer       a layer with a PEER branch beside its FFN (upscale's peer), besides its other role
#              (the base's layer: `original`); its entry also has `peer_experts`
ROLES = ("original", "duplicate", "seam", "new", "expert", "peer")
# `train_layers` keyword -> the role whose layers it trains
SELECTORS = {
    "new": "new",
    "seam": "seam",
    "duplicates": "duplicate",
    "experts": "expert",
    "peer": "peer",
}
# Keywords that train only part of each layer they select: the modules under this name (the MoE
# block: router and experts; the PEER branch), so `experts` and `peer` leave what the base
# already trained frozen.
WITHIN = {"experts": "mlp", "peer": "mlp.peer"}


def build(
    origins: list[tuple[str, int]],
    new: set[int] | frozenset[int] = frozenset(),
    roles: dict[int, list[str]] | None = None,
) -> list[dict[str, Any]]:
    """The layer map of an output made of `origins[i] = (source, source layer)`; `new` are the
    output layers that start as identity blocks; `roles` sets the roles of other output layers
    outright (upscale's moe: every layer `expert`; such layers are never seams)."""
    copies: Counter = Counter()
    layer_map = []
    for i, (source, j) in enumerate(origins):
        copy = copies[source, j]
        copies[source, j] += 1
        if roles and i in roles:
            kind = list(roles[i])
        elif i in new:
            kind = ["new"]
        else:
            kind = ["duplicate" if copy else "original"]
        layer_map.append(
            {"layer": i, "source": source, "source_layer": j, "copy": copy, "roles": kind}
        )
    # A seam is where the residual stream meets a layer that did not see it in the source:
    # identity blocks pass it through unchanged, so they are skipped, not seams themselves.
    kept = [i for i in range(len(origins)) if i not in new and not (roles and i in roles)]
    for a, b in pairwise(kept):
        (source_a, j_a), (source_b, j_b) = origins[a], origins[b]
        if (source_a, j_a + 1) != (source_b, j_b):
            for i in (a, b):
                if "seam" not in layer_map[i]["roles"]:
                    layer_map[i]["roles"].append("seam")
    return layer_map


def select(layer_map: list[dict[str, Any]], selector: str) -> list[int]:
    """The output layers a `train_layers` keyword names: `new`, `seam`, `duplicates`, `experts`,
    `peer`."""
    role = SELECTORS[selector]
    return [entry["layer"] for entry in layer_map if role in entry["roles"]]


def compact(layer_map: list[dict[str, Any]]) -> list[list[str]]:
    """Rows for a card: consecutive layers from consecutive source layers with the same roles
    are one row (`0-22 | base | 0-22 | original`), so a 48-layer DUS map is five rows."""
    rows: list[list[Any]] = []
    for entry in layer_map:
        roles = "+".join(entry["roles"])
        last = rows[-1] if rows else None
        if (
            last
            and last[1] == entry["source"]
            and last[4] == roles
            and last[0][1] + 1 == entry["layer"]
            and last[2][1] + 1 == entry["source_layer"]
        ):
            last[0][1], last[2][1] = entry["layer"], entry["source_layer"]
        else:
            rows.append(
                [
                    [entry["layer"]] * 2,
                    entry["source"],
                    [entry["source_layer"]] * 2,
                    entry["copy"],
                    roles,
                ]
            )

    def span(pair: list[int]) -> str:
        return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}-{pair[1]}"

    return [[span(r[0]), r[1], span(r[2]), str(r[3]), r[4]] for r in rows]


COMPACT_HEADERS = ["layers", "source", "source layers", "copy", "roles"]


# --------------------------------------------------------------------------- through the recipe


def upscale_ancestor(recipe: Recipe, stage: str) -> str | None:
    """The nearest upscale stage the weights of `stage` come from (`stage` itself if it is one),
    followed up through the `weights` references of stages that keep their model's layers.
    None when there is none; ValueError when its models come from different ones (a merge)."""
    layer_map = registry.kind(recipe.stages[stage].kind).layer_map
    if layer_map == "writes":
        return stage
    if layer_map != "keeps":
        return None
    found = {
        upscale_ancestor(recipe, ref.stage) if ref.stage else None
        for ref in recipe.refs(stage)
        if ref.thing == "model" and ref.use == "weights"
    }
    if len(found) > 1:
        names = ", ".join(sorted(str(name) for name in found))
        raise ValueError(f"stage '{stage}' merges models of different upscale lineages ({names})")
    return found.pop() if found else None


def layer_map_of(
    recipe: Recipe, stage: str, pending: frozenset[str] = frozenset()
) -> list[dict[str, Any]] | None:
    """The layer map of upscale stage `stage`: from its manifest when it is done and not about to
    be rebuilt, else as the recipe will make it (the upscale module's `planned_layer_map`); None
    when that cannot be known offline (a Hub source, a seam that waits for an analysis)."""
    from upstack.core.runner import context

    if stage not in pending:
        found = read_layer_map(recipe.run_dir.stage(stage))
        if found is not None:
            return found
    spec = recipe.stages[stage]
    ctx = context(recipe, stage, "", pending, out_dir=recipe.run_dir.stage(stage))
    return registry.kind(spec.kind).planned_layer_map(spec, ctx)


def train_layers(selection: str | list[int], ctx, num_layers: int | None) -> list[int] | None:
    """The layer indices a training stage's `train_layers` names, for a model of `num_layers`
    layers. None when not known yet (preflight of a model this run builds from a Hub source, or
    from a seam an analysis places): checked again when the stage starts. Mistakes raise
    `ctx.fail("train_layers...", ...)`."""
    if selection == "all":
        return list(range(num_layers)) if num_layers is not None else None
    if isinstance(selection, list):
        for i, index in enumerate(selection):
            if num_layers is not None and index >= num_layers:
                raise ctx.fail(
                    f"train_layers.{i}",
                    f"layer {index} is out of range: the model has {num_layers} layers "
                    f"(0 to {num_layers - 1})",
                )
        return sorted(selection)
    model = ctx.ref("model")
    if model.stage is None:
        # a dir an upscale stage wrote (another recipe's, say) carries its map in its manifest
        ancestor = model.text
        layer_map = read_layer_map(Path(model.location)) if model.origin == "path" else None
        if layer_map is None:
            raise ctx.fail(
                "train_layers",
                f"{selection} needs the layer map of an upscale stage, and model {model.text} "
                "is no stage of this recipe nor a dir an upscale stage wrote; use all or a "
                "list of layer indices",
            )
    else:
        try:
            ancestor = upscale_ancestor(ctx.recipe, model.stage)
        except ValueError as err:
            raise ctx.fail("train_layers", f"{selection} needs one layer map: {err}") from None
        if ancestor is None:
            raise ctx.fail(
                "train_layers",
                f"{selection} needs the layer map of an upscale stage, and model stage "
                f"'{model.stage}' has none in its lineage; use all or a list of layer indices",
            )
        layer_map = layer_map_of(ctx.recipe, ancestor, ctx.pending)
        if layer_map is None:
            return None
    if num_layers is not None and num_layers != len(layer_map):
        raise ctx.fail(
            "train_layers",
            f"the layer map of '{ancestor}' has {len(layer_map)} layers, the model "
            f"{num_layers}: a stage between them changed the layers",
        )
    chosen = select(layer_map, selection)
    if not chosen:
        present = sorted({role for entry in layer_map for role in entry["roles"]})
        raise ctx.fail(
            "train_layers",
            f"the layer map of '{ancestor}' has no {SELECTORS[selection]} layers "
            f"(it has: {', '.join(present)})",
        )
    return chosen


def read_layer_map(stage_dir: Path) -> list[dict[str, Any]] | None:
    """The layer map a finished upscale stage recorded, or None."""
    return ((read_manifest(stage_dir) or {}).get("metrics") or {}).get("layer_origins")
