"""dpo: rewards separate on a separable preference set; LoRA keeps a single model in memory."""

import json
import random

import pytest
import torch
from conftest import recipe_from_stages
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from upstack.core.context import StageContext
from upstack.core.recipe import load_recipe
from upstack.core.runner import run
from upstack.stages import dpo

FAST = {
    "per_device_train_batch_size": 8,
    "learning_rate": 2e-3,
    "max_length": 96,
    "logging_steps": 1,
    "beta": 0.1,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pairs(path, count=48):
    """Chosen: a worked answer; rejected: off-topic. Separable, so rewards must pull apart."""
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(count):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            handle.write(
                json.dumps(
                    {
                        "question": f"Ana has {a} pens and gets {b} more. How many?",
                        "chosen": f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.",
                        "rejected": "Marbles and shells are in rows of cards.",
                    }
                )
                + "\n"
            )
    return str(path)


def test_dpo_separates_rewards_and_saves(tmp_path, tiny_model):
    data = _pairs(tmp_path / "pairs.jsonl")
    stage = {
        "model": str(tiny_model),
        "datasets": [{"path": data, "columns": {"question": "prompt"}}],
        "trainer": {**FAST, "max_steps": 8},
    }
    run(load_recipe(recipe_from_stages(tmp_path, {"dpo": stage})), ["dpo"])
    out = tmp_path / "runs" / "dpo"
    metrics = json.loads((out / "upstack.json").read_text())["metrics"]
    assert metrics["steps"] == 8
    assert metrics["reward_accuracy_last"] > metrics["reward_accuracy_first"]
    assert metrics["reward_accuracy_last"] >= 0.9
    assert metrics["reward_margin_last"] > metrics["reward_margin_first"] + 0.1
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    before, after = (
        load_file(str(tiny_model / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert any(not torch.equal(before[k], after[k]) for k in before)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Ben has 2 pens and gets 3 more."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert model.generate(**prompt, max_new_tokens=5).shape[1] > prompt["input_ids"].shape[1]


def test_lora_dpo_uses_the_adapter_disabled_model_as_reference(tmp_path, tiny_model):
    from peft import PeftModel

    data = _pairs(tmp_path / "pairs.jsonl", count=16)
    stage = {
        "model": str(tiny_model),
        "datasets": [{"path": data, "columns": {"question": "prompt"}}],
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "trainer": {**FAST, "max_steps": 4, "learning_rate": 5e-3},
    }
    recipe = load_recipe(recipe_from_stages(tmp_path, {"dpo": stage}))
    ctx = StageContext(
        recipe=recipe,
        name="dpo",
        out_dir=tmp_path / "o",
        work_dir=tmp_path / "w",
        config_hash="test",
    )
    trainer = dpo.build_trainer(recipe.stages["dpo"], ctx)
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)
    assert trainer.args.precompute_ref_log_probs
    models = [m for m in (trainer.model, trainer.ref_model) if isinstance(m, torch.nn.Module)]
    assert len(models) == 1
    trainer.train()
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    assert margins[-1] > margins[0]


def test_dpo_trains_only_the_listed_layers(tmp_path, tiny_model):
    """train_layers in dpo: the listed layers move, everything else is saved bit-identical."""
    data = _pairs(tmp_path / "pairs.jsonl", count=16)
    stage = {
        "model": str(tiny_model),
        "datasets": [{"path": data, "columns": {"question": "prompt"}}],
        "train_layers": [6, 7],
        "trainer": {**FAST, "max_steps": 3},
    }
    run(load_recipe(recipe_from_stages(tmp_path, {"dpo": stage})), ["dpo"])
    out = tmp_path / "runs" / "dpo"
    trained = json.loads((out / "upstack.json").read_text())["metrics"]["trained"]
    assert trained["layers"] == [6, 7] and trained["lm_head"] is False
    before, after = (
        load_file(str(tiny_model / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    for name, tensor in before.items():
        listed = name.startswith(("model.layers.6.", "model.layers.7."))
        assert torch.equal(after[name], tensor) != listed, name
