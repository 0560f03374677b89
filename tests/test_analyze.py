"""analyze: per-block angular distance and Block Influence, the cheapest block found where an
identity block sits, and its suggestion fed into upscale producing the expected slices."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import recipe_from_stages

from upstack.core.recipe import load_recipe
from upstack.core.runner import context, run
from upstack.models import layer_analysis
from upstack.stages import upscale

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IDENTITY = {4, 9}  # expand with new_layers 2 on 8 layers (-> 10): after source layers 3 and 7


@pytest.fixture(scope="module")
def analyzed(tiny_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("analyze")
    stages = {
        "up_expand": {
            "kind": "upscale",
            "model": str(tiny_model),
            "method": "expand",
            "new_layers": 2,
        },
        "analyze": {
            "model": "up_expand",
            "datasets": [{"arith": {"problems": 100}}],
            "samples": 8,
            "max_length": 64,
            "batch_size": 4,
        },
        # 10 -> 9: the cheapest single layer dropped; 10 -> 12: the cheapest pair duplicated
        "prune": {
            "kind": "upscale",
            "model": "up_expand",
            "target_layers": 9,
            "analysis": "analyze",
        },
        "grow": {
            "kind": "upscale",
            "model": "up_expand",
            "target_layers": 12,
            "analysis": "analyze",
        },
    }
    recipe = load_recipe(recipe_from_stages(directory, stages))
    run(recipe, [])
    return recipe


def test_an_identity_block_measures_zero_and_is_suggested_for_removal(analyzed):
    out = analyzed.out_dir / "analyze"
    results = json.loads((out / "analysis.json").read_text())
    assert results["layers"] == 10 and results["tokens"] == 8 * 64
    per_layer = results["angular_distance"][0]
    for i in range(10):
        if i in IDENTITY:
            assert per_layer[i] < 1e-6 and results["block_influence"][0][i] < 1e-12
        else:
            assert per_layer[i] > 1e-3, (i, per_layer)
    cheapest = results["blocks"][0]
    assert cheapest["size"] == 1 and cheapest["start"] in IDENTITY
    metrics = json.loads((out / "upstack.json").read_text())["metrics"]
    assert metrics["cheapest_layer"] == cheapest["start"]
    # every block size is listed; SOLAR's middle block where n - k is even
    assert [b["size"] for b in results["blocks"]] == list(range(1, 11))
    assert results["blocks"][1]["solar_start"] == 4 and "solar_start" not in results["blocks"][0]
    assert (out / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| cheapest block |" in (out / "analysis.md").read_text()


def test_distances_match_hidden_states_computed_independently(analyzed):
    """Against transformers' own hidden states (entries 0..n-1 are the inputs of the layers)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(analyzed.out_dir / "up_expand").eval()
    ids = torch.randint(4, 700, (2, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    measured = layer_analysis.measure(model, [batch])
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states
    for k in (1, 3):
        for start in range(0, 10 - k):  # the last entry of hidden_states is after the final norm
            a, b = states[start][0].double(), states[start + k][0].double()
            a2, b2 = states[start][1].double(), states[start + k][1].double()
            cos = torch.cat(
                [torch.nn.functional.cosine_similarity(x, y, dim=-1) for x, y in ((a, b), (a2, b2))]
            ).clamp(-1, 1)
            angle = (torch.arccos(cos) / math.pi).mean().item()
            # arccos is ill-conditioned at cos = 1: over an identity block (angle ~1e-9) float32
            # rounding in two forward passes moves the angle by ~1e-8, so compare to 1e-7 (the
            # other blocks are ~1e-2: still 5 significant digits)
            assert measured["angular_distance"][k - 1][start] == pytest.approx(angle, abs=1e-7)
            influence = (1 - cos).mean().item()
            assert measured["block_influence"][k - 1][start] == pytest.approx(influence, abs=1e-9)


def test_the_suggestion_fed_into_upscale_gives_the_expected_slices(analyzed):
    from transformers import AutoModelForCausalLM

    results = json.loads((analyzed.out_dir / "analyze" / "analysis.json").read_text())
    drop = results["blocks"][0]["start"]
    pair = min(range(9), key=results["angular_distance"][1].__getitem__)

    def slices(stage):
        config = yaml.safe_load((analyzed.out_dir / stage / "mergekit_config.yml").read_text())
        return [s["sources"][0]["layer_range"] for s in config["slices"]]

    assert slices("prune") == [r for r in ([0, drop], [drop + 1, 10]) if r[0] < r[1]]
    assert slices("grow") == [[0, pair + 2], [pair, 10]]
    manifest = json.loads((analyzed.out_dir / "grow" / "upstack.json").read_text())["metrics"]
    assert manifest["seam_slices"] == [[0, pair + 2], [pair, 10]]
    assert manifest["layers_after"] == 12

    # dropping an identity block drops nothing the model computes
    ids = torch.randint(4, 700, (2, 24), generator=torch.Generator().manual_seed(1))
    expanded = AutoModelForCausalLM.from_pretrained(analyzed.out_dir / "up_expand").eval()
    pruned = AutoModelForCausalLM.from_pretrained(analyzed.out_dir / "prune").eval()
    assert pruned.config.num_hidden_layers == 9
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, expanded(ids).logits, atol=1e-5, rtol=0)


def test_the_plan_shows_the_seam_before_anything_runs(analyzed, capsys):
    recipe = analyzed
    spec = recipe.stages["grow"]
    results = json.loads((recipe.out_dir / "analyze" / "analysis.json").read_text())
    pair = results["blocks"][1]["start"]
    upscale.preflight(spec, context(recipe, "grow", "h", frozenset({"grow"})))
    assert f"10 -> 12 layers as [0, {pair + 2}) + [{pair}, 10)" in capsys.readouterr().err
    # the analysis reruns first in this plan: its result is not known yet, the count is
    upscale.preflight(spec, context(recipe, "grow", "h", frozenset({"analyze", "grow"})))
    assert "once it has run (10 -> 12 layers)" in capsys.readouterr().err
