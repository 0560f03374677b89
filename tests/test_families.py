"""Every family a user may bring x every stage kind that touches a model: it works (checked on the
outcome: grown layers are their source layers, upcycled logits are the base's, training moves
weights, a merge is the weighted sum) or is refused before anything runs, in one line naming the
key and why. The families and what each stage does with them are tests/families.py's."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, moved_copy, recipe_from_stages
from families import FAMILIES, MIXTURES, STAGES, WINDOW, build_family, build_tokenizer, expected

from upstack.core.errors import UserError
from upstack.core.recipe import load_recipe
from upstack.core.runner import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAINER = {
    "max_steps": 1,
    "per_device_train_batch_size": 2,
    "max_length": 48,
    "learning_rate": 1e-2,
    "logging_steps": 1,
}
SFT = {**TRAINER, "max_length": 128}  # a whole arith conversation, so the answer has a loss
DUS_MAP = [0, 1, 2, 1, 2, 3]  # dus with drop_layers 1 on 4 layers: [0, 3) + [1, 4)
WEIGHTS = (0.3, 0.7)  # the linear merge of the base and a moved copy
PEER = {"experts": 64, "heads": 2, "top_k": 4, "key_dim": 16}  # a PEER branch in every layer
LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (its tiny checkpoint, a moved copy of it to merge with); read them only."""
    root = tmp_path_factory.mktemp("families")
    tokenizer = build_tokenizer(root / "tokenizer")
    built = {}
    for name in FAMILIES:
        base = build_family(name, root / name, tokenizer)
        built[name] = (base, moved_copy(base, root / f"{name}-moved", seed=1))
    return built


def stage_body(stage: str, base: Path, other: Path) -> dict:
    model = str(base)
    arith = [{"arith": {"problems": 20}}]
    return {
        "dus": {"kind": "upscale", "model": model, "drop_layers": 1},
        "moe": {"kind": "upscale", "model": model, "method": "moe", "experts": 2},
        "peer": {"kind": "upscale", "model": model, "method": "peer", "layers": "all"} | PEER,
        "cpt": {"kind": "cpt", "model": model, "datasets": arith, "trainer": TRAINER},
        "sft": {"kind": "sft", "model": model, "datasets": arith, "trainer": SFT},
        "lora": {
            "kind": "sft",
            "model": model,
            "datasets": arith,
            "adapter": {"r": 2, "alpha": 4},  # the Adapter's defaults otherwise: dropout 0.05
            "trainer": SFT,
        },
        "dpo": {
            "kind": "dpo",
            "model": model,
            "datasets": [{"generated": {"task": "listops", "problems": 8}}],
            "trainer": TRAINER,
        },
        "merge": {
            "kind": "merge",
            "merge_method": "linear",
            "models": [
                {"model": model, "parameters": {"weight": WEIGHTS[0]}},
                {"model": str(other), "parameters": {"weight": WEIGHTS[1]}},
            ],
        },
        "eval": {
            "kind": "eval",
            "models": [model],
            "math": {"problems": {"source": "arith", "split": "eval", "count": 2}}
            | {"max_new_tokens": 4},
            "loss": {"count": 2, "max_length": 32},
        },
    }[stage]


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    from upstack.models import peer

    peer.register()  # a PEER model's classes, as upstack's stages load them
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor as transformers names it once loaded (mergekit writes a mixture's experts one
    by one, transformers 5 fuses them on load)."""
    return load(model_dir).state_dict()


def token_ids() -> torch.Tensor:
    """Longer than the sliding window: a window lost on the way changes the logits."""
    assert WINDOW < 24
    return torch.randint(4, 400, (2, 24), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- what works


def grown_layers_are_source_layers(out: Path, base: Path) -> None:
    source, grown = state(base), state(out)
    for name, tensor in grown.items():
        match = LAYER.search(name)
        if match:
            j = DUS_MAP[int(match.group(2))]
            name = f"{name[: match.start(2)]}{j}{name[match.end(2) :]}"
        assert torch.equal(tensor, source[name]), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(DUS_MAP)
    layer_types = json.loads((base / "config.json").read_text()).get("layer_types")
    if layer_types:  # sliding/full attention follows each layer
        assert config["layer_types"] == [layer_types[j] for j in DUS_MAP]


def upcycled_model_is_the_base(out: Path, base: Path) -> None:
    from upstack.growth import moe
    from upstack.models.shapes import read_shape

    with torch.no_grad():
        want, got = load(base)(token_ids()).logits, load(out)(token_ids()).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # every field of the base's config.json is the mixture's too (the sliding window above all)
    base_config = json.loads((base / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    for key, value in base_config.items():
        if key not in moe.OUTPUT_KEYS:
            assert written.get(key) == value, key
    # the shape planned before the stage ran is the one it wrote
    spec = load_recipe(out.parent.parent / "recipe.yaml").stages["moe"]
    planned = moe.output_shape(spec, lambda key: read_shape(base))
    assert planned == {**read_shape(out), "num_experts_per_tok": 2}


def branched_model_is_the_base(out: Path, base: Path) -> None:
    from upstack.growth import peer
    from upstack.models.shapes import read_shape

    with torch.no_grad():
        want, got = load(base)(token_ids()).logits, load(out)(token_ids()).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    model = load(out)
    assert all(hasattr(layer.mlp, "peer") for layer in model.model.layers)
    spec = load_recipe(out.parent.parent / "recipe.yaml").stages["peer"]
    # the planned shape carries the branch as config.json has it (a plan counts its tables)
    written = json.loads((out / "config.json").read_text())["peer"]
    assert peer.output_shape(spec, lambda key: read_shape(base)) == {
        **read_shape(out),
        "peer": written,
    }


def training_moved_the_weights(out: Path, base: Path) -> None:
    before, after = state(base), state(out)
    assert before.keys() == after.keys()
    moved = [name for name in before if not torch.equal(before[name], after[name])]
    assert any(LAYER.search(name) for name in moved), moved
    metrics = json.loads((out / "upstack.json").read_text())["metrics"]
    if json.loads((base / "config.json").read_text()).get("num_local_experts"):
        assert metrics["router_load"]["train"]["assignments"] > 0  # its routers were counted


def merged_is_the_weighted_sum(out: Path, base: Path, other: Path) -> None:
    a, b, merged = state(base), state(other), state(out)
    assert merged.keys() == a.keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, WEIGHTS[0] * a[name] + WEIGHTS[1] * b[name])


def evaluated(out: Path) -> None:
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"]), rows


@pytest.mark.parametrize(
    ("family", "stage"),
    [(f, s) for f in FAMILIES for s in STAGES if expected(f, s) is None],
)
def test_the_stage_works_on_the_family(zoo, tmp_path, family, stage):
    base, other = zoo[family]
    run(load_recipe(recipe_from_stages(tmp_path, {stage: stage_body(stage, base, other)})), [])
    out = tmp_path / "runs" / stage
    if stage == "dus":
        grown_layers_are_source_layers(out, base)
    elif stage == "moe":
        upcycled_model_is_the_base(out, base)
    elif stage == "peer":
        branched_model_is_the_base(out, base)
    elif stage == "merge":
        merged_is_the_weighted_sum(out, base, other)
    elif stage == "eval":
        evaluated(out)
    else:
        training_moved_the_weights(out, base)


@pytest.mark.parametrize("family", MIXTURES)
def test_lora_with_dropout_0_trains_a_mixtures_experts(zoo, tmp_path, family):
    base, other = zoo[family]
    body = stage_body("lora", base, other)
    body["adapter"]["dropout"] = 0.0
    run(load_recipe(recipe_from_stages(tmp_path, {"lora": body})), [])
    before, after = state(base), state(tmp_path / "runs" / "lora")
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert any(".mlp.experts." in name for name in moved), sorted(moved)


# --------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize(
    ("family", "stage"),
    [(f, s) for f in FAMILIES for s in STAGES if expected(f, s) is not None],
)
def test_the_stage_is_refused_in_one_line_before_anything_runs(zoo, tmp_path, family, stage):
    refusal = expected(family, stage)
    recipe = recipe_from_stages(tmp_path, {stage: stage_body(stage, *zoo[family])})
    with pytest.raises(UserError) as caught:
        run(load_recipe(recipe), [])  # a refusal at load raises from load_recipe
    if refusal.when == "preflight":  # loading alone passes
        load_recipe(recipe)
    text = str(caught.value)
    assert "\n" not in text
    assert re.match(rf"^{re.escape(str(recipe))}:\d+: stages\.{stage}\.{refusal.key}: ", text), text
    assert refusal.message in text, text
    assert not (tmp_path / "runs" / stage).exists()


def test_a_tied_phi3_is_refused_at_load_when_a_stage_brings_it(zoo, tmp_path):
    """A stage's output is checked on the shape the recipe plans for it: the upscale of a
    fine-tuned Phi-4-mini fails at load, before the fine-tuning runs."""
    base, _ = zoo["phi4_mini"]
    stages = {
        "sft": stage_body("sft", base, base),
        "dus": {"kind": "upscale", "model": "sft", "drop_layers": 1},
    }
    with pytest.raises(UserError, match=r"stages\.dus\.model: Phi3ForCausalLM with tie_word"):
        load_recipe(recipe_from_stages(tmp_path, stages))


def test_the_readme_table_is_this_matrix():
    from families import readme_table

    assert readme_table() in (ROOT / "README.md").read_text()
