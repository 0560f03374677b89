"""cpt: packed causal-LM training on text, from the init model or any checkpoint."""

import json

import pytest
import torch
from conftest import recipe_from_stages
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from upstack.core.context import StageContext
from upstack.core.recipe import load_recipe
from upstack.core.runner import run
from upstack.stages import cpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cpt_packs_text_trains_and_saves(tmp_path, tiny_model):
    stage = {
        "model": str(tiny_model),
        "datasets": [{"arith": {"problems": 300}}],
        "eval_fraction": 0.1,
        "trainer": {
            "max_steps": 15,
            "per_device_train_batch_size": 4,
            "max_length": 128,
            "learning_rate": 3e-3,
            "logging_steps": 1,
        },
    }
    path = recipe_from_stages(tmp_path, {"cpt": stage})
    recipe = load_recipe(path)
    ctx = StageContext(
        recipe=recipe,
        name="cpt",
        out_dir=tmp_path / "o",
        work_dir=tmp_path / "w",
        config_hash="test",
    )
    trainer = cpt.build_trainer(recipe.stages["cpt"], ctx)
    # documents packed into 128-token rows
    assert trainer.args.packing and len(trainer.train_dataset) < 270
    assert all(len(ids) <= 128 for ids in trainer.train_dataset["input_ids"])

    run(recipe, ["cpt"])
    out = tmp_path / "runs" / "cpt"
    metrics = json.loads((out / "upstack.json").read_text())["metrics"]
    losses = [loss for _, loss in metrics["loss_curve"]]
    assert metrics["steps"] == 15 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert metrics["eval_loss"] < losses[0] and metrics["tokens_per_second"] > 0
    # the effective trainer settings: upstack's CPU defaults, cpt's packing, the recipe's keys
    settings = metrics["trainer_settings"]
    assert settings["bf16"] is False and settings["use_cpu"] is True
    assert settings["packing"] is True and settings["packing_strategy"] == "wrapped"
    assert settings["max_steps"] == 15 and settings["learning_rate"] == 3e-3
    assert "output_dir" not in settings and "per_device_eval_batch_size" not in settings
    before, after = (
        load_file(str(tiny_model / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert all(not torch.equal(before[k], after[k]) for k in before if "layers" in k)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer("Question: Ana has 3 apples.", return_tensors="pt")
    assert (
        model.generate(**prompt, max_new_tokens=5, do_sample=False).shape[1]
        > prompt["input_ids"].shape[1]
    )
