"""upscale stage: a deeper model from a base by layer surgery (SOLAR's DUS, Gstack, LLaMA Pro), or a
wider one by sparse upcycling into a mixture of experts (Mixtral), done by mergekit."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from upstack.core.errors import UserError
from upstack.core.settings import StageSpec, Strict, error_at, names
from upstack.models.checkpoints import count_parameters, model_dir_problem

# The stage contract (upstack.core.contract)
OUTPUT = "model"  # a checkpoint
LAYER_MAP = "writes"  # it records where each output layer came from
LAUNCHABLE = False

if TYPE_CHECKING:
    from upstack.core.context import StageContext
    from upstack.core.refs import Reference

# The keys each method reads; a key of another method is an error, not silently ignored.
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "dus": ("drop_layers", "target_layers", "analysis"),
    "stack": ("copies",),
    "expand": ("new_layers",),
    "layers": ("slices",),
    "moe": ("experts", "gate_mode", "experts_per_token", "router_aux_loss_coef"),
}
# mergekit-moe's gate initialisations that upstack offers: `random` needs nothing; the others
# route by each expert's prompts. (mergekit's `uniform_random` is left out: its config check
# wants prompts for it although it never reads them.)
PROMPT_GATES = ("hidden", "cheap_embed")
# mergekit-moe writes a Mixtral from these model types only (mergekit.moe.mixtral.MixtralMoE)
MOE_BASES = ("llama", "mistral")
MOE_CONFIG = "mergekit_moe_config.yml"
# A LLaMA Pro block starts as the identity: with its attention and MLP output projections at
# zero, both residual branches add nothing, so the grown model computes what the base computes.
IDENTITY_SCALE = [
    {"filter": "o_proj", "value": 0.0},
    {"filter": "down_proj", "value": 0.0},
    {"value": 1.0},
]
# config.json lists with one entry per layer (sliding/full attention, NoPE layers).
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMG]?)B?$", re.IGNORECASE)


class Slice(Strict):
    """Output layers copied from one source: layers first..end-1 (mergekit's `layer_range`)."""

    model: str | None = Field(
        None,
        description="a stage, local dir or Hub id; default: the stage's `model`",
        json_schema_extra=names("model"),
    )
    layer_range: tuple[int, int] = Field(description="[first, end), end exclusive, as in mergekit")
    parameters: dict[str, Any] | None = Field(
        None,
        description="mergekit passthrough parameters for these layers, as mergekit takes them: "
        "scale, as a value, a gradient over the layers or a filter list "
        "([{filter: o_proj, value: 0.5}, {value: 1}])",
    )

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"needs 0 <= first < end, got [{value[0]}, {value[1]}]")
        return value


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


class Spec(StageSpec):
    kind: Literal["upscale"] = "upscale"
    model: str = Field(
        description="the model to grow: a stage of this recipe, a local dir or a Hub id",
        json_schema_extra=names("model"),
    )
    method: Literal["dus", "stack", "expand", "layers", "moe"] = "dus"
    # dus: keep [0, n-m) of one copy and [m, n) of another: s = 2(n-m) layers. SOLAR: n=32, m=8 → 48.
    drop_layers: int | None = Field(
        None,
        ge=0,
        description="dus: layers dropped at the seam of each copy (SOLAR's m); 0 = plain repetition",
    )
    target_layers: int | None = Field(
        None, ge=1, description="dus: layers wanted (SOLAR's s = 2(n-m)), instead of drop_layers"
    )
    # SOLAR duplicates (or, for m > n/2, drops) the middle block of k = |s - n| layers; an
    # analysis picks the block of that size that changes the hidden state least instead, so the
    # seam joins two states that are most alike (upstack.models.layer_analysis).
    analysis: str | None = Field(
        None,
        description="dus: an analyze stage; the block duplicated or dropped at the seam is the "
        "one its measurements find cheapest, not SOLAR's middle block",
        json_schema_extra=names("data", "stage", kinds=("analyze",)),
    )
    copies: int | None = Field(
        None,
        ge=2,
        description="stack: times the whole stack repeats (Gstack's g; the paper uses 4)",
    )
    new_layers: int | None = Field(
        None,
        ge=1,
        description="expand: identity blocks added, one per group of n/new_layers layers (LLaMA Pro: 8 on 32)",
    )
    slices: list[Slice] | None = Field(
        None, description="layers: output layers as mergekit slices, in order"
    )
    # moe: every layer's FFN becomes `experts` FFNs and a router (mergekit-moe, Mixtral output)
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
        "(TRL adds it in cpt/sft/dpo; default: transformers' Mixtral default, 0.001)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="default: the source's"
    )
    # mergekit holds a whole output shard in memory before writing it: 500MB keeps the stage's
    # allocated memory under 1 GiB whatever the model size (bench/upscale.py).
    shard_size: str = Field(
        "500MB", description="bytes per output shard (mergekit's out_shard_size)"
    )

    @field_validator(
        "drop_layers",
        "target_layers",
        "analysis",
        "copies",
        "new_layers",
        "slices",
        "experts",
        "gate_mode",
        "experts_per_token",
        "router_aux_loss_coef",
    )
    @classmethod
    def _belongs_to_method(cls, value: Any, info: ValidationInfo) -> Any:
        method = info.data.get("method")
        if value is not None and method and info.field_name not in METHOD_KEYS[method]:
            owner = next(m for m, keys in METHOD_KEYS.items() if info.field_name in keys)
            raise ValueError(f"only for method {owner}, not {method}")
        return value

    @field_validator("shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        if not SIZE.match(value.strip()):
            raise ValueError(f"expected a size like 2GB, 500MB or 1000000000, got {value!r}")
        return value

    @model_validator(mode="after")
    def _slice_parameters(self, info: ValidationInfo) -> Spec:
        """Checked by mergekit's own passthrough method, as a merge stage's parameters are."""
        if not (info.context or {}).get("deep", True) or not self.slices:
            return self  # `upstack status`/`report`: importing mergekit (peft, torch) costs ~8 s
        if not any(piece.parameters for piece in self.slices):
            return self
        from upstack.models import merging

        config = passthrough_config(self, lambda key: key)
        method, _ = merging.merge_method("passthrough")
        problem = merging.parameters_problem(config, method)
        if problem:
            raise error_at(*_slice_loc(problem))
        return self

    @model_validator(mode="after")
    def _method_settings(self) -> Spec:
        if self.method == "dus" and (self.drop_layers is None) == (self.target_layers is None):
            raise ValueError(
                "method dus needs exactly one of drop_layers (SOLAR's m) or target_layers (s)"
            )
        # with an analysis the seam goes anywhere, so any count is reachable
        if self.target_layers is not None and self.target_layers % 2 and self.analysis is None:
            raise error_at(
                ("target_layers",),
                "must be even: DUS joins two halves of n - drop_layers layers each "
                f"(got {self.target_layers}); any count is reachable with `analysis:`",
            )
        if self.method == "stack" and self.copies is None:
            raise ValueError("method stack needs copies (how many times the layer stack repeats)")
        if self.method == "expand" and self.new_layers is None:
            raise ValueError("method expand needs new_layers (identity blocks to add)")
        if self.method == "layers" and not self.slices:
            raise ValueError("method layers needs slices: [{layer_range: [first, end]}, ...]")
        if self.method == "moe":
            self._moe_settings()
        return self

    @property
    def expert_list(self) -> list[Expert]:
        """moe: the experts, a count written out as that many copies of the base's FFNs."""
        if isinstance(self.experts, int):
            return [Expert() for _ in range(self.experts)]
        return list(self.experts or [])

    def _moe_settings(self) -> None:
        """What mergekit-moe would refuse (it logs and exits) or silently get wrong, at load."""
        if self.experts is None:
            raise ValueError(
                "method moe needs experts: a count (copies of the base's FFNs) or a list"
            )
        count = len(self.expert_list)
        if count < 2:
            raise error_at(("experts",), f"a mixture needs at least 2 experts, got {count}")
        top_k = self.moe_top_k
        if not 1 <= top_k <= count:
            raise error_at(
                ("experts_per_token",),
                f"must be between 1 and the {count} experts, got {top_k}",
            )
        gate = self.moe_gate
        experts = self.expert_list
        if gate not in PROMPT_GATES:
            for i, expert in enumerate(experts):
                for key in ("positive_prompts", "negative_prompts"):
                    if getattr(expert, key):
                        raise error_at(
                            ("experts", i, key),
                            f"gate_mode {gate} does not read prompts: set gate_mode hidden or "
                            "cheap_embed to route by them",
                        )
            return
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

    @property
    def moe_gate(self) -> str:
        return self.gate_mode or "random"

    @property
    def moe_top_k(self) -> int:
        return 2 if self.experts_per_token is None else self.experts_per_token


def _prompts(expert: Expert) -> tuple:
    return (tuple(expert.positive_prompts or ()), tuple(expert.negative_prompts or ()))


@dataclass
class Source:
    """A model the stage reads, as found before any weight is touched."""

    path: str  # what mergekit and transformers read: a local dir or a Hub id
    config: Any  # transformers.PretrainedConfig
    layers: int  # n
    layer_tensors: list[str]  # tensor names of layer 0, as mergekit's architecture lists them


@dataclass
class Piece:
    """One mergekit slice of the output: source layers first..end-1, maybe as identity blocks."""

    key: str
    first: int
    end: int
    identity: bool = False
    parameters: dict | None = None  # the recipe's passthrough parameters for these layers


# --------------------------------------------------------------------------- checks


def card_tags(spec: Spec) -> list[str]:
    return ["moe", "mixtral"] if spec.method == "moe" else ["depth-upscaling"]


def preflight(spec: Spec, ctx: StageContext) -> None:
    """Raise the run-time UserErrors (layer counts, architecture, missing source) before the runner
    writes anything. A source this run builds first counts the layers the recipe gives it; a Hub
    source is checked when the stage starts, before any weight is fetched (a dry run stays offline)."""
    from upstack.models.shapes import planned_shape

    if spec.method == "moe":
        return _preflight_moe(spec, ctx)
    layers = {}
    for ref in _model_refs(ctx):
        if ref.origin == "hub":
            return
        if ctx.is_pending(ref):
            shape = planned_shape(ctx.recipe, ref, ctx.pending) or {}
            if shape.get("num_hidden_layers") is None:
                return
            layers[ref.key] = shape["num_hidden_layers"]
        else:
            source = _read_source(ref, ctx)
            _check_method_fits(spec, source, ctx)
            layers[ref.key] = source.layers
    start = seam_from_analysis(spec, layers["model"], ctx)
    pieces = plan_layers(spec, layers, ctx, start)
    if spec.analysis is not None:  # the plan shows where the seam goes, before anything runs
        ctx.log(_seam_note(spec, pieces, layers["model"], start))


def output_shape(spec: Spec, input_shape) -> dict | None:
    """The grown model's shape: its source's, with the layer count the method gives; for moe a
    Mixtral of the base's sizes with `experts` experts per layer."""
    if spec.method == "moe":
        base = input_shape("model")
        if base is None:
            return None
        return {
            **base,
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "num_local_experts": len(spec.expert_list),
            "num_experts_per_tok": spec.moe_top_k,
        }
    shapes = {"model": input_shape("model")}
    for i, piece in enumerate(spec.slices or []):
        if piece.model is not None:
            shapes[f"slices.{i}.model"] = input_shape(f"slices.{i}.model")
    if any(shape is None or shape.get("num_hidden_layers") is None for shape in shapes.values()):
        return None
    if spec.method == "layers":
        layers = sum(end - first for first, end in (s.layer_range for s in spec.slices))
    else:
        n = shapes["model"]["num_hidden_layers"]
        layers = {
            "dus": 2 * (n - (spec.drop_layers or 0))
            if spec.target_layers is None
            else spec.target_layers,
            "stack": n * (spec.copies or 1),
            "expand": n + (spec.new_layers or 0),
        }[spec.method]
    return {**shapes["model"], "num_hidden_layers": layers}


def planned_layer_map(spec: Spec, ctx: StageContext) -> list[dict] | None:
    """The layer map the stage will record, from the recipe and its sources' layer counts (read
    from config.json, or planned for a source this run builds); None when a count is not known
    offline (a Hub source) or the seam waits for an analysis this run makes first."""
    from upstack.models.shapes import planned_shape

    layers = {}
    for ref in _model_refs(ctx):
        shape = planned_shape(ctx.recipe, ref, ctx.pending) or {}
        if shape.get("num_hidden_layers") is None:
            return None
        layers[ref.key] = shape["num_hidden_layers"]
    if spec.method == "moe":
        return moe_layer_map(spec, layers["model"], ctx)
    if spec.analysis is not None and ctx.is_pending(ctx.ref("analysis")):
        return None
    pieces = plan_layers(spec, layers, ctx, seam_from_analysis(spec, layers["model"], ctx))
    return build_layer_map(pieces, ctx)


def build_layer_map(pieces: list[Piece], ctx: StageContext) -> list[dict]:
    """For every output layer: its source (as the recipe names it), source layer, copy and roles."""
    from upstack.models import layermap

    by_layer = [(piece, j) for piece in pieces for j in range(piece.first, piece.end)]
    origins = [(ctx.ref(piece.key).text, j) for piece, j in by_layer]
    return layermap.build(origins, new={i for i, (p, _) in enumerate(by_layer) if p.identity})


def seam_from_analysis(spec: Spec, n: int, ctx: StageContext) -> int | None:
    """dus with `analysis`: the first layer of the block to duplicate or drop at the seam, the
    cheapest of its size the analysis measured; None without an analysis or before it ran."""
    from upstack.models import layer_analysis

    if spec.analysis is None:
        return None
    ref = ctx.ref("analysis")
    if ctx.is_pending(ref):
        return None
    try:
        results = layer_analysis.read(ref.location)
    except (OSError, ValueError):
        raise ctx.fail(
            "analysis",
            f"stage '{ref.text}' has no finished analysis at {ref.location}: run it first",
        ) from None
    if results["layers"] != n:
        raise ctx.fail(
            "analysis",
            f"'{ref.text}' measured a model of {results['layers']} layers ({results['model']}), "
            f"this stage grows one of {n}",
        )
    size = abs(_dus_target(spec, n) - n)
    return next((b["start"] for b in results["blocks"] if b["size"] == size), 0)


def _seam_note(spec: Spec, pieces: list[Piece], n: int, start: int | None) -> str:
    target = sum(p.end - p.first for p in pieces)
    if start is None:
        return f"seam placed by '{spec.analysis}' once it has run ({n} -> {target} layers)"
    slices = " + ".join(f"[{p.first}, {p.end})" for p in pieces)
    return f"seam placed by '{spec.analysis}': {n} -> {target} layers as {slices}"


def _dus_target(spec: Spec, n: int) -> int:
    """s: the layers a dus stage gives from n."""
    return spec.target_layers if spec.target_layers is not None else 2 * (n - spec.drop_layers)


def _model_refs(ctx: StageContext) -> list[Reference]:
    return [ref for ref in ctx.refs() if ref.thing == "model"]


def read_sources(ctx: StageContext) -> dict[str, Source]:
    """Every model the stage reads, by key path, with its config and layer count."""
    return {ref.key: _read_source(ref, ctx) for ref in _model_refs(ctx)}


def _read_source(ref: Reference, ctx: StageContext) -> Source:
    import huggingface_hub
    from mergekit.architecture import arch_info_for_config
    from transformers import AutoConfig

    def fail(message: str) -> UserError:
        return ctx.fail(ref.key, message)

    if ref.origin == "hub":
        path = ref.location  # mergekit downloads it; now we read only the file list and the config
        try:
            files = huggingface_hub.list_repo_files(path)
        except Exception as err:  # offline, no such repo, gated: the user's to fix, all alike
            raise fail(f"cannot list {path} on the Hub: {str(err).splitlines()[0]}") from None
        if not any(name.endswith(".safetensors") for name in files):
            raise fail(
                f"{path} has no *.safetensors weights on the Hub (upstack never loads pickled checkpoints)"
            )
    else:
        path = Path(ref.location)
        if ref.origin == "stage" and not (path / "config.json").is_file():
            raise fail(f"stage '{ref.text}' has no finished model at {path}: run it first")
        # pickled weights only if the recipe allows them (mergekit can read them then)
        problem = model_dir_problem(path, ctx.recipe.allow_pickle)
        if problem:
            raise fail(problem)
    try:
        config = AutoConfig.from_pretrained(
            str(path), trust_remote_code=ctx.recipe.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise fail(
            f"cannot read the model config of {ref.text}: {str(err).splitlines()[0]}"
        ) from None

    if not config.architectures:
        raise fail(
            f"{ref.text}: config.json names no `architectures`, so mergekit cannot map its weights"
        )
    arch = arch_info_for_config(config)
    if arch is None:
        raise fail(
            f"mergekit has no architecture definition for {config.architectures[0]} "
            "(see mergekit/_data/architectures)"
        )
    if list(arch.modules) != ["default"]:
        raise fail(
            f"{config.architectures[0]} has several modules ({', '.join(arch.modules)}); "
            "upscale grows single-stack language models only"
        )
    module = arch.modules["default"].architecture
    return Source(
        path=str(path),
        config=config,
        layers=module.num_layers(config),
        layer_tensors=[w.name for w in module.layer_weights(0, config)],
    )


def _check_method_fits(spec: Spec, source: Source, ctx: StageContext) -> None:
    if spec.method != "expand":
        return
    tensors = source.layer_tensors
    if not all(any(f["filter"] in t for t in tensors) for f in IDENTITY_SCALE if "filter" in f):
        raise ctx.fail(
            "method",
            "expand zeroes o_proj and down_proj, which the layers of "
            f"{source.config.architectures[0]} do not have",
        )


def plan_layers(
    spec: Spec, layers: dict[str, int], ctx: StageContext, seam_start: int | None = None
) -> list[Piece]:
    """The output as slices of the sources, checked against each source's layer count (n for
    the stage's `model`), by reference key. `seam_start`: dus's block placed by an analysis."""
    from upstack.models.layer_analysis import seam_slices

    n = layers["model"]
    fail = ctx.fail

    if spec.method == "dus" and spec.analysis is not None:
        target = _dus_target(spec, n)
        if not 1 <= target <= 2 * n:
            key = "target_layers" if spec.target_layers is not None else "drop_layers"
            raise fail(key, f"{target} layers is not reachable from {n}: DUS gives 1 to {2 * n}")
        # before the analysis has run only the count is known: any start gives it
        return [Piece("model", a, b) for a, b in seam_slices(n, target, seam_start or 0)]

    if spec.method == "dus":
        if spec.target_layers is not None:
            drop = n - spec.target_layers // 2  # m = n - s/2
            if not 0 <= drop < n:
                raise fail(
                    "target_layers",
                    f"{spec.target_layers} is not reachable from {n} layers: "
                    f"DUS gives an even count from 2 to {2 * n}",
                )
        else:
            drop = spec.drop_layers
            if drop >= n:
                raise fail(
                    "drop_layers",
                    f"must be less than the source's {n} layers (0 <= m < n), got {drop}",
                )
        return [Piece("model", 0, n - drop), Piece("model", drop, n)]

    if spec.method == "stack":
        return [Piece("model", 0, n) for _ in range(spec.copies)]

    if spec.method == "expand":
        if n % spec.new_layers:
            raise fail(
                "new_layers",
                f"must divide the source's {n} layers (one identity block per "
                f"group of n/new_layers), got {spec.new_layers}",
            )
        group = n // spec.new_layers
        pieces = []
        for start in range(0, n, group):
            pieces.append(Piece("model", start, start + group))
            pieces.append(Piece("model", start + group - 1, start + group, identity=True))
        return pieces

    pieces = []
    for i, piece in enumerate(spec.slices):
        key = f"slices.{i}.model" if piece.model is not None else "model"
        first, end = piece.layer_range
        if end > layers[key]:
            raise fail(
                f"slices.{i}.layer_range",
                f"[{first}, {end}) goes past the {layers[key]} layers of {ctx.ref(key).text}",
            )
        pieces.append(Piece(key, first, end, parameters=piece.parameters))
    return pieces


def passthrough_config(spec: Spec, model: Any) -> Any:
    """The `layers` method's slices as a mergekit config (each model the `model(key)` of its
    reference key), for mergekit's own checks of their parameters."""
    from mergekit.config import MergeConfiguration

    slices = []
    for i, piece in enumerate(spec.slices or []):
        key = f"slices.{i}.model" if piece.model is not None else "model"
        source = {"model": model(key), "layer_range": list(piece.layer_range)}
        if piece.parameters:
            source["parameters"] = piece.parameters
        slices.append({"sources": [source]})
    return MergeConfiguration.model_validate({"merge_method": "passthrough", "slices": slices})


def _slice_loc(problem: tuple) -> tuple:
    """A problem in the passthrough config, placed on the `layers` slice it came from."""
    loc, message = problem
    if loc[:1] == ("slices",) and loc[2:5] == ("sources", 0, "parameters"):
        loc = ("slices", loc[1], "parameters", *loc[5:])
    return loc, message


def check_at_load(spec: Spec, recipe, name: str) -> None:
    """Every slice parameter evaluates for every tensor of its layers, on the source's
    architecture (its config.json, or what the recipe says a stage will build). moe: the base
    is a Llama or Mistral and every expert has its architecture and shape."""
    from upstack.models import merging

    if spec.method == "moe":
        from upstack.models.shapes import planned_shape

        refs = {ref.key: ref for ref in recipe.refs(name) if ref.thing == "model"}
        every = frozenset(recipe.stages)  # the shapes the recipe gives its stages
        shapes = {key: planned_shape(recipe, ref, every) for key, ref in refs.items()}
        problem = moe_problem(spec, shapes, lambda key: refs[key].text)
        if problem:
            key, message = problem
            raise recipe.error(("stages", name, *key.split(".")), message)
        return
    if spec.method != "layers" or not any(piece.parameters for piece in spec.slices):
        return
    refs = {ref.key: ref for ref in recipe.refs(name)}
    config = passthrough_config(spec, lambda key: key)  # the key stands for the model
    method, _ = merging.merge_method("passthrough")
    problem = merging.tensor_parameter_problem(
        config, method, lambda model: merging.model_config(refs.get(model.model.path), recipe)
    )
    if problem:
        loc, message = _slice_loc(problem)
        raise recipe.error(("stages", name, *loc), message)


# --------------------------------------------------------------------------- the stage


def run(spec: Spec, ctx: StageContext) -> dict:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    if spec.method == "moe":
        return run_moe(spec, ctx)
    sources = read_sources(ctx)
    _check_method_fits(spec, sources["model"], ctx)
    n = sources["model"].layers
    pieces = plan_layers(
        spec,
        {key: source.layers for key, source in sources.items()},
        ctx,
        seam_from_analysis(spec, n, ctx),
    )
    # output layer i <- (piece, source layer j)
    by_layer = [(piece, j) for piece in pieces for j in range(piece.first, piece.end)]
    layer_map = [j for _, j in by_layer]
    dtype = spec.dtype or _config_dtype(sources["model"].config)

    config = merge_config(pieces, sources, dtype)
    config_text = yaml.safe_dump(config, sort_keys=False)
    # Beside the weights, so a user can see the surgery and rerun it with `mergekit-yaml`.
    (ctx.out_dir / "mergekit_config.yml").write_text(config_text)
    ctx.log(f"{spec.method}: {sources['model'].layers} -> {len(layer_map)} layers")

    options = MergeOptions(
        # A layer placed twice would otherwise be one tensor saved under two names.
        clone_tensors=len({(p.key, j) for p, j in by_layer}) < len(by_layer),
        copy_tokenizer=True,  # tokenizer files, chat_template.jinja and generation_config.json
        out_shard_size=parse_size(spec.shard_size),
        trust_remote_code=ctx.recipe.trust_remote_code,
        write_model_card=False,  # the push stage writes the card, with the whole lineage
        lazy_unpickle=False,  # safetensors only: nothing is unpickled
    )
    with _output_config_lists(per_layer_lists(by_layer, sources)):
        run_merge(MergeConfiguration.model_validate(config), str(ctx.out_dir), options)
    fix_dtype(ctx.out_dir, dtype)

    metrics = {
        "method": spec.method,
        "layers_before": sources["model"].layers,
        "layers_after": len(layer_map),
        "parameters_before": count_parameters(_local_dir(sources["model"].path)),
        "parameters_after": count_parameters(ctx.out_dir),
        "dtype": dtype,
        "layer_map": layer_map,  # output layer i <- source layer layer_map[i]
    }
    if len(sources) > 1:
        metrics["layer_sources"] = [sources[piece.key].path for piece, _ in by_layer]
    if spec.method == "expand":
        metrics["identity_layers"] = [i for i, (piece, _) in enumerate(by_layer) if piece.identity]
    if spec.analysis is not None:
        metrics["seam_slices"] = [[piece.first, piece.end] for piece in pieces]
    # for every output layer: source, source layer, copy, roles (upstack.models.layermap)
    metrics["layer_origins"] = build_layer_map(pieces, ctx)
    return metrics


# --------------------------------------------------------------------------- moe (mergekit-moe)


def _expert_key(spec: Spec, i: int) -> str:
    """The reference key of expert i's model: its own, or the stage's (an upcycled copy)."""
    return f"experts.{i}.model" if spec.expert_list[i].model is not None else "model"


def moe_problem(spec: Spec, shapes: dict[str, dict | None], text) -> tuple[str, str] | None:
    """(key, message) when mergekit-moe cannot build this mixture from these shapes (by reference
    key; None where a shape is not known offline): the base must be a Llama or Mistral, every
    expert of its architecture and sizes, since expert i of layer j is its model's FFN of layer j."""
    from upstack.models.shapes import differences

    base = shapes.get("model")
    if not base:
        return None
    base_arch = _arch_name(base)
    if base.get("model_type") and base["model_type"] not in MOE_BASES:
        return "model", (
            f"method moe writes a Mixtral, which mergekit-moe builds from Llama or Mistral "
            f"models only; {text('model')} is {base_arch}"
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


def _moe_source_problem(source: Source) -> str | None:
    """mergekit-moe writes Mixtral's tensors only: biases of a Llama would be dropped silently."""
    biased = [key for key in ("attention_bias", "mlp_bias") if getattr(source.config, key, False)]
    if biased:
        return (
            f"{source.config.architectures[0]} with {' and '.join(biased)}: Mixtral has no "
            "biases, so mergekit-moe would drop them"
        )
    return None


def _preflight_moe(spec: Spec, ctx: StageContext) -> None:
    """Every local source is a readable checkpoint of a base Mixtral can come from, the experts of
    the base's shape; sources this run builds first are checked on the shapes the recipe gives."""
    from upstack.models.shapes import planned_shape

    shapes: dict[str, dict | None] = {}
    for ref in _model_refs(ctx):
        if ref.origin == "hub":
            shapes[ref.key] = None  # checked when the stage starts: a dry run stays offline
        elif ctx.is_pending(ref):
            shapes[ref.key] = planned_shape(ctx.recipe, ref, ctx.pending)
        else:
            source = _read_source(ref, ctx)
            problem = _moe_source_problem(source)
            if problem:
                raise ctx.fail(ref.key, problem)
            shapes[ref.key] = _source_shape(source)
    problem = moe_problem(spec, shapes, lambda key: ctx.ref(key).text)
    if problem:
        raise ctx.fail(*problem)


def moe_layer_map(spec: Spec, n: int, ctx: StageContext) -> list[dict]:
    """Every layer of the mixture is the base's layer (attention, norms) with experts in place of
    its FFN: role `expert`, and `experts`, expert e's source (its FFN of the same layer)."""
    from upstack.models import layermap

    base = ctx.ref("model").text
    experts = [ctx.ref(_expert_key(spec, i)).text for i in range(len(spec.expert_list))]
    entries = layermap.build([(base, j) for j in range(n)], roles={j: ["expert"] for j in range(n)})
    for entry in entries:
        entry["experts"] = list(experts)
    return entries


def moe_config(spec: Spec, sources: dict[str, Source], dtype: str | None) -> dict:
    """mergekit-moe's config (MoEMergeConfig), absolute paths so `mergekit-moe` reruns it here."""

    def where(key: str) -> str:
        path = sources[key].path
        return str(Path(path).resolve()) if Path(path).exists() else path

    experts = []
    for i, expert in enumerate(spec.expert_list):
        entry: dict[str, Any] = {"source_model": where(_expert_key(spec, i))}
        for key in ("positive_prompts", "negative_prompts", "noise_scale"):
            if getattr(expert, key) is not None:
                entry[key] = getattr(expert, key)
        experts.append(entry)
    config: dict[str, Any] = {
        "base_model": where("model"),
        "architecture": "mixtral",  # the one output mergekit-moe makes from Llama and Mistral
        "gate_mode": spec.moe_gate,
        "experts_per_token": spec.moe_top_k,
        "experts": experts,
    }
    if dtype:
        config["dtype"] = dtype
    return config


def run_moe(spec: Spec, ctx: StageContext) -> dict:
    import torch
    import yaml
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build
    from transformers import AutoTokenizer, GenerationConfig

    sources = read_sources(ctx)
    for key, source in sources.items():
        problem = _moe_source_problem(source)
        if problem:
            raise ctx.fail(key, problem)
    shapes = {key: _source_shape(source) for key, source in sources.items()}
    problem = moe_problem(spec, shapes, lambda key: ctx.ref(key).text)
    if problem:
        raise ctx.fail(*problem)
    base = sources["model"]
    dtype = spec.dtype or _config_dtype(base.config)
    config = moe_config(spec, sources, dtype)
    # Beside the weights, so a user can see the mixture and rerun it with `mergekit-moe`.
    (ctx.out_dir / MOE_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    count = len(spec.expert_list)
    ctx.log(
        f"moe: {base.layers} layers, FFN -> {count} experts (top {spec.moe_top_k}), "
        f"gate {spec.moe_gate}"
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
    # inference needs no router logits; TRL turns them on for the load-balancing loss
    settings: dict[str, Any] = {"output_router_logits": False}
    if spec.router_aux_loss_coef is not None:
        settings["router_aux_loss_coef"] = spec.router_aux_loss_coef
    _update_config(ctx.out_dir, settings)
    fix_dtype(ctx.out_dir, dtype)

    layer_map = list(range(base.layers))
    written = json.loads((ctx.out_dir / "config.json").read_text())
    return {
        "method": "moe",
        "layers_before": base.layers,
        "layers_after": base.layers,
        "parameters_before": count_parameters(_local_dir(base.path)),
        "parameters_after": count_parameters(ctx.out_dir),
        "dtype": dtype,
        "experts": count,
        "experts_per_token": spec.moe_top_k,
        "gate_mode": spec.moe_gate,
        "router_aux_loss_coef": written.get("router_aux_loss_coef"),
        "expert_sources": [ctx.ref(_expert_key(spec, i)).text for i in range(count)],
        "layer_map": layer_map,
        "layer_origins": moe_layer_map(spec, base.layers, ctx),
    }


def _update_config(out_dir: Path, settings: dict) -> None:
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(settings)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge_config(pieces: list[Piece], sources: dict[str, Source], dtype: str | None) -> dict:
    """The mergekit passthrough config: one slice per piece, absolute paths so it reruns anywhere here."""
    slices = []
    for piece in pieces:
        path = sources[piece.key].path
        source: dict[str, Any] = {
            "model": str(Path(path).resolve()) if Path(path).exists() else path,
            "layer_range": [piece.first, piece.end],
        }
        if piece.identity:
            source["parameters"] = {"scale": IDENTITY_SCALE}
        elif piece.parameters:
            source["parameters"] = piece.parameters
        slices.append({"sources": [source]})
    config: dict[str, Any] = {"merge_method": "passthrough", "slices": slices}
    if dtype:
        config["dtype"] = dtype
    return config


def per_layer_lists(
    by_layer: list[tuple[Piece, int]], sources: dict[str, Source]
) -> dict[str, list]:
    """The output's per-layer config lists (`layer_types`): entry i is its source layer's entry."""
    lists = {}
    for key in PER_LAYER_KEYS:
        values = [getattr(sources[piece.key].config, key, None) for piece, _ in by_layer]
        if all(
            isinstance(v, list) and len(v) == sources[p.key].layers
            for v, (p, _) in zip(values, by_layer, strict=True)
        ):
            lists[key] = [v[j] for v, (_, j) in zip(values, by_layer, strict=True)]
    return lists


@contextmanager
def _output_config_lists(lists: dict[str, list]) -> Iterator[None]:
    """Set the per-layer config lists while mergekit builds the output config.

    mergekit 0.1.5 sets the new layer count but leaves these lists at the base's length, and
    transformers 5 then refuses to save the config (Qwen2/3, Gemma 2/3; Llama and Mistral have
    none). `run_merge` builds that config in one private function, its only hook, so we wrap it.
    """
    import mergekit.merge

    if not lists:  # nothing to fix (Llama, Mistral): leave mergekit as it is
        yield
        return
    build = getattr(mergekit.merge, "_model_out_config", None)
    if build is None:
        from importlib import metadata

        raise UserError(
            f"mergekit {metadata.version('mergekit')} has no merge._model_out_config, which "
            f"upscale wraps to set the per-layer config lists ({', '.join(lists)}) of the "
            "grown model: install mergekit 0.1.x (pip install 'mergekit<0.2')"
        )

    def build_with_lists(*args, **kwargs):
        config = build(*args, **kwargs)
        for key, value in lists.items():
            setattr(config, key, value)
        return config

    mergekit.merge._model_out_config = build_with_lists
    try:
        yield
    finally:
        mergekit.merge._model_out_config = build


def fix_dtype(out_dir: Path, dtype: str | None) -> None:
    """config.json says the dtype asked for, under the name transformers 5 reads (`dtype`)."""
    if not dtype:
        return
    path = out_dir / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000 (decimal units, as mergekit's own sizes)."""
    number, unit = SIZE.match(text.strip()).groups()
    return int(float(number) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[unit.upper()])


def _config_dtype(config: Any) -> str | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype else None


def _local_dir(path: str) -> str:
    """A Hub id's snapshot in the local cache (mergekit downloaded it); a local dir as is."""
    if Path(path).exists():
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=["*.safetensors", "*.json"])
