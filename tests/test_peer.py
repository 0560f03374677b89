"""upscale's peer method: a PEER branch beside the FFN of chosen layers. The grown model computes
what the base computes, the layer's product-key retrieval is the exact top k of a dense
computation over all N experts (and agrees with peer-pytorch on the same weights), training with
`train_layers: peer` moves the branch only and records expert usage, and the saved model loads
through transformers' remote code where upstack is never imported."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import SMALL_ARCHITECTURE, recipe_from_stages
from safetensors.torch import load_file

from upstack.core.recipe import load_recipe
from upstack.core.runner import run
from upstack.models import layermap

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS = SMALL_ARCHITECTURE["num_hidden_layers"]
BRANCH = {"experts": 256, "heads": 2, "top_k": 4, "key_dim": 16}  # 16^2 experts
PEER_LAYERS = [1, 2]
TRAINER = {
    "max_steps": 12,
    "per_device_train_batch_size": 4,
    "max_length": 64,
    "learning_rate": 1e-2,
    "logging_steps": 1,
}
DATA = [{"arith": {"problems": 120}}]
IDS = torch.randint(4, 400, (2, 24), generator=torch.Generator().manual_seed(0))


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def load(model_dir: Path):
    from upstack.models.checkpoints import SAFE, load_model

    return load_model(str(model_dir), SAFE, lambda message: AssertionError(message)).eval()


def manifest(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "upstack.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def grown(tmp_path_factory) -> Path:
    """A tiny Llama grown with PEER in layers 1 and 2, then trained: cpt of the branches only
    (with a held-out set), sft in full, dpo of the branches; and evaluated. Run once."""
    directory = tmp_path_factory.mktemp("peer")
    stages = {
        "base": {
            "kind": "init",
            "tokenizer": {"corpus_problems": 100, "vocab_size": 400},
            "architecture": SMALL_ARCHITECTURE,
        },
        # shards of 40KB: each 64KB table alone in one, the small tensors together
        "up": {"kind": "upscale", "model": "base", "method": "peer", "layers": PEER_LAYERS}
        | BRANCH
        | {"shard_size": "40KB"},
        "up_bf16": {"kind": "upscale", "model": "base", "method": "peer", "dtype": "bfloat16"}
        | BRANCH,
        "cpt": {
            "kind": "cpt",
            "model": "up",
            "datasets": DATA,
            "eval_fraction": 0.1,
            "train_layers": "peer",
            "trainer": TRAINER,
        },
        "sft": {
            "kind": "sft",
            "model": "cpt",
            "datasets": DATA,
            "trainer": TRAINER | {"max_steps": 2},
        },
        "dpo": {
            "kind": "dpo",
            "model": "up",
            "datasets": [{"generated": {"task": "listops", "problems": 8}}],
            "train_layers": "peer",
            "trainer": TRAINER | {"max_steps": 2, "max_length": 96},
        },
        "eval": {
            "kind": "eval",
            "models": ["up", "cpt"],
            "math": {"problems": {"source": "arith", "split": "eval", "count": 2}}
            | {"max_new_tokens": 4},
            "loss": {"count": 2, "max_length": 32},
        },
    }
    run(load_recipe(recipe_from_stages(directory, stages)), [])
    return directory / "runs"


# --------------------------------------------------------------------------- the grown model


def test_grown_model_computes_what_the_base_computes(grown):
    with torch.no_grad():
        want, got = load(grown / "base")(IDS).logits, load(grown / "up")(IDS).logits
    assert (got - want).abs().max().item() <= 1e-5
    # the branch is there and retrieves experts: only its up table (v) is 0
    model = load(grown / "up")
    branch = model.model.layers[1].mlp.peer
    assert branch.up.abs().max() == 0 and branch.down.abs().max() > 0
    assert not hasattr(model.model.layers[0].mlp, "peer")


def test_base_tensors_are_kept_and_the_tables_added(grown):
    base, up = tensors(grown / "base"), tensors(grown / "up")
    for name, tensor in base.items():
        assert torch.equal(up[name], tensor), name
    added = sorted(set(up) - set(base))
    assert {re.match(r"model\.layers\.(\d+)\.mlp\.peer\.", n).group(1) for n in added} == {"1", "2"}
    experts, hidden = BRANCH["experts"], SMALL_ARCHITECTURE["hidden_size"]
    assert up["model.layers.1.mlp.peer.down"].shape == (experts, hidden)
    assert up["model.layers.2.mlp.peer.sub_keys"].shape == (2, 16, BRANCH["key_dim"] // 2)
    config = json.loads((grown / "up" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == (
        "peer_llama",
        ["PeerLlamaForCausalLM"],
    )
    assert config["peer"]["layers"] == PEER_LAYERS and config["peer"]["experts"] == experts
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_peer.PeerLlamaForCausalLM"
    assert (grown / "up" / "modeling_peer.py").is_file()
    metrics = manifest(grown / "up")
    assert metrics["parameters_after"] - metrics["parameters_before"] == sum(
        up[n].numel() for n in added
    )
    index = json.loads((grown / "up" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(up) and len(set(index["weight_map"].values())) == 8


def test_a_dtype_retypes_the_base_and_the_branch(grown):
    base, up = tensors(grown / "base"), tensors(grown / "up_bf16")
    for name, tensor in up.items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.bfloat16, name
        if name in base:
            assert torch.equal(tensor, base[name].to(torch.bfloat16)), name
    config = json.loads((grown / "up_bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["peer"]["layers"] == [LAYERS // 2]


def test_planned_shape_and_layer_map_match_what_ran(grown):
    from upstack.models.shapes import planned_shape

    recipe = load_recipe(grown.parent / "recipe.yaml")
    ref = next(r for r in recipe.refs("cpt") if r.key == "model")
    planned = planned_shape(recipe, ref, frozenset(recipe.stages))
    written = json.loads((grown / "up" / "config.json").read_text())
    for key in ("model_type", "architectures", "hidden_size", "num_hidden_layers"):
        assert planned[key] == written[key], key
    recorded = manifest(grown / "up")["layer_origins"]
    assert layermap.layer_map_of(recipe, "up", frozenset(recipe.stages)) == recorded
    assert layermap.select(recorded, "peer") == PEER_LAYERS
    roles = [["original"], ["original", "peer"], ["original", "peer"], ["original"]]
    assert [e["roles"] for e in recorded] == roles
    assert all(e["peer_experts"] == BRANCH["experts"] for e in recorded if "peer" in e["roles"])


# --------------------------------------------------------------------------- training


def test_train_layers_peer_lowers_the_loss_and_moves_the_branch_only(grown):
    metrics = manifest(grown / "cpt")
    losses = [loss for _, loss in metrics["loss_curve"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    before, after = tensors(grown / "up"), tensors(grown / "cpt")
    assert before.keys() == after.keys()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(".mlp.peer." in name for name in moved), sorted(moved)
    for layer in PEER_LAYERS:  # v left 0, and with it the branch's output
        assert f"model.layers.{layer}.mlp.peer.up" in moved
    trained = metrics["trained"]
    assert trained["layers"] == PEER_LAYERS and trained["within_layers"] == "mlp.peer"
    assert trained["embeddings"] is False and trained["lm_head"] is False


def test_training_records_expert_usage(grown):
    usage = manifest(grown / "cpt")["expert_usage"]
    assert usage["layers"] == PEER_LAYERS and usage["experts"] == BRANCH["experts"]
    per_token = BRANCH["heads"] * BRANCH["top_k"]
    tokens = TRAINER["max_steps"] * TRAINER["per_device_train_batch_size"] * TRAINER["max_length"]
    assert usage["train"]["retrievals"] == [tokens * per_token] * 2  # packed: every slot a token
    # eval: the final pass over the 12 held-out problems, h k retrievals a token
    assert all(
        0 < n < tokens * per_token and n % per_token == 0 for n in usage["eval"]["retrievals"]
    )
    for mode in ("train", "eval"):
        found = usage[mode]
        assert all(0 < used <= 1 for used in found["used"])
        assert all(0 < ratio <= 1 for ratio in found["entropy_ratio"])
        for entropy, ratio in zip(found["entropy"], found["entropy_ratio"], strict=True):
            assert math.isclose(entropy / math.log(BRANCH["experts"]), ratio, abs_tol=1e-3)
    # sft trains the whole model (the branches too), dpo the branches: both count retrievals
    assert manifest(grown / "sft")["expert_usage"]["train"]["retrievals"][0] > 0
    assert manifest(grown / "dpo")["expert_usage"]["train"]["retrievals"][0] > 0
    before, after = tensors(grown / "up"), tensors(grown / "dpo")
    assert all(".mlp.peer." in n for n in before if not torch.equal(before[n], after[n]))


def test_the_eval_stage_scores_a_peer_model(grown):
    rows = json.loads((grown / "eval" / "results.json").read_text())["rows"]
    assert [row["model"] for row in rows] == ["up", "cpt"]
    assert all(math.isfinite(row["loss"]) for row in rows)


# --------------------------------------------------------------------------- anywhere


LOAD_ELSEWHERE = """
import json, sys

class NoUpstack:
    def find_spec(self, name, path=None, target=None):
        if name == "upstack" or name.startswith("upstack."):
            raise ImportError("upstack must not be imported here")

sys.meta_path.insert(0, NoUpstack())
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__,
                  "logits": logits.tolist(),
                  "upstack": sorted(m for m in sys.modules if m.split(".")[0] == "upstack")}))
"""


def test_the_trained_model_loads_where_upstack_is_not(grown, tmp_path):
    """transformers' remote code: the modeling file beside the weights, named by auto_map; the
    child's environment has no path to this checkout and blocks any import of upstack."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(LOAD_ELSEWHERE),
            str(grown / "cpt"),
            json.dumps(IDS.tolist()),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["class"].startswith("transformers_modules.") and found["upstack"] == []
    with torch.no_grad():
        here = load(grown / "cpt")(IDS).logits
    assert torch.allclose(torch.tensor(found["logits"]), here, atol=1e-5)
    # and the trained branch does change what the model computes
    with torch.no_grad():
        assert (here - load(grown / "up")(IDS).logits).abs().max() > 1e-3


# --------------------------------------------------------------------------- the layer


def dense_peer(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same N experts computed without product keys: every expert's score (the sum of its two
    sub-key scores), the top k of all N per head, every neuron of the N evaluated."""
    import torch.nn.functional as F

    queries = layer.query(x)
    if layer.query_norm is not None:
        queries = layer.query_norm(queries)
    half = layer.key_dim // 2
    q = queries.view(x.shape[0], layer.heads, 2, half)
    first = q[:, :, 0] @ layer.sub_keys[0].T  # t, h, sqrt(N)
    second = q[:, :, 1] @ layer.sub_keys[1].T
    every = (first[..., :, None] + second[..., None, :]).flatten(2)  # t, h, N: expert i*n + j
    top, experts = every.topk(layer.top_k, dim=-1)
    weights = top.softmax(-1) if layer.score == "softmax" else F.relu(top)
    act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[layer.activation]
    neurons = act(x @ layer.down.T)  # t, N: all N neurons
    chosen = neurons.gather(1, experts.flatten(1)).view_as(weights)
    rows = layer.up[experts]  # t, h, k, d
    return torch.einsum("thk,thkd->td", chosen * weights, rows), experts


@pytest.mark.parametrize(
    "settings",
    [
        {"score": "softmax", "activation": "gelu", "query_norm": False},
        {"score": "relu", "activation": "silu", "query_norm": True},
    ],
)
def test_the_layer_is_the_exact_top_k_of_a_dense_computation(settings):
    from upstack.models.modeling_peer import PEER

    torch.manual_seed(0)
    branch = {"experts": 64, "heads": 3, "top_k": 4, "key_dim": 8, "chunk_tokens": 5}
    layer = PEER(16, branch | settings).double().eval()
    with torch.no_grad():
        layer.up.normal_()
        if layer.query_norm is not None:  # running statistics away from (0, 1)
            layer.query_norm.running_mean.normal_()
            layer.query_norm.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 11, 16, dtype=torch.double)  # 22 tokens: five pieces of 5 and one of 2
    with torch.no_grad():
        got = layer(x)
        want, experts = dense_peer(layer, x.view(-1, 16))
        _, retrieved = layer.retrieve(layer._normed(layer.query(x.view(-1, 16))))
    assert torch.allclose(got.view(-1, 16), want, atol=1e-12)
    assert torch.equal(retrieved.sort(-1).values, experts.sort(-1).values)


def test_pieces_and_recomputation_give_the_gradient_of_one_pass():
    from upstack.models.modeling_peer import PEER

    torch.manual_seed(1)
    branch = {"experts": 64, "heads": 2, "top_k": 4, "key_dim": 8, "query_norm": False}
    grads = []
    for chunk in (1000, 3):  # one pass, or pieces of 3 tokens recomputed in the backward pass
        torch.manual_seed(1)
        layer = PEER(16, branch | {"chunk_tokens": chunk}).double().train()
        with torch.no_grad():
            layer.up.normal_()
        x = torch.randn(10, 16, dtype=torch.double, generator=torch.Generator().manual_seed(2))
        layer(x).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-12), name


def test_the_layer_agrees_with_peer_pytorch_on_the_same_weights():
    """lucidrains' peer-pytorch (a dev dependency): softmax over each head's top k, no query norm;
    its sub-keys are per head, so each head gets the one pool's keys (the paper shares them)."""
    reference = pytest.importorskip("PEER_pytorch")
    from upstack.models.modeling_peer import PEER

    torch.manual_seed(0)
    d, experts, heads, k, key_dim = 32, 256, 4, 4, 16
    settings = {"experts": experts, "heads": heads, "top_k": k, "key_dim": key_dim}
    mine = PEER(d, settings | {"query_norm": False, "chunk_tokens": 7}).double().eval()
    theirs = reference.PEER(
        d, heads=heads, num_experts=experts, num_experts_per_head=k, dim_key=key_dim // 2,
        non_competing_scores=False,
    ).double().eval()  # fmt: skip
    with torch.no_grad():
        mine.up.normal_()
        theirs.weight_down_embed.weight.copy_(mine.down)
        theirs.weight_up_embed.weight.copy_(mine.up)
        # their query rows are (half, head, dim), ours (head, half, dim)
        rows = mine.query.weight.view(heads, 2, key_dim // 2, d).transpose(0, 1).reshape(-1, d)
        theirs.to_queries[0].weight.copy_(rows)
        theirs.keys.copy_(mine.sub_keys.transpose(0, 1).expand(heads, -1, -1, -1))
    x = torch.randn(3, 11, d, dtype=torch.double)
    with torch.no_grad():
        assert torch.allclose(mine(x), theirs(x), atol=1e-12)


def test_the_class_names_upstack_reads_are_the_modeling_files():
    from upstack.models import modeling_peer, peer

    assert {
        base: (config.__name__, model.__name__)
        for base, (config, model) in modeling_peer.FAMILIES.items()
    } == peer.FAMILIES
    for base, (config, _) in modeling_peer.FAMILIES.items():
        assert config.model_type == peer.model_type(base)
