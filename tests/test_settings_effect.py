"""Every setting a user writes takes effect or is refused: names other suites use are read as the
field that takes them now, settings upstack acts on nothing with are refused, and the loading
settings users expect (revision, dtype, attention, int8 LoRA, added tokens) do what they say."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import recipe_from_stages
from safetensors.torch import load_file
from transformers import AutoTokenizer

from upstack.core.context import StageContext
from upstack.core.errors import UserError
from upstack.core.recipe import load_recipe
from upstack.core.runner import run
from upstack.stages import sft
from upstack.train.settings import loading

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = {"per_device_train_batch_size": 4, "learning_rate": 3e-3, "max_length": 64}


def _stage(model, **settings):
    return {"model": str(model), "datasets": [{"arith": {"problems": 24}}], **settings}


def _build(tmp_path, stage):
    recipe = load_recipe(recipe_from_stages(tmp_path, {"sft": stage}))
    ctx = StageContext(recipe, "sft", tmp_path / "out", tmp_path / "work", "test")
    return recipe, sft.build_trainer(recipe.stages["sft"], ctx)


def test_an_old_name_wins_over_upstacks_default(tmp_path, tiny_model):
    """gradient_checkpointing: true was ignored: upstack always set activation_checkpointing
    (off on CPU), which transformers reads first."""
    stage = _stage(tiny_model, trainer={**FAST, "max_steps": 1, "gradient_checkpointing": True})
    recipe, trainer = _build(tmp_path, stage)
    assert trainer.args.activation_checkpointing is True
    assert recipe.stages["sft"].trainer["activation_checkpointing"] is True  # as `show` shows it


def test_warmup_ratio_is_warmup_steps_below_one(tmp_path, tiny_model):
    stage = _stage(tiny_model, trainer={**FAST, "max_steps": 10, "warmup_ratio": 0.2})
    _, trainer = _build(tmp_path, stage)
    assert trainer.args.warmup_steps == 0.2 and trainer.args.get_warmup_steps(10) == 2


@pytest.mark.parametrize(
    "trainer, expected",
    [
        ({"hub_strategy": "every_save"}, "hub_strategy: set by the stage, not the recipe"),
        ({"max_prompt_length": 128}, "max_prompt_length: not a field of trl.SFTConfig any more"),
        (
            {"warmup_ratio": 0.1, "warmup_steps": 5},
            "warmup_ratio: the same setting as `warmup_steps`",
        ),
        ({"warmup_ratio": 2}, "warmup_ratio: a ratio is >= 0 and < 1, got 2"),
    ],
    ids=["hub-strategy", "max-prompt-length", "both-names", "ratio-above-one"],
)
def test_settings_upstack_would_not_act_on_are_refused_at_load(
    tmp_path, tiny_model, trainer, expected
):
    with pytest.raises(UserError, match=expected):
        load_recipe(recipe_from_stages(tmp_path, {"sft": _stage(tiny_model, trainer=trainer)}))


def test_a_revision_is_for_a_hub_model(tmp_path, tiny_model):
    path = recipe_from_stages(tmp_path, {"sft": _stage(tiny_model, revision="v2")})
    with pytest.raises(UserError, match=r"stages\.sft\.revision: a revision is a Hub model's"):
        load_recipe(path)


def test_loading_settings_reach_from_pretrained(tmp_path, tiny_model):
    spec = load_recipe(
        recipe_from_stages(
            tmp_path,
            {"sft": _stage(tiny_model, dtype="bfloat16", attn_implementation="eager")},
        )
    ).stages["sft"]
    assert loading(spec) == {"dtype": "bfloat16", "attn_implementation": "eager"}


def test_added_special_tokens_get_trained_embeddings(tmp_path, tiny_model):
    stage = _stage(
        tiny_model,
        add_special_tokens=["<|tool|>"],
        trainer={**FAST, "max_steps": 3, "logging_steps": 1},
    )
    run(load_recipe(recipe_from_stages(tmp_path, {"sft": stage})), ["sft"])
    out = tmp_path / "runs" / "sft"
    tokenizer = AutoTokenizer.from_pretrained(out)
    new = tokenizer.convert_tokens_to_ids("<|tool|>")
    weights = load_file(str(out / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    assert tokenizer.convert_ids_to_tokens(new) == "<|tool|>" and new < embed.shape[0]
    assert tokenizer.tokenize("a <|tool|> b").count("<|tool|>") == 1  # one token, never split
    assert embed.shape[0] >= len(tokenizer)
    assert torch.isfinite(embed[new]).all()


def test_added_tokens_without_trained_embeddings_are_refused(tmp_path, tiny_model):
    stage = _stage(tiny_model, add_special_tokens=["<|tool|>"], adapter={"type": "lora"})
    with pytest.raises(UserError, match="new tokens start with untrained embeddings"):
        load_recipe(recipe_from_stages(tmp_path, {"sft": stage}))


def test_a_file_takes_no_config(tmp_path, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
        )
        + "\n"
    )
    stage = {"model": str(tiny_model), "datasets": [{"path": str(data), "config": "main"}]}
    recipe = load_recipe(recipe_from_stages(tmp_path, {"sft": stage}))
    with pytest.raises(
        UserError, match=r"datasets\.0\.config: .*d\.jsonl is one file: config picks"
    ):
        run(recipe, ["sft"], dry_run=True)


def test_a_tracker_that_is_installed_logs_into_the_stage_dir(tmp_path, tiny_model):
    """report_to works offline with a tracker that is installed (tensorboard), and its files land
    in the stage dir, not in the working directory."""
    stage = _stage(
        tiny_model,
        trainer={**FAST, "max_steps": 2, "logging_steps": 1, "report_to": ["tensorboard"]},
    )
    run(load_recipe(recipe_from_stages(tmp_path, {"sft": stage})), ["sft"])
    events = list((tmp_path / "runs" / "sft" / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


@pytest.mark.parametrize(
    "report_to, expected",
    [
        (["wandb"], "report_to: wandb is not installed here: pip install wandb"),
        ("mlflow", "report_to: mlflow is not installed here: pip install mlflow"),
        (["tensorbord"], "report_to: no tracker 'tensorbord' .*did you mean tensorboard"),
    ],
    ids=["wandb", "mlflow", "typo"],
)
def test_a_tracker_that_cannot_run_is_refused_at_load(tmp_path, tiny_model, report_to, expected):
    """The handbook's default (report_to: [wandb]) without wandb installed died in the stage."""
    stage = _stage(tiny_model, trainer={"report_to": report_to})
    with pytest.raises(UserError, match=expected):
        load_recipe(recipe_from_stages(tmp_path, {"sft": stage}))


def test_the_handbooks_zephyr_recipe_reads_as_meant():
    """recipes/zephyr-7b-beta.yaml keeps the handbook's names; each lands on the field TRL reads."""
    from conftest import ROOT

    recipe = load_recipe(ROOT / "recipes" / "zephyr-7b-beta.yaml")
    sft_trainer, dpo_trainer = recipe.stages["sft"].trainer, recipe.stages["dpo"].trainer
    assert sft_trainer["activation_checkpointing"] is True and sft_trainer["max_length"] == 2048
    assert sft_trainer["warmup_steps"] == 0.1 and sft_trainer["eval_strategy"] == "epoch"
    assert sft_trainer["activation_checkpointing_kwargs"] == {"use_reentrant": False}
    assert dpo_trainer["beta"] == 0.01 and dpo_trainer["eval_strategy"] == "steps"
    assert recipe.stages["sft"].chat_template == "zephyr"
    assert loading(recipe.stages["sft"]) == {
        "revision": "main",
        "dtype": "bfloat16",
        "attn_implementation": "flash_attention_2",
    }


def test_config_picks_a_configuration_of_a_local_clone(tmp_path, tiny_model):
    """A local clone of a multi-config Hub data set (its README's `configs:`): `config:` was
    accepted and never passed to datasets."""
    from upstack.core.context import StageContext
    from upstack.train.data import Source, build_mixture

    clone = tmp_path / "clone"
    for config, answer in (("main", "4"), ("socratic", "Let us think. 4")):
        (clone / config).mkdir(parents=True)
        row = {"prompt": "What is 2 + 2?", "completion": answer}
        (clone / config / "train.jsonl").write_text(json.dumps(row) + "\n")
    (clone / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: main\n  data_files: [{split: train, path: main/train.jsonl}]\n"
        "- config_name: socratic\n  data_files: [{split: train, path: socratic/train.jsonl}]\n"
        "---\n"
    )
    recipe = load_recipe(recipe_from_stages(tmp_path, {"sft": _stage(tiny_model)}))
    ctx = StageContext(recipe, "sft", tmp_path / "out", tmp_path / "work", "test")
    train, _ = build_mixture([Source(path=str(clone), config="socratic")], "sft", ctx)
    assert train[0]["messages"][-1] == {"role": "assistant", "content": "Let us think. 4"}
