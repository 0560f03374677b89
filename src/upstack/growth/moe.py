"""Growth by sparse upcycling: every layer's FFN becomes `experts` FFNs and a router, a mixture
written by mergekit-moe from the base's own FFNs (copies) or other models' of its shape: a
Mixtral from a Llama or Mistral, a Qwen3-MoE from a Qwen3."""

from __future__ import annotations

import json
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from upstack.core.settings import Strict, error_at, names
from upstack.growth.base import (
    GrowthSpec,
    Source,
    check_sources_at_load,
    config_dtype,
    local_dir,
    mergekit_path,
    model_refs,
    planned_layers,
    read_source,
    read_sources,
)
from upstack.models.checkpoints import count_parameters, fix_dtype, parse_size, update_config

if TYPE_CHECKING:
    from upstack.core.context import StageContext

# mergekit-moe's gate initialisations that upstack offers: `random` needs nothing; the others
# route by each expert's prompts. (mergekit's `uniform_random` is left out: its config check
# wants prompts for it although it never reads them.)
PROMPT_GATES = ("hidden", "cheap_embed")
MOE_CONFIG = "mergekit_moe_config.yml"


@dataclass(frozen=True)
class Output:
    """A mixture mergekit-moe writes, and what the upcycled model's config.json says it is."""

    architecture: str  # mergekit-moe's `architecture:` (its output's name starts so)
    model_class: str  # `architectures` of the written config
    model_type: str


MIXTRAL = Output("mixtral", "MixtralForCausalLM", "mixtral")
# The base's model_type -> the mixture mergekit-moe writes from it with upcycled copies that
# compute what the base computes: both renormalise the top-k routing weights to 1 (Mixtral
# always, Qwen3-MoE with norm_topk_prob, which mergekit-moe sets). Not offered: Qwen2 ->
# Qwen2-MoE, which mergekit-moe writes only with a shared expert added to the routed ones, and
# DeepSeek-MoE, which mergekit-moe never picks over Mixtral for a Llama or Mistral.
OUTPUTS: dict[str, Output] = {
    "llama": MIXTRAL,
    "mistral": MIXTRAL,
    "qwen3": Output("qwen3", "Qwen3MoeForCausalLM", "qwen3_moe"),
}
# config.json keys that say what the output is; every other key of the base's keeps its value
OUTPUT_KEYS = ("architectures", "model_type", "dtype", "torch_dtype", "transformers_version")


class Expert(Strict):
    """One expert of a `moe` stage: the FFN of every layer of `model` (mergekit-moe's Expert)."""

    model: str | None = Field(
        None,
        description="a stage, local dir or Hub id of the base's architecture and shape; "
        "default: the stage's `model` (sparse upcycling)",
        json_schema_extra=names("model"),
    )
    positive_prompts: list[str] | None = Field(
        None, description="hidden/cheap_embed gates: text this expert should be routed"
    )
    negative_prompts: list[str] | None = Field(
        None, description="hidden/cheap_embed gates: text it should not be routed"
    )
    noise_scale: float | None = Field(
        None,
        ge=0,
        description="Gaussian noise of this std added to the expert's weights (seeded by the "
        "recipe's seed), so upcycled copies start apart",
    )


class Moe(GrowthSpec):
    """Every layer's FFN becomes `experts` FFNs and a router (mergekit-moe: a Mixtral from a Llama
    or Mistral, a Qwen3-MoE from a Qwen3)."""

    method: Literal["moe"] = "moe"
    experts: int | list[Expert] | None = Field(
        None,
        description="moe: a count (copies of the base's FFNs: sparse upcycling) or the experts, "
        "each {model, positive_prompts, negative_prompts, noise_scale}",
    )
    gate_mode: Literal["random", "cheap_embed", "hidden"] | None = Field(
        None,
        description="moe: router init; random (default), cheap_embed (mean token embedding of "
        "each expert's prompts) or hidden (the base's hidden states on them, per layer)",
    )
    experts_per_token: int | None = Field(
        None, description="moe: experts each token is routed to (Mixtral's top-k; default 2)"
    )
    router_aux_loss_coef: float | None = Field(
        None,
        ge=0,
        description="moe: weight of the load-balancing loss written into the output config "
        "(TRL adds it in cpt/sft/dpo; default: the output's transformers default, 0.001)",
    )

    # gate_mode and experts_per_token stay None when not written, as the stage hash takes them;
    # these give what is used
    @property
    def gate(self) -> str:
        return self.gate_mode or "random"

    @property
    def top_k(self) -> int:
        return 2 if self.experts_per_token is None else self.experts_per_token

    @property
    def expert_list(self) -> list[Expert]:
        """The experts, a count written out as that many copies of the base's FFNs."""
        if isinstance(self.experts, int):
            return [Expert() for _ in range(self.experts)]
        return list(self.experts or [])

    @model_validator(mode="after")
    def _mixture(self) -> Moe:
        """What mergekit-moe would refuse (it logs and exits) or silently get wrong, at load."""
        if self.experts is None:
            raise ValueError(
                "method moe needs experts: a count (copies of the base's FFNs) or a list"
            )
        experts = self.expert_list
        count = len(experts)
        if count < 2:
            raise error_at(("experts",), f"a mixture needs at least 2 experts, got {count}")
        if not 1 <= self.top_k <= count:
            raise error_at(
                ("experts_per_token",),
                f"must be between 1 and the {count} experts, got {self.top_k}",
            )
        gate = self.gate
        if gate not in PROMPT_GATES:
            for i, expert in enumerate(experts):
                for key in ("positive_prompts", "negative_prompts"):
                    if getattr(expert, key):
                        raise error_at(
                            ("experts", i, key),
                            f"gate_mode {gate} does not read prompts: set gate_mode hidden or "
                            "cheap_embed to route by them",
                        )
            return self
        if isinstance(self.experts, int):
            raise error_at(
                ("gate_mode",),
                f"gate_mode {gate} routes by each expert's positive_prompts: list the experts "
                "(experts: [{positive_prompts: [...]}, ...]) or use gate_mode random",
            )
        for i, expert in enumerate(experts):
            if not expert.positive_prompts:
                raise error_at(
                    ("experts", i),
                    f"gate_mode {gate} needs positive_prompts for every expert: text to route to it",
                )
        # the gate of an expert is read from its prompts: the same prompts make the same gates,
        # and a router that cannot tell the experts apart (mergekit-moe refuses it too)
        first = _prompts(experts[0])
        if all(_prompts(e) == first for e in experts[1:]):
            raise error_at(
                ("experts", count - 1, "positive_prompts"),
                "every expert has the same prompts, so every gate would be the same: give each "
                "expert prompts of what it should be routed",
            )
        return self


# the family's methods, as upstack.growth registers them
SETTINGS: dict[str, type[GrowthSpec]] = {"moe": Moe}


def _prompts(expert: Expert) -> tuple:
    return (tuple(expert.positive_prompts or ()), tuple(expert.negative_prompts or ()))


def _expert_key(spec: Moe, i: int) -> str:
    """The reference key of expert i's model: its own, or the stage's (an upcycled copy)."""
    return f"experts.{i}.model" if spec.expert_list[i].model is not None else "model"


# --------------------------------------------------------------------------- the family's hooks


def card_tags(spec: Moe) -> list[str]:
    return ["moe"]


def preflight(spec: Moe, ctx: StageContext) -> None:
    """Every local source is a readable checkpoint of a base mergekit-moe upcycles, the experts of
    the base's shape; sources this run builds first are checked on the shapes the recipe gives."""
    from upstack.models.shapes import planned_shape

    shapes: dict[str, dict | None] = {}
    for ref in model_refs(ctx):
        if ref.origin == "hub":
            shapes[ref.key] = None  # checked when the stage starts: a dry run stays offline
        elif ctx.is_pending(ref):
            shapes[ref.key] = planned_shape(ctx.recipe, ref, ctx.pending)
        else:
            source = read_source(ref, ctx)
            problem = _source_problem(source)
            if problem:
                raise ctx.fail(ref.key, problem)
            shapes[ref.key] = _source_shape(source)
    problem = mixture_problem(spec, shapes, lambda key: ctx.ref(key).text)
    if problem:
        raise ctx.fail(*problem)


def output_shape(spec: Moe, input_shape) -> dict | None:
    """The mixture mergekit-moe writes from the base (a Mixtral, a Qwen3-MoE) with the base's
    sizes and `experts` experts per layer (transformers 5 writes both counts as
    num_local_experts: Qwen3-MoE's num_experts is its alias)."""
    base = input_shape("model")
    output = OUTPUTS.get((base or {}).get("model_type"))
    if output is None:  # not known offline, or a base check_at_load refuses
        return None
    return {
        **base,
        "architectures": [output.model_class],
        "model_type": output.model_type,
        "num_local_experts": len(spec.expert_list),
        "num_experts_per_tok": spec.top_k,
    }


def planned_layer_map(spec: Moe, ctx: StageContext) -> list[dict] | None:
    """The layer map the stage will record; None when a source's layer count is not known
    offline (a Hub source)."""
    layers = planned_layers(ctx)
    return None if layers is None else mixture_layer_map(spec, layers["model"], ctx)


def check_at_load(spec: Moe, recipe, name: str) -> None:
    """Every source is a model mergekit can read, the base one mergekit-moe upcycles (OUTPUTS)
    and every expert of its architecture and shape (their config.json, or what the recipe says a
    stage will build)."""
    from upstack.models.shapes import planned_shape

    check_sources_at_load(recipe, name)
    refs = {ref.key: ref for ref in recipe.refs(name) if ref.thing == "model"}
    every = frozenset(recipe.stages)  # the shapes the recipe gives its stages
    shapes = {key: planned_shape(recipe, ref, every) for key, ref in refs.items()}
    problem = mixture_problem(spec, shapes, lambda key: refs[key].text)
    if problem:
        key, message = problem
        raise recipe.error(("stages", name, *key.split(".")), message)


def run(spec: Moe, ctx: StageContext) -> dict:
    import torch
    import yaml
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build
    from transformers import AutoTokenizer, GenerationConfig

    sources = read_sources(ctx)
    for key, source in sources.items():
        problem = _source_problem(source)
        if problem:
            raise ctx.fail(key, problem)
    shapes = {key: _source_shape(source) for key, source in sources.items()}
    problem = mixture_problem(spec, shapes, lambda key: ctx.ref(key).text)
    if problem:
        raise ctx.fail(*problem)
    base = sources["model"]
    output = OUTPUTS[base.config.model_type]
    dtype = spec.dtype or config_dtype(base.config)
    config = mergekit_moe_config(spec, sources, output, dtype)
    # Beside the weights, so a user can see the mixture and rerun it with `mergekit-moe`.
    (ctx.out_dir / MOE_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    count = len(spec.expert_list)
    ctx.log(
        f"moe: {base.layers} layers, FFN -> {count} experts (top {spec.top_k}), gate "
        f"{spec.gate}: {output.model_class}"
    )
    options = MergeOptions(
        # upcycling reads one tensor for several experts; each must be its own tensor
        clone_tensors=True,
        copy_tokenizer=False,  # mergekit-moe saves it with pad = bos and left padding: ours below
        out_shard_size=parse_size(spec.shard_size),
        trust_remote_code=ctx.recipe.trust_remote_code,
        write_model_card=False,
        lazy_unpickle=False,
    )
    torch.manual_seed(ctx.seed)  # random gates and expert noise come from torch's global generator
    try:
        build(
            MoEMergeConfig.model_validate(config),
            str(ctx.out_dir),
            options,
            # the hidden gate runs the base over the prompts; mergekit's "auto" is for GPUs
            device="cuda" if torch.cuda.is_available() else "cpu",
            # upcycling repeats one model on purpose: the experts part in training
            allow_all_same=True,
        )
    except SystemExit:  # mergekit-moe logs why and exits; the checks above should have caught it
        raise ctx.fail("", "mergekit-moe refused the config (its log above says why)") from None
    AutoTokenizer.from_pretrained(
        base.path, trust_remote_code=ctx.recipe.trust_remote_code
    ).save_pretrained(ctx.out_dir)
    with suppress(OSError):  # a base without a generation config
        GenerationConfig.from_pretrained(base.path).save_pretrained(ctx.out_dir)
    # mergekit-moe builds the output's config from the base's and drops what it does not carry
    # over (a Mistral's sliding_window becomes null: attention then sees the whole context, and
    # the upcycled model no longer computes what the base computed): every field of the base's
    # config.json keeps its value, whatever mergekit-moe made of it
    restored = base_settings(local_dir(base.path), ctx.out_dir)
    if restored:
        ctx.log(f"kept the base's {', '.join(sorted(restored))} (mergekit-moe changed them)")
    # inference needs no router logits; TRL turns them on for the load-balancing loss
    settings: dict[str, Any] = {**restored, "output_router_logits": False}
    if spec.router_aux_loss_coef is not None:
        settings["router_aux_loss_coef"] = spec.router_aux_loss_coef
    update_config(ctx.out_dir, settings)
    fix_dtype(ctx.out_dir, dtype)

    written = json.loads((ctx.out_dir / "config.json").read_text())
    return {
        "method": "moe",
        "architecture": output.model_class,
        "config_restored": sorted(restored),
        "layers_before": base.layers,
        "layers_after": base.layers,
        "parameters_before": count_parameters(local_dir(base.path)),
        "parameters_after": count_parameters(ctx.out_dir),
        "dtype": dtype,
        "experts": count,
        "experts_per_token": spec.top_k,
        "gate_mode": spec.gate,
        "router_aux_loss_coef": written.get("router_aux_loss_coef"),
        "expert_sources": [ctx.ref(_expert_key(spec, i)).text for i in range(count)],
        "layer_map": list(range(base.layers)),
        "layer_origins": mixture_layer_map(spec, base.layers, ctx),
    }


# --------------------------------------------------------------------------- the mixture


def mixture_problem(spec: Moe, shapes: dict[str, dict | None], text) -> tuple[str, str] | None:
    """(key, message) when mergekit-moe cannot build this mixture from these shapes (by reference
    key; None where a shape is not known offline): the base must be one it upcycles (OUTPUTS),
    every expert of its architecture and sizes, since expert i of layer j is its model's FFN of
    layer j."""
    from upstack.models.shapes import differences

    base = shapes.get("model")
    if not base:
        return None
    base_arch = _arch_name(base)
    if base.get("model_type") and base["model_type"] not in OUTPUTS:
        return "model", (
            "method moe upcycles a Llama or Mistral (into a Mixtral) or a Qwen3 (into a "
            f"Qwen3-MoE), the mixtures mergekit-moe writes; {text('model')} is {base_arch}"
        )
    for i in range(len(spec.expert_list)):
        key = _expert_key(spec, i)
        shape = shapes.get(key)
        if key == "model" or not shape:
            continue
        if shape.get("model_type") and shape["model_type"] != base.get("model_type"):
            return key, (
                f"{text(key)} is {_arch_name(shape)}, the base {text('model')} {base_arch}: "
                "an expert takes the base's layers, so it must be of its architecture"
            )
        found = differences(base, shape)
        if found:
            return key, (
                f"{text(key)} does not have the shape of the base {text('model')} "
                f"({'; '.join(found)})"
            )
    return None


def _arch_name(shape: dict) -> str:
    return (shape.get("architectures") or [None])[0] or shape.get("model_type") or "unknown"


def _source_shape(source: Source) -> dict:
    from upstack.models.shapes import ARCHITECTURE_KEYS, SHAPE_KEYS

    return {key: getattr(source.config, key, None) for key in (*SHAPE_KEYS, *ARCHITECTURE_KEYS)}


def _source_problem(source: Source) -> str | None:
    """mergekit-moe copies the tensors of a bias-free Llama, Mistral or Qwen3 only: biases would
    be dropped silently."""
    biased = [key for key in ("attention_bias", "mlp_bias") if getattr(source.config, key, False)]
    if biased:
        return (
            f"{source.config.architectures[0]} with {' and '.join(biased)}: mergekit-moe copies "
            "no biases, so the mixture would lose them"
        )
    return None


def base_settings(base_dir: str, out_dir: Path) -> dict[str, Any]:
    """The fields of the base's config.json that the written config lost or changed (every key
    but those that say what the output is), to be set back."""
    base = json.loads(Path(base_dir, "config.json").read_text())
    written = json.loads(Path(out_dir, "config.json").read_text())
    missing = object()
    return {
        key: value
        for key, value in base.items()
        if key not in OUTPUT_KEYS and written.get(key, missing) != value
    }


def mixture_layer_map(spec: Moe, n: int, ctx: StageContext) -> list[dict]:
    """Every layer of the mixture is the base's layer (attention, norms) with experts in place of
    its FFN: role `expert`, and `experts`, expert e's source (its FFN of the same layer)."""
    from upstack.models import layermap

    base = ctx.ref("model").text
    experts = [ctx.ref(_expert_key(spec, i)).text for i in range(len(spec.expert_list))]
    entries = layermap.build([(base, j) for j in range(n)], roles={j: ["expert"] for j in range(n)})
    for entry in entries:
        entry["experts"] = list(experts)
    return entries


def mergekit_moe_config(
    spec: Moe, sources: dict[str, Source], output: Output, dtype: str | None
) -> dict:
    """mergekit-moe's config (MoEMergeConfig), absolute paths so `mergekit-moe` reruns it here."""
    experts = []
    for i, expert in enumerate(spec.expert_list):
        entry: dict[str, Any] = {"source_model": mergekit_path(sources[_expert_key(spec, i)])}
        for key in ("positive_prompts", "negative_prompts", "noise_scale"):
            if getattr(expert, key) is not None:
                entry[key] = getattr(expert, key)
        experts.append(entry)
    config: dict[str, Any] = {
        "base_model": mergekit_path(sources["model"]),
        "architecture": output.architecture,
        "gate_mode": spec.gate,
        "experts_per_token": spec.top_k,
        "experts": experts,
    }
    if dtype:
        config["dtype"] = dtype
    return config
