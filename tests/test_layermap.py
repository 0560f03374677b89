"""The layer map: roles checked against SOLAR's mapping n, m -> layers, the card's compact rows,
the upscale ancestor found through the recipe, `upstack layers` before and after a run."""

from __future__ import annotations

import pytest
from conftest import recipe_from_stages, run_cli

from upstack.core.recipe import load_recipe
from upstack.core.runner import context
from upstack.models import layermap


@pytest.mark.parametrize(("n", "m"), [(8, 3), (8, 0), (8, 2), (8, 4), (6, 5), (32, 8), (48, 7)])
def test_dus_seams_and_duplicates_follow_from_n_and_m(n, m):
    # SOLAR's DUS, written independently: layers [0, n-m) of one copy, then [m, n) of the other
    layers = list(range(n - m)) + list(range(m, n))
    layer_map = layermap.build([("base", j) for j in layers])
    assert [e["source_layer"] for e in layer_map] == layers
    # the join is between output layers n-m-1 and n-m, unless n = 2m (the source unchanged)
    assert layermap.select(layer_map, "seam") == ([] if n == 2 * m else [n - m - 1, n - m])
    # the second copy repeats source layers m..n-m-1, which the first copy already holds
    assert layermap.select(layer_map, "duplicates") == list(range(n - m, n - m + max(0, n - 2 * m)))
    assert layermap.select(layer_map, "new") == []
    assert all(e["copy"] == (1 if "duplicate" in e["roles"] else 0) for e in layer_map)


def test_expand_and_stack_roles():
    # LLaMA Pro, groups of 2: an identity copy after source layers 1 and 3; new blocks are no seam
    origins = [("b", j) for j in (0, 1, 1, 2, 3, 3)]
    layer_map = layermap.build(origins, new={2, 5})
    assert [e["roles"] for e in layer_map] == [["original"], ["original"], ["new"]] * 2
    assert [e["copy"] for e in layer_map] == [0, 0, 1, 0, 0, 1]
    # Gstack, 3 copies of 4: two joins
    stacked = layermap.build([("b", j) for j in list(range(4)) * 3])
    assert layermap.select(stacked, "seam") == [3, 4, 7, 8]
    assert layermap.select(stacked, "duplicates") == list(range(4, 12))
    # two sources side by side join too, even at consecutive layer numbers
    mixed = layermap.build([("a", 0), ("a", 1), ("b", 2)])
    assert layermap.select(mixed, "seam") == [1, 2]
    # the MoE hook: roles set outright are kept, and such layers are nobody's seam
    experts = layermap.build([("b", 0), ("b", 0), ("b", 1)], roles={1: ["expert"]})
    assert [e["roles"] for e in experts] == [["original"], ["expert"], ["original"]]


def test_compact_rows_of_solar_are_five():
    layers = list(range(24)) + list(range(8, 32))  # SOLAR 10.7B: n = 32, m = 8
    rows = layermap.compact(layermap.build([("mistral", j) for j in layers]))
    assert rows == [
        ["0-22", "mistral", "0-22", "0", "original"],
        ["23", "mistral", "23", "0", "original+seam"],
        ["24", "mistral", "8", "1", "duplicate+seam"],
        ["25-39", "mistral", "9-23", "1", "duplicate"],
        ["40-47", "mistral", "24-31", "0", "original"],
    ]


@pytest.fixture
def lineage(tmp_path, tiny_model):
    stages = {
        "up": {"kind": "upscale", "model": str(tiny_model), "drop_layers": 3},
        "up2": {"kind": "upscale", "model": str(tiny_model), "method": "stack", "copies": 2},
        "cpt": {"model": "up", "datasets": [{"arith": {"problems": 5}}], "train_layers": "seam"},
        "sft": {"model": "cpt", "datasets": [{"arith": {"problems": 5}}]},
        "dpo": {"model": "sft", "datasets": [{"path": "p.jsonl"}], "train_layers": "duplicates"},
        "other": {"kind": "cpt", "model": "up2", "datasets": [{"arith": {"problems": 5}}]},
        "same": {
            "kind": "merge",
            "merge_method": "linear",
            "models": [{"model": "sft", "parameters": {"weight": 0.5}}, {"model": "dpo"}],
        },
        "mixed": {
            "kind": "merge",
            "merge_method": "linear",
            "models": [{"model": "sft", "parameters": {"weight": 0.5}}, {"model": "other"}],
        },
        "plain": {
            "kind": "cpt",
            "model": str(tiny_model),
            "datasets": [{"arith": {"problems": 5}}],
        },
    }
    return recipe_from_stages(tmp_path, stages)


def test_the_upscale_ancestor_is_found_through_training_and_merges(lineage):
    recipe = load_recipe(lineage, deep=False)
    assert [layermap.upscale_ancestor(recipe, s) for s in ("up", "cpt", "sft", "dpo", "same")] == [
        "up"
    ] * 5
    assert layermap.upscale_ancestor(recipe, "plain") is None
    with pytest.raises(ValueError, match="different upscale lineages"):
        layermap.upscale_ancestor(recipe, "mixed")
    # planned before anything ran: three stages down, the same layer map decides
    pending = frozenset(recipe.stages)
    assert layermap.train_layers("duplicates", context(recipe, "dpo", "h", pending), 10) == [5, 6]


@pytest.mark.slow
def test_layers_command_prints_the_planned_map_and_what_each_stage_trains(lineage):
    result = run_cli("layers", str(lineage), "dpo")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "## up (upscale, dus, missing: planned from the recipe)"
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["layer", "source", "source layer", "copy", "roles", "cpt", "dpo"]
    rows = {
        int(r[0]): r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[4:])
    }
    assert [i for i, r in rows.items() if r[5] == "x"] == [4, 5]  # cpt: seam
    assert [i for i, r in rows.items() if r[6] == "x"] == [5, 6]  # dpo: duplicates
    assert rows[5][4] == "duplicate+seam" and rows[5][2] == "3"
    missing = run_cli("layers", str(lineage), "plain")
    assert missing.returncode == 2 and "has no upscale stage in its lineage" in missing.stderr
