"""Training part of a grown model: `train_layers` through the upscale stage's layer map, frozen
parameters bit-identical and without optimizer state, LoRA limited to the trained layers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import recipe_from_stages
from safetensors.torch import load_file

from upstack.core.recipe import load_recipe
from upstack.core.runner import context, run
from upstack.models import layermap
from upstack.stages import cpt
from upstack.train.loop import train_and_save

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
TRAINER = {
    "max_steps": 5,
    "per_device_train_batch_size": 2,
    "max_length": 64,
    "learning_rate": 3e-3,
    "logging_steps": 1,
}
DATA = [{"arith": {"problems": 40}}]


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def layer_of(name: str) -> int | None:
    match = LAYER.match(name)
    return int(match.group(1)) if match else None


@pytest.fixture(scope="module")
def grown(tiny_model, tmp_path_factory):
    """expand (8 -> 12, identity blocks 2, 5, 8, 11) and dus (m=3: 8 -> 10, seam 4|5), run once;
    the training stages are declared here and run by the tests."""
    directory = tmp_path_factory.mktemp("partial")
    stages = {
        "up_expand": {
            "kind": "upscale",
            "model": str(tiny_model),
            "method": "expand",
            "new_layers": 4,
        },
        "up_dus": {"kind": "upscale", "model": str(tiny_model), "drop_layers": 3},
        "cpt_new": {"kind": "cpt", "model": "up_expand", "datasets": DATA, "trainer": TRAINER}
        | {"train_layers": "new"},
        "cpt_seam": {"kind": "cpt", "model": "up_dus", "datasets": DATA, "trainer": TRAINER}
        | {"train_layers": "seam"},
        "sft_seam": {"kind": "sft", "model": "cpt_seam", "datasets": DATA, "trainer": TRAINER}
        | {"train_layers": "seam"},
        "lora_some": {
            "kind": "cpt",
            "model": "up_dus",
            "datasets": DATA,
            "trainer": TRAINER,
            "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train_layers": [1, 4],
            "train_lm_head": True,
        },
    }
    recipe = load_recipe(recipe_from_stages(directory, stages))
    run(recipe, ["up_expand", "up_dus"])
    return recipe


def test_training_only_new_layers_leaves_the_rest_bit_identical(grown, tmp_path):
    recipe = grown
    ctx = context(recipe, "cpt_new", "test", out_dir=tmp_path / "out", work=tmp_path / "work")
    ctx.out_dir.mkdir()
    spec = recipe.stages["cpt_new"]
    trainer = cpt.build_trainer(spec, ctx)
    new = [2, 5, 8, 11]
    assert layermap.select(layermap.read_layer_map(recipe.out_dir / "up_expand"), "new") == new

    metrics = train_and_save(trainer, spec, ctx)

    # the optimizer holds state for exactly the parameters of the new layers, counted
    model = trainer.model
    in_new = {id(p) for name, p in model.named_parameters() if layer_of(name) in new}
    wanted = sum(p.numel() for name, p in model.named_parameters() if layer_of(name) in new)
    state = trainer.optimizer.optimizer.state
    assert {id(p) for p in state} == in_new
    assert sum(p.numel() for p in state) == wanted
    assert all(p.grad is None for p in model.parameters() if id(p) not in in_new)
    trained = metrics["trained"]
    assert trained["layers"] == new and trained["train_layers"] == "new"
    assert (trained["embeddings"], trained["lm_head"], trained["final_norm"]) == (False,) * 3
    assert trained["parameters_trainable"] == trained["optimizer_state_parameters"] == wanted
    assert wanted < trained["parameters"] / 3

    # the saved model: originals, embeddings, norm and head are the input's, bit for bit
    before, after = tensors(recipe.out_dir / "up_expand"), tensors(ctx.out_dir)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        if layer_of(name) in new:
            assert not torch.equal(after[name], tensor), f"{name} did not train"
        else:
            assert torch.equal(after[name], tensor), f"{name} changed but is frozen"


def test_seam_resolves_to_the_same_layers_two_stages_down(grown):
    recipe = grown
    # before anything runs: planned from the recipe (cpt_seam and sft_seam not built yet)
    pending = frozenset({"cpt_seam", "sft_seam"})
    for stage in ("cpt_seam", "sft_seam"):
        ctx = context(recipe, stage, "h", pending)
        assert layermap.train_layers("seam", ctx, 10) == [4, 5]

    run(recipe, ["sft_seam"])
    trained = {
        stage: json.loads((recipe.out_dir / stage / "upstack.json").read_text())["metrics"][
            "trained"
        ]
        for stage in ("cpt_seam", "sft_seam")
    }
    assert trained["cpt_seam"]["layers"] == trained["sft_seam"]["layers"] == [4, 5]
    before, after = tensors(recipe.out_dir / "cpt_seam"), tensors(recipe.out_dir / "sft_seam")
    for name, tensor in before.items():
        if layer_of(name) in (4, 5):
            assert not torch.equal(after[name], tensor), name
        else:
            assert torch.equal(after[name], tensor), name

    # the card shows the layer map compactly and what each stage trained
    from upstack.stages.push import model_card

    card = model_card(recipe, "sft_seam", "org/tiny-seam")
    assert "Layer map" in card and "| 4      |" in card and "original+seam" in card
    assert "| 7-9    |" in card and "| 5-7           |" in card  # one row: 7-9 <- source 5-7
    line = "Trained layers 4, 5 (`train_layers: seam`); frozen: embeddings, lm_head, final_norm"
    assert card.count(line) == 2  # cpt_seam and sft_seam


def test_a_dir_an_upscale_stage_wrote_carries_its_layer_map(grown, tmp_path):
    """Another recipe trains the grown model by path: the map comes from its manifest."""
    path = recipe_from_stages(
        tmp_path,
        {"cpt": {"model": str(grown.out_dir / "up_dus"), "datasets": DATA, "train_layers": "seam"}},
    )
    recipe = load_recipe(path)
    assert layermap.train_layers("seam", context(recipe, "cpt", "h"), 10) == [4, 5]


def test_lora_adapts_only_the_listed_layers(grown, tmp_path):
    recipe = grown
    ctx = context(recipe, "lora_some", "test", out_dir=tmp_path / "out", work=tmp_path / "work")
    ctx.out_dir.mkdir()
    spec = recipe.stages["lora_some"]
    trainer = cpt.build_trainer(spec, ctx)
    adapted = {
        layer_of(name.removeprefix("base_model.model."))
        for name, p in trainer.model.named_parameters()
        if "lora_" in name
    }
    assert adapted == {1, 4}
    # all-linear in those layers: q k v o gate up down, A and B each
    lora = [name for name, _ in trainer.model.named_parameters() if "lora_" in name]
    assert len(lora) == 2 * 7 * 2

    metrics = train_and_save(trainer, spec, ctx)
    assert metrics["trained"]["layers"] == [1, 4] and metrics["trained"]["lm_head"] is True
    before, after = tensors(recipe.out_dir / "up_dus"), tensors(ctx.out_dir)
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        changes = layer_of(name) in (1, 4) and name.endswith("proj.weight")
        if changes or name == "lm_head.weight":
            assert not torch.equal(after[name], tensor), f"{name} did not train"
        else:
            assert torch.equal(after[name], tensor), f"{name} changed but is frozen"
