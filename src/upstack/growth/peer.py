"""Growth by PEER (He 2024, "Mixture of A Million Experts"): a branch of N single-neuron experts,
retrieved by product keys, beside the FFN of chosen layers. The branch reads what the FFN reads
and adds to its output; its up table starts at zero, so the grown model computes exactly what the
base computed. Written here tensor by tensor (the base's shards as they are, the PEER tables in
shards of their own), not by mergekit, which has no PEER layer; the model classes are
upstack.models.modeling_peer, copied beside the weights."""

from __future__ import annotations

import json
import math
import shutil
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from upstack.core.settings import added, error_at
from upstack.growth.base import GrowthSpec, local_dir, planned_layers
from upstack.models import peer
from upstack.models.checkpoints import count_parameters, parse_size

if TYPE_CHECKING:
    from upstack.core.context import StageContext

INDEX = "model.safetensors.index.json"
# the paper's settings (N = 1024^2, h = 8, k = 16, query dimension 128, batch-normed queries)
DEFAULTS = {"heads": 8, "top_k": 16, "key_dim": 128}


class Peer(GrowthSpec):
    """A PEER branch beside the FFN of `layers`: `experts` single-neuron experts, `heads` queries
    per token each retrieving `top_k` of them by product keys."""

    method: Literal["peer"] = "peer"
    experts: int | None = Field(
        None,
        description="peer: N, the experts of each PEER layer; a perfect square (two sets of "
        "sqrt(N) sub-keys; the paper: 1024^2)",
        json_schema_extra=added(),
    )
    layers: list[int] | Literal["middle", "all"] = Field(
        "middle",
        description="peer: the layers whose FFN gets a PEER branch: indices, `middle` (layer "
        "n // 2) or `all`",
        json_schema_extra=added(),
    )
    heads: int = Field(
        DEFAULTS["heads"],
        ge=1,
        description="peer: query heads per token (h), each retrieving top_k experts of one pool",
        json_schema_extra=added(),
    )
    top_k: int = Field(
        DEFAULTS["top_k"],
        ge=1,
        description="peer: experts each head retrieves (k; also the top k of each half's sub-keys)",
        json_schema_extra=added(),
    )
    key_dim: int = Field(
        DEFAULTS["key_dim"],
        ge=2,
        description="peer: a head's query dimension, split in two halves of key_dim/2",
        json_schema_extra=added(),
    )
    query_norm: bool = Field(
        True,
        description="peer: batch norm of the queries (the paper's: more experts are retrieved)",
        json_schema_extra=added(),
    )
    activation: Literal["gelu", "relu", "silu"] = Field(
        "gelu", description="peer: an expert neuron's nonlinearity", json_schema_extra=added()
    )
    score: Literal["softmax", "relu"] = Field(
        "softmax",
        description="peer: how a head weighs its top_k experts' outputs (softmax over the k, or "
        "relu of each score)",
        json_schema_extra=added(),
    )

    @model_validator(mode="after")
    def _retrieval(self) -> Peer:
        """What product-key retrieval cannot do, at load."""
        if self.experts is None:
            raise ValueError(
                "method peer needs experts: a perfect square, N = n^2 (the paper's 1024^2 = 1048576)"
            )
        problem = peer.expert_count_problem(self.experts)
        if problem:
            raise error_at(("experts",), problem)
        root = math.isqrt(self.experts)
        if self.top_k > root:
            raise error_at(
                ("top_k",),
                f"{self.top_k} is more than the {root} sub-keys of each half (sqrt of "
                f"{self.experts} experts): the top k of each half must exist",
            )
        if self.key_dim % 2:
            raise error_at(
                ("key_dim",), f"must be even (two halves of key_dim/2), got {self.key_dim}"
            )
        if isinstance(self.layers, list):
            if not self.layers:
                raise error_at(("layers",), "names no layer: give indices, middle or all")
            for i, index in enumerate(self.layers):
                if index < 0:
                    raise error_at(("layers", i), f"a layer index is 0 or more, got {index}")
                if index in self.layers[:i]:
                    raise error_at(("layers", i), f"layer {index} is named twice")
        return self

    def layer_indices(self, n: int) -> list[int]:
        """The layers that get a branch, in a model of n layers."""
        if self.layers == "all":
            return list(range(n))
        if self.layers == "middle":
            return [n // 2]
        return sorted(self.layers)

    def branch(self, n: int) -> dict[str, Any]:
        """config.json's `peer` block: what modeling_peer builds."""
        return {
            "experts": self.experts,
            "heads": self.heads,
            "top_k": self.top_k,
            "key_dim": self.key_dim,
            "query_norm": self.query_norm,
            "activation": self.activation,
            "score": self.score,
            "layers": self.layer_indices(n),
        }


# the family's methods, as upstack.growth registers them
SETTINGS: dict[str, type[GrowthSpec]] = {"peer": Peer}


# --------------------------------------------------------------------------- the family's hooks


def card_tags(spec: Peer) -> list[str]:
    return ["peer"]


def preflight(spec: Peer, ctx: StageContext) -> None:
    """The base is a checkpoint of a family that takes a branch and has the layers named; a base
    this run builds first is checked on the shape the recipe gives it, a Hub base when the stage
    starts (a dry run stays offline)."""
    from upstack.models.checkpoints import check_model

    ref = ctx.ref("model")
    if ref.origin == "hub":
        return
    check_model(ctx, "model")
    problem = base_problem(spec, base_config(ctx.recipe, ref, ctx.pending), ref.text)
    if problem:
        raise ctx.fail(*problem)


def output_shape(spec: Peer, input_shape) -> dict | None:
    """The base's shape, of the PEER model type of its family."""
    base = input_shape("model")
    classes = peer.FAMILIES.get((base or {}).get("model_type"))
    if classes is None:  # not known offline, or a base check_at_load refuses
        return None
    shape = {
        **base,
        "architectures": [classes[1]],
        "model_type": peer.model_type(base["model_type"]),
    }
    if base.get("num_hidden_layers") is not None:  # the branch as config.json will have it
        shape["peer"] = spec.branch(base["num_hidden_layers"])
    return shape


def planned_layer_map(spec: Peer, ctx: StageContext) -> list[dict] | None:
    layers = planned_layers(ctx)
    return None if layers is None else peer_layer_map(spec, layers["model"], ctx.ref("model").text)


def check_at_load(spec: Peer, recipe, name: str) -> None:
    """The base (its config.json, or the shape the recipe gives a stage) is of a family that takes
    a branch, not a PEER model already, and has the layers `layers` names."""
    ref = next(r for r in recipe.refs(name) if r.key == "model")
    problem = base_problem(spec, base_config(recipe, ref, frozenset(recipe.stages)), ref.text)
    if problem:
        key, message = problem
        raise recipe.error(("stages", name, *key.split(".")), message)


def run(spec: Peer, ctx: StageContext) -> dict:
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    ref = ctx.ref("model")
    base_dir = Path(local_dir(ref.location))
    from upstack.models.checkpoints import model_dir_problem

    problem = model_dir_problem(base_dir, ctx.recipe.allow_pickle)
    if problem:
        raise ctx.fail("model", problem)
    config = json.loads((base_dir / "config.json").read_text())
    problem = base_problem(spec, config, ref.text)
    if problem:
        raise ctx.fail(*problem)
    if not list(base_dir.glob("*.safetensors")):
        raise ctx.fail("model", f"{ref.text} has pickled weights only: PEER grows safetensors")
    n = config["num_hidden_layers"]
    settings = spec.branch(n)
    dtype = spec.dtype or config_dtype_of(config)
    family = config["model_type"]
    config_class, model_class = peer.FAMILIES[family]
    ctx.log(
        f"peer: layers {settings['layers']} of {n} get {spec.experts} experts "
        f"({spec.heads} heads x top {spec.top_k}, key_dim {spec.key_dim}): "
        f"{model_class}"
    )
    torch.manual_seed(ctx.seed)  # the sub-keys, queries and down table are random draws
    files = _write_weights(
        base_dir, ctx.out_dir, settings, config["hidden_size"], dtype, parse_size(spec.shard_size)
    )
    ctx.log(f"wrote {files} shards (the base's as they were, then the PEER tables)")
    written = {
        **{k: v for k, v in config.items() if k not in ("torch_dtype", "auto_map")},
        "architectures": [model_class],
        "model_type": peer.model_type(family),
        "peer": settings,
        "auto_map": {
            "AutoConfig": f"{peer.CODE.stem}.{config_class}",
            "AutoModelForCausalLM": f"{peer.CODE.stem}.{model_class}",
        },
    }
    if dtype:
        written["dtype"] = dtype
    (ctx.out_dir / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(peer.CODE, ctx.out_dir / peer.CODE_FILE)  # loads where upstack is not
    AutoTokenizer.from_pretrained(
        ref.location, trust_remote_code=ctx.recipe.trust_remote_code
    ).save_pretrained(ctx.out_dir)
    with suppress(OSError):  # a base without a generation config
        GenerationConfig.from_pretrained(ref.location).save_pretrained(ctx.out_dir)

    before, after = count_parameters(base_dir), count_parameters(ctx.out_dir)
    per_layer = peer.active_parameters(config["hidden_size"], settings)
    return {
        "method": "peer",
        "architecture": model_class,
        "layers_before": n,
        "layers_after": n,
        "peer_layers": settings["layers"],
        "experts": spec.experts,
        "heads": spec.heads,
        "top_k": spec.top_k,
        "key_dim": spec.key_dim,
        "query_norm": spec.query_norm,
        "activation": spec.activation,
        "score": spec.score,
        "parameters_before": before,
        "parameters_after": after,
        # per token and PEER layer: query + sub-key scores + the h k neurons (models.peer)
        "active_per_token_per_layer": per_layer,
        "dtype": dtype,
        "layer_map": list(range(n)),
        "layer_origins": peer_layer_map(spec, n, ref.text),
    }


# --------------------------------------------------------------------------- the branch


def base_config(recipe, ref, pending: frozenset[str]) -> dict | None:
    """The base's config.json (a local dir's, a cached Hub model's), or the shape the recipe
    gives a stage; None when neither is known offline."""
    from upstack.models.checkpoints import config_json
    from upstack.models.shapes import planned_shape

    if ref.origin == "stage":
        return planned_shape(recipe, ref, pending)
    return config_json(ref)


def base_problem(spec: Peer, config: dict | None, text: str) -> tuple[str, str] | None:
    """(key, message) when the base cannot take a PEER branch where `layers` says (None where
    its config is not known offline): a multimodal wrapper, a PEER model already, a family whose
    FFN modeling_peer does not extend (a mixture's experts among them), a layer past its last."""
    from upstack.models.checkpoints import wrapper_problem

    if not config:
        return None
    problem = wrapper_problem(config)
    if problem:
        return "model", problem
    kind = config.get("model_type")
    if peer.is_peer(config):
        return "model", (
            f"{text} has PEER layers already; grow the model it came from with all the layers "
            "wanted (layers: [...])"
        )
    if kind and kind not in peer.FAMILIES:
        name = (config.get("architectures") or [kind])[0]
        families = ", ".join(sorted(peer.FAMILIES))
        return "model", (
            f"{text} is {name}, whose FFN upstack's PEER model classes do not extend (a "
            f"mixture's experts take no branch): method peer takes {families}"
        )
    n = config.get("num_hidden_layers")
    if n is None:
        return None
    for i, index in enumerate(spec.layers if isinstance(spec.layers, list) else []):
        if index >= n:
            return (
                f"layers.{i}",
                f"layer {index} is out of range: {text} has {n} layers (0 to {n - 1})",
            )
    return None


def peer_layer_map(spec: Peer, n: int, base: str) -> list[dict]:
    """Every layer is the base's; those with a branch also have the role `peer` (what
    `train_layers: peer` trains: the branch only) and its expert count."""
    from upstack.models import layermap

    entries = layermap.build([(base, j) for j in range(n)])
    for index in spec.layer_indices(n):
        entries[index]["roles"].append("peer")
        entries[index]["peer_experts"] = spec.experts
    return entries


def config_dtype_of(config: dict) -> str | None:
    dtype = config.get("dtype") or config.get("torch_dtype")
    return str(dtype).removeprefix("torch.") if dtype else None


def _write_weights(
    base_dir: Path, out_dir: Path, settings: dict, hidden: int, dtype, shard_bytes: int
) -> int:
    """The base's shards (re-typed only when `dtype` differs), then the PEER tensors in shards of
    up to `shard_bytes` (a table larger than that alone in one), all named model-0000i-of-0000n
    with an index: the base's tensors are the grown model's as they were, and no more than one
    shard (or one layer's branch) is held in memory."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from upstack.models.modeling_peer import PEER

    target = getattr(torch, dtype) if dtype else None

    def typed(tensor):
        cast = target is not None and tensor.is_floating_point() and tensor.dtype != target
        return (tensor.to(target) if cast else tensor).detach().contiguous()

    # the branch's tensors and their sizes, from a layer on the meta device: the shard plan
    with torch.device("meta"):
        shapes = {key: typed(t) for key, t in PEER(hidden, settings).state_dict().items()}
    planned: list[list[tuple[int, str]]] = [[]]
    filled = 0
    for index in settings["layers"]:
        for key, tensor in shapes.items():
            nbytes = tensor.numel() * tensor.element_size()
            if planned[-1] and filled + nbytes > shard_bytes:
                planned.append([])
                filled = 0
            planned[-1].append((index, key))
            filled += nbytes
    shards = sorted(base_dir.glob("*.safetensors"))
    total = len(shards) + len(planned)
    names = [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
    weight_map: dict[str, str] = {}
    size = 0
    for shard, name in zip(shards, names, strict=False):
        with safe_open(shard, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        if target is not None and any(
            t.is_floating_point() and t.dtype != target for t in tensors.values()
        ):
            tensors = {key: typed(t) for key, t in tensors.items()}
            save_file(tensors, out_dir / name, metadata={"format": "pt"})
        else:
            shutil.copyfile(shard, out_dir / name)
        for key, tensor in tensors.items():
            weight_map[key] = name
            size += tensor.numel() * tensor.element_size()
        del tensors
    pending = iter(zip(planned, names[len(shards) :], strict=True))
    members, name = next(pending)
    held: dict[str, torch.Tensor] = {}
    for index in settings["layers"]:
        branch = {key: typed(t) for key, t in PEER(hidden, settings).state_dict().items()}
        for key, tensor in branch.items():
            full = f"model.layers.{index}.mlp.peer.{key}"
            held[full] = tensor
            weight_map[full] = name
            size += tensor.numel() * tensor.element_size()
            if len(held) == len(members):  # the shard is complete: written, then let go
                save_file(held, out_dir / name, metadata={"format": "pt"})
                held = {}
                members, name = next(pending, (None, None))
        del branch
    index_file = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX).write_text(json.dumps(index_file, indent=2) + "\n")
    return total
