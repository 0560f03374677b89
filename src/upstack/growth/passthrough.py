"""Growth by layer surgery: the output's layers are slices of its sources' layers, written by
mergekit's passthrough merge.

  dus     SOLAR's depth up-scaling: two copies of the base joined at a seam
  stack   Gstack: the whole layer stack repeated
  expand  LLaMA Pro: identity blocks added, one per group of layers
  layers  the slices as written, of any sources, with mergekit's passthrough parameters
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from upstack.core.errors import UserError
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
from upstack.models.checkpoints import count_parameters, fix_dtype, parse_size

if TYPE_CHECKING:
    from upstack.core.context import StageContext

# A LLaMA Pro block starts as the identity: with its attention and MLP output projections at
# zero, both residual branches add nothing, so the grown model computes what the base computes.
IDENTITY_SCALE = [
    {"filter": "o_proj", "value": 0.0},
    {"filter": "down_proj", "value": 0.0},
    {"value": 1.0},
]
# config.json lists with one entry per layer (sliding/full attention, NoPE layers).
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


class Dus(GrowthSpec):
    """Keep [0, n-m) of one copy and [m, n) of another: s = 2(n-m) layers. SOLAR: n=32, m=8 → 48."""

    method: Literal["dus"] = "dus"
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

    @model_validator(mode="after")
    def _one_count(self) -> Dus:
        if (self.drop_layers is None) == (self.target_layers is None):
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
        return self

    def target(self, n: int) -> int:
        """s: the layers this gives from n."""
        if self.target_layers is not None:
            return self.target_layers
        return 2 * (n - self.drop_layers)


class Stack(GrowthSpec):
    """The whole stack of n layers repeated: copies * n layers (Gstack)."""

    method: Literal["stack"] = "stack"
    copies: int | None = Field(
        None,
        ge=2,
        description="stack: times the whole stack repeats (Gstack's g; the paper uses 4)",
    )

    @model_validator(mode="after")
    def _copies_given(self) -> Stack:
        if self.copies is None:
            raise ValueError("method stack needs copies (how many times the layer stack repeats)")
        return self


class Expand(GrowthSpec):
    """An identity block after each group of n/new_layers layers (LLaMA Pro)."""

    method: Literal["expand"] = "expand"
    new_layers: int | None = Field(
        None,
        ge=1,
        description="expand: identity blocks added, one per group of n/new_layers layers (LLaMA Pro: 8 on 32)",
    )

    @model_validator(mode="after")
    def _new_layers_given(self) -> Expand:
        if self.new_layers is None:
            raise ValueError("method expand needs new_layers (identity blocks to add)")
        return self


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


class Layers(GrowthSpec):
    """The output's layers as mergekit slices, of the stage's model or others (a frankenmerge)."""

    method: Literal["layers"] = "layers"
    slices: list[Slice] | None = Field(
        None, description="layers: output layers as mergekit slices, in order"
    )

    @model_validator(mode="after")
    def _slices(self, info: ValidationInfo) -> Layers:
        """Slices given, their parameters checked by mergekit's own passthrough method, as a
        merge stage's parameters are."""
        if not self.slices:
            raise ValueError("method layers needs slices: [{layer_range: [first, end]}, ...]")
        if not (info.context or {}).get("deep", True):
            return self  # `upstack status`/`report`: importing mergekit (peft, torch) costs ~8 s
        if not any(piece.parameters for piece in self.slices):
            return self
        from upstack.models import merging

        method, _ = merging.merge_method("passthrough")
        problem = merging.parameters_problem(passthrough_config(self, lambda key: key), method)
        if problem:
            raise error_at(*_slice_loc(problem))
        return self


# the family's methods, as upstack.growth registers them
SETTINGS: dict[str, type[GrowthSpec]] = {
    "dus": Dus,
    "stack": Stack,
    "expand": Expand,
    "layers": Layers,
}
Passthrough = Dus | Stack | Expand | Layers


@dataclass
class Piece:
    """One mergekit slice of the output: source layers first..end-1, maybe as identity blocks."""

    key: str
    first: int
    end: int
    identity: bool = False
    parameters: dict | None = None  # the recipe's passthrough parameters for these layers


# --------------------------------------------------------------------------- the family's hooks


def card_tags(spec: Passthrough) -> list[str]:
    return ["depth-upscaling"]


def preflight(spec: Passthrough, ctx: StageContext) -> None:
    """The layer counts the method needs, from every local source's config (or the count the
    recipe gives a source this run builds first); a Hub source waits for the stage to start."""
    from upstack.models.shapes import planned_shape

    layers = {}
    for ref in model_refs(ctx):
        if ref.origin == "hub":
            return
        if ctx.is_pending(ref):
            shape = planned_shape(ctx.recipe, ref, ctx.pending) or {}
            if shape.get("num_hidden_layers") is None:
                return
            layers[ref.key] = shape["num_hidden_layers"]
        else:
            source = read_source(ref, ctx)
            _check_method_fits(spec, source, ctx)
            layers[ref.key] = source.layers
    start = seam_from_analysis(spec, layers["model"], ctx)
    pieces = plan_layers(spec, layers, ctx, start)
    if isinstance(spec, Dus) and spec.analysis is not None:
        ctx.log(_seam_note(spec, pieces, layers["model"], start))  # where the seam goes, up front


def output_shape(spec: Passthrough, input_shape) -> dict | None:
    """The grown model's shape: its source's, with the layer count the method gives."""
    shapes = {"model": input_shape("model")}
    for i, piece in enumerate(spec.slices if isinstance(spec, Layers) else []):
        if piece.model is not None:
            shapes[f"slices.{i}.model"] = input_shape(f"slices.{i}.model")
    if any(shape is None or shape.get("num_hidden_layers") is None for shape in shapes.values()):
        return None
    n = shapes["model"]["num_hidden_layers"]
    if isinstance(spec, Dus):
        layers = spec.target(n)
    elif isinstance(spec, Stack):
        layers = n * spec.copies
    elif isinstance(spec, Expand):
        layers = n + spec.new_layers
    else:
        layers = sum(end - first for first, end in (s.layer_range for s in spec.slices))
    return {**shapes["model"], "num_hidden_layers": layers}


def planned_layer_map(spec: Passthrough, ctx: StageContext) -> list[dict] | None:
    """The layer map the stage will record, from the recipe and its sources' layer counts; None
    when a count is not known offline (a Hub source) or the seam waits for an analysis this run
    makes first."""
    layers = planned_layers(ctx)
    if layers is None:
        return None
    if isinstance(spec, Dus) and spec.analysis is not None and ctx.is_pending(ctx.ref("analysis")):
        return None
    pieces = plan_layers(spec, layers, ctx, seam_from_analysis(spec, layers["model"], ctx))
    return build_layer_map(pieces, ctx)


def check_at_load(spec: Passthrough, recipe, name: str) -> None:
    """Every source is a model mergekit can read, and every slice parameter evaluates for every
    tensor of its layers, on the source's architecture (its config.json, or what the recipe
    says a stage will build)."""
    check_sources_at_load(recipe, name)
    if not isinstance(spec, Layers) or not any(piece.parameters for piece in spec.slices):
        return
    from upstack.models import merging

    refs = {ref.key: ref for ref in recipe.refs(name)}
    config = passthrough_config(spec, lambda key: key)  # the key stands for the model
    method, _ = merging.merge_method("passthrough")
    problem = merging.tensor_parameter_problem(
        config, method, lambda model: merging.model_config(refs.get(model.model.path), recipe)
    )
    if problem:
        loc, message = _slice_loc(problem)
        raise recipe.error(("stages", name, *loc), message)


def run(spec: Passthrough, ctx: StageContext) -> dict:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

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
    dtype = spec.dtype or config_dtype(sources["model"].config)

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
        "parameters_before": count_parameters(local_dir(sources["model"].path)),
        "parameters_after": count_parameters(ctx.out_dir),
        "dtype": dtype,
        "layer_map": layer_map,  # output layer i <- source layer layer_map[i]
    }
    if len(sources) > 1:
        metrics["layer_sources"] = [sources[piece.key].path for piece, _ in by_layer]
    if isinstance(spec, Expand):
        metrics["identity_layers"] = [i for i, (piece, _) in enumerate(by_layer) if piece.identity]
    if isinstance(spec, Dus) and spec.analysis is not None:
        metrics["seam_slices"] = [[piece.first, piece.end] for piece in pieces]
    # for every output layer: source, source layer, copy, roles (upstack.models.layermap)
    metrics["layer_origins"] = build_layer_map(pieces, ctx)
    return metrics


# --------------------------------------------------------------------------- the layer plan


def plan_layers(
    spec: Passthrough, layers: dict[str, int], ctx: StageContext, seam_start: int | None = None
) -> list[Piece]:
    """The output as slices of the sources, checked against each source's layer count (n for
    the stage's `model`), by reference key. `seam_start`: dus's block placed by an analysis."""
    from upstack.models.layer_analysis import seam_slices

    n = layers["model"]
    fail = ctx.fail

    if isinstance(spec, Dus) and spec.analysis is not None:
        target = spec.target(n)
        if not 1 <= target <= 2 * n:
            key = "target_layers" if spec.target_layers is not None else "drop_layers"
            raise fail(key, f"{target} layers is not reachable from {n}: DUS gives 1 to {2 * n}")
        # before the analysis has run only the count is known: any start gives it
        return [Piece("model", a, b) for a, b in seam_slices(n, target, seam_start or 0)]

    if isinstance(spec, Dus):
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

    if isinstance(spec, Stack):
        return [Piece("model", 0, n) for _ in range(spec.copies)]

    if isinstance(spec, Expand):
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


def seam_from_analysis(spec: Passthrough, n: int, ctx: StageContext) -> int | None:
    """dus with `analysis`: the first layer of the block to duplicate or drop at the seam, the
    cheapest of its size the analysis measured; None without an analysis or before it ran."""
    from upstack.models import layer_analysis

    if not isinstance(spec, Dus) or spec.analysis is None:
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
    size = abs(spec.target(n) - n)
    return next((b["start"] for b in results["blocks"] if b["size"] == size), 0)


def _seam_note(spec: Dus, pieces: list[Piece], n: int, start: int | None) -> str:
    target = sum(p.end - p.first for p in pieces)
    if start is None:
        return f"seam placed by '{spec.analysis}' once it has run ({n} -> {target} layers)"
    slices = " + ".join(f"[{p.first}, {p.end})" for p in pieces)
    return f"seam placed by '{spec.analysis}': {n} -> {target} layers as {slices}"


def _check_method_fits(spec: Passthrough, source: Source, ctx: StageContext) -> None:
    """expand's identity blocks zero two projections, which the source's layers must have."""
    if not isinstance(spec, Expand):
        return
    tensors = source.layer_tensors
    if not all(any(f["filter"] in t for t in tensors) for f in IDENTITY_SCALE if "filter" in f):
        raise ctx.fail(
            "method",
            "expand zeroes o_proj and down_proj, which the layers of "
            f"{source.config.architectures[0]} do not have",
        )


def build_layer_map(pieces: list[Piece], ctx: StageContext) -> list[dict]:
    """For every output layer: its source (as the recipe names it), source layer, copy and roles."""
    from upstack.models import layermap

    by_layer = [(piece, j) for piece in pieces for j in range(piece.first, piece.end)]
    origins = [(ctx.ref(piece.key).text, j) for piece, j in by_layer]
    return layermap.build(origins, new={i for i, (p, _) in enumerate(by_layer) if p.identity})


# --------------------------------------------------------------------------- mergekit's config


def passthrough_config(spec: Layers, model: Any) -> Any:
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


def merge_config(pieces: list[Piece], sources: dict[str, Source], dtype: str | None) -> dict:
    """The mergekit passthrough config: one slice per piece, absolute paths so it reruns anywhere here."""
    slices = []
    for piece in pieces:
        source: dict[str, Any] = {
            "model": mergekit_path(sources[piece.key]),
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
