"""upscale's moe method (mergekit-moe, Mixtral output): every expert is its source's FFN, the rest
the base's; the mixture trains in cpt/sft with the load-balancing loss and records its routing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SMALL_ARCHITECTURE, recipe_from_stages
from safetensors.torch import load_file

from upstack.core.errors import UserError
from upstack.core.recipe import load_recipe
from upstack.core.runner import run
from upstack.models import layermap

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS = SMALL_ARCHITECTURE["num_hidden_layers"]
INTERMEDIATE = SMALL_ARCHITECTURE["intermediate_size"]
HIDDEN = SMALL_ARCHITECTURE["hidden_size"]
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
TRAINER = {
    "max_steps": 12,
    "per_device_train_batch_size": 4,
    "max_length": 64,
    "learning_rate": 3e-3,
    "logging_steps": 1,
}
DATA = [{"arith": {"problems": 120}}]
MATH = ["Question: Tom has 3 apples and buys 4 more. How many apples?"]
OTHER = ["Answer: the list reversed is c b a"]


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def dense_ffn(weights: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    return {
        p: weights[f"model.layers.{layer}.mlp.{p}.weight"]
        for p in ("gate_proj", "up_proj", "down_proj")
    }


def expert_ffn(weights: dict[str, torch.Tensor], layer: int, expert: int) -> dict:
    """Expert e of a layer as gate/up/down matrices: transformers 5 fuses them per layer as
    gate_up_proj [experts, 2 * intermediate, hidden] (gate rows first) and down_proj."""
    gate_up = weights[f"model.layers.{layer}.mlp.experts.gate_up_proj"][expert]
    return {
        "gate_proj": gate_up[:INTERMEDIATE],
        "up_proj": gate_up[INTERMEDIATE:],
        "down_proj": weights[f"model.layers.{layer}.mlp.experts.down_proj"][expert],
    }


def outside_ffn(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t for name, t in weights.items() if ".mlp." not in name}


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """A tiny Llama, upcycled into 4 experts and into 2 experts of two models (the base and a
    trained copy, hidden-state gates), then trained: cpt in full, cpt of the experts only, sft
    with LoRA. Run once."""
    directory = tmp_path_factory.mktemp("moe")
    pairs = directory / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps(
                {
                    "question": f"Ana has {a} pens and gets 2 more. How many?",
                    "chosen": f"{a} + 2 = {a + 2}. The answer is \\boxed{{{a + 2}}}.",
                    "rejected": "Marbles and shells are in rows of cards.",
                }
            )
            + "\n"
            for a in range(1, 17)
        )
    )
    stages = {
        "base": {
            "kind": "init",
            "tokenizer": {"corpus_problems": 100, "vocab_size": 400},
            "architecture": SMALL_ARCHITECTURE,
        },
        "upcycled": {
            "kind": "upscale",
            "model": "base",
            "method": "moe",
            "experts": 4,
            "router_aux_loss_coef": 0.02,
        },
        "tuned": {"kind": "cpt", "model": "base", "datasets": DATA, "trainer": TRAINER},
        "mixed": {
            "kind": "upscale",
            "model": "base",
            "method": "moe",
            "gate_mode": "hidden",
            "experts_per_token": 1,
            "experts": [
                {"positive_prompts": OTHER},
                {"model": "tuned", "positive_prompts": MATH, "negative_prompts": OTHER},
            ],
        },
        "cpt": {
            "kind": "cpt",
            "model": "upcycled",
            "datasets": DATA,
            "eval_fraction": 0.1,
            "trainer": TRAINER,
        },
        "cpt_experts": {
            "kind": "cpt",
            "model": "upcycled",
            "datasets": DATA,
            "train_layers": "experts",
            "trainer": {**TRAINER, "max_steps": 3},
        },
        "sft_lora": {
            "kind": "sft",
            "model": "cpt",
            "datasets": DATA,
            "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
            "trainer": {**TRAINER, "max_steps": 2},
        },
        "dpo": {
            "kind": "dpo",
            "model": "upcycled",
            "datasets": [{"path": str(pairs), "columns": {"question": "prompt"}}],
            "trainer": {**TRAINER, "max_steps": 2, "max_length": 96},
        },
    }
    recipe = load_recipe(recipe_from_stages(directory, stages))
    run(recipe, [])
    return directory / "runs"


def manifest(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "upstack.json").read_text())["metrics"]


def test_upcycled_experts_are_the_base_ffn_and_the_rest_is_the_base(mixture):
    base, moe = tensors(mixture / "base"), tensors(mixture / "upcycled")
    for layer in range(LAYERS):
        want = dense_ffn(base, layer)
        for expert in range(4):
            got = expert_ffn(moe, layer, expert)
            for name in want:
                assert torch.equal(got[name], want[name]), (layer, expert, name)
        assert moe[f"model.layers.{layer}.mlp.gate.weight"].shape == (4, HIDDEN)
    # attention, norms, embeddings and head: the base's, tensor for tensor
    assert outside_ffn(moe).keys() - {f"model.layers.{i}.mlp.gate.weight" for i in range(4)} == (
        outside_ffn(base).keys()
    )
    for name, tensor in outside_ffn(base).items():
        assert torch.equal(moe[name], tensor), name
    config = json.loads((mixture / "upcycled" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert config["router_aux_loss_coef"] == 0.02 and config["output_router_logits"] is False
    written = yaml.safe_load((mixture / "upcycled" / "mergekit_moe_config.yml").read_text())
    assert written["gate_mode"] == "random" and len(written["experts"]) == 4


def test_upcycled_model_computes_what_the_base_computes(mixture):
    """Identical experts whose top-k weights sum to 1 add up to the dense FFN."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(mixture / "upcycled")
    ids = tokenizer(MATH + OTHER, return_tensors="pt", padding=True)
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(mixture / "base")(**ids).logits
        moe = AutoModelForCausalLM.from_pretrained(mixture / "upcycled")(**ids).logits
    assert torch.allclose(dense, moe, atol=1e-5)
    assert (mixture / "upcycled" / "chat_template.jinja").is_file()


def test_experts_of_two_models_carry_each_models_ffn(mixture):
    base, tuned, moe = (tensors(mixture / s) for s in ("base", "tuned", "mixed"))
    for layer in range(LAYERS):
        for expert, source in enumerate((base, tuned)):
            want, got = dense_ffn(source, layer), expert_ffn(moe, layer, expert)
            assert all(torch.equal(got[n], want[n]) for n in want), (layer, expert)
        # the hidden gate: each expert's row is the base's normalised hidden state on its prompts
        gate = moe[f"model.layers.{layer}.mlp.gate.weight"]
        assert gate.shape == (2, HIDDEN) and not torch.allclose(gate[0], gate[1])
        assert torch.allclose(gate.norm(dim=-1), torch.ones(2), atol=1e-2)
    assert not torch.equal(dense_ffn(base, 0)["up_proj"], dense_ffn(tuned, 0)["up_proj"])
    for name, tensor in outside_ffn(base).items():  # attention from the base, not `tuned`
        assert torch.equal(moe[name], tensor), name
    metrics = manifest(mixture / "mixed")
    assert metrics["expert_sources"] == ["base", "tuned"] and metrics["experts_per_token"] == 1
    origins = metrics["layer_origins"]
    assert [e["roles"] for e in origins] == [["expert"]] * LAYERS
    assert all(e["experts"] == ["base", "tuned"] and e["source"] == "base" for e in origins)


def test_planned_shape_and_layer_map_match_what_ran(mixture):
    from upstack.models.shapes import planned_shape

    recipe = load_recipe(mixture.parent / "recipe.yaml")
    ref = next(r for r in recipe.refs("cpt") if r.key == "model")
    planned = planned_shape(recipe, ref, frozenset(recipe.stages))
    assert planned["architectures"] == ["MixtralForCausalLM"]
    assert (planned["num_local_experts"], planned["num_experts_per_tok"]) == (4, 2)
    written = json.loads((mixture / "upcycled" / "config.json").read_text())
    assert all(planned[k] == written[k] for k in ("hidden_size", "num_hidden_layers"))
    recorded = manifest(mixture / "upcycled")["layer_origins"]
    assert layermap.layer_map_of(recipe, "upcycled", frozenset(recipe.stages)) == recorded
    assert layermap.select(recorded, "experts") == list(range(LAYERS))


def test_the_mixture_trains_with_the_aux_loss_and_records_router_load(mixture):
    metrics = manifest(mixture / "cpt")
    losses = [loss for _, loss in metrics["loss_curve"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    before, after = tensors(mixture / "upcycled"), tensors(mixture / "cpt")
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.2.mlp.experts.gate_up_proj"):
        assert not torch.equal(before[name], after[name]), name
    # the upscale stage's coefficient reached TRL, which adds the load-balancing loss
    load = metrics["router_load"]
    assert load["aux_loss_enabled"] is True and load["router_aux_loss_coef"] == 0.02
    assert load["layers"] == list(range(LAYERS))
    for mode in ("train", "eval"):
        fractions = load[mode]["fractions"]
        assert len(fractions) == LAYERS and all(len(row) == 4 for row in fractions)
        assert all(abs(sum(row) - 1) < 1e-4 for row in fractions)
        assert all(1 <= imbalance <= 4 for imbalance in load[mode]["imbalance"])
        assert load[mode]["assignments"] > 0
    config = json.loads((mixture / "cpt" / "config.json").read_text())
    assert config["output_router_logits"] is False  # TRL turned them on only for training
    # one held-out set: no per-source losses (the router's eval_aux_loss is not a source)
    assert "eval_loss_by_source" not in metrics and "eval_curves" not in metrics


def test_train_layers_experts_trains_routers_and_experts_only(mixture):
    before, after = tensors(mixture / "upcycled"), tensors(mixture / "cpt_experts")
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(".mlp." in name for name in moved), sorted(moved)
    assert {f"model.layers.{i}.mlp.gate.weight" for i in range(LAYERS)} <= moved
    trained = manifest(mixture / "cpt_experts")["trained"]
    assert trained["layers"] == list(range(LAYERS)) and trained["within_layers"] == "mlp"
    assert trained["embeddings"] is False and trained["lm_head"] is False


def test_lora_on_the_mixture_adapts_layers_and_merges(mixture):
    """peft's all-linear takes the attention projections and, as target_parameters, the fused
    experts and routers; merged into plain weights, the rest is unchanged."""
    before, after = tensors(mixture / "cpt"), tensors(mixture / "sft_lora")
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(LAYER.match(name) for name in moved), sorted(moved)
    assert any(".self_attn." in name for name in moved)
    assert any(".mlp.experts." in name for name in moved)
    assert not any("layernorm" in name for name in moved)
    # the routers peft wrapped still report to the hooks set before it wrapped them
    load = manifest(mixture / "sft_lora")["router_load"]
    assert load["train"]["assignments"] > 0
    assert all(abs(sum(row) - 1) < 1e-4 for row in load["train"]["fractions"])


def test_experts_with_an_adapter_is_refused_with_the_reason(mixture, tmp_path):
    """A dir an upscale stage wrote brings its layer map; its experts are no Linear modules."""
    stage = {
        "kind": "cpt",
        "model": str(mixture / "upcycled"),
        "datasets": DATA,
        "train_layers": "experts",
        "adapter": {"r": 4},
        "trainer": {**TRAINER, "max_steps": 1},
    }
    recipe = load_recipe(recipe_from_stages(tmp_path, {"cpt": stage}))
    with pytest.raises(UserError) as caught:
        run(recipe, ["cpt"])
    assert "stages.cpt.adapter: train_layers experts trains the mlp blocks" in str(caught.value)
    assert "fused 3-D tensors" in str(caught.value)


def test_dpo_on_the_mixture_adds_the_aux_loss_and_counts_routing(mixture):
    metrics = manifest(mixture / "dpo")
    load = metrics["router_load"]
    assert load["aux_loss_enabled"] is True and load["router_aux_loss_coef"] == 0.02
    assert all(abs(sum(row) - 1) < 1e-4 for row in load["train"]["fractions"])
    before, after = tensors(mixture / "upcycled"), tensors(mixture / "dpo")
    assert not torch.equal(
        before["model.layers.1.mlp.experts.down_proj"],
        after["model.layers.1.mlp.experts.down_proj"],
    )
