"""upscale stage: a deeper model from a base by layer surgery (SOLAR's DUS, Gstack, LLaMA Pro), or a
wider one by sparse upcycling into a mixture of experts (Mixtral), done by mergekit.

The methods are upstack.growth's. Here is the stage contract over them: the settings are the
union of the methods' settings models, the one `method` names, and each hook is its family's."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import (
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from upstack import growth
from upstack.core import registry
from upstack.core.settings import error_at
from upstack.growth.base import GrowthSpec
from upstack.growth.passthrough import Dus

# The stage contract (upstack.core.contract)
OUTPUT = "model"  # a checkpoint
LAYER_MAP = "writes"  # it records where each output layer came from
LAUNCHABLE = False

if TYPE_CHECKING:
    from upstack.core.context import StageContext


def _method(body: Any) -> Any:
    """The method whose settings model reads `body`: dus (SOLAR's) when it names none."""
    if isinstance(body, dict):
        return body.get("method", "dus")
    return getattr(body, "method", None)


class AutoDus(Dus):
    """dus with `target_layers: auto`: the largest s = 2(n - m) whose training fits the GPUs
    (`launch.gpus`), found when the recipe loads (`settle`), so every hook, the hash and the
    manifest see the Dus settings with that count, as if it were written."""

    target_layers: Literal["auto"] = Field(
        description="dus: auto, the largest count whose training fits launch.gpus"
    )
    drop_layers: None = Field(None, description="dus: chosen with the count by `auto`")

    @model_validator(mode="before")
    @classmethod
    def _no_drop_layers(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("drop_layers") is not None:
            raise error_at(
                ("drop_layers",), "target_layers: auto chooses the count: leave drop_layers out"
            )
        return data

    @model_validator(mode="after")
    def _one_count(self) -> AutoDus:  # Dus's: a count or drop_layers; here the count is `auto`
        return self


def _member(body: Any) -> Any:
    """The union member that reads `body`: its method's, or AutoDus for `target_layers: auto`."""
    method = _method(body)
    if isinstance(body, dict):
        auto = body.get("target_layers") == "auto"
    else:
        auto = isinstance(body, AutoDus)
    return "dus-auto" if method == "dus" and auto else method


def _at_recipe_keys(body: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """The union's errors at the recipe's keys. pydantic places a member's errors under its tag
    (`moe.experts`, `dus` alone for a check of the whole stage), a level the recipe does not
    have, and an unknown method at the union, not at `method`."""
    method = _method(body)
    if method not in growth.SETTINGS:
        expected = [repr(m) for m in growth.SETTINGS]
        error = InitErrorDetails(
            type="literal_error",
            loc=("method",),
            input=method,
            ctx={"expected": f"{', '.join(expected[:-1])} or {expected[-1]}"},
        )
        raise ValidationError.from_exception_data("upscale", [error])
    try:
        return handler(body)
    except ValidationError as err:
        untagged = [
            InitErrorDetails(
                # the type kept (the recipe's error line reads `missing`, `extra_forbidden`)
                type=PydanticCustomError(e["type"], "{message}", {"message": e["msg"]}),
                loc=e["loc"][1:],
                input=e["input"],
            )
            for e in err.errors()
        ]
        raise ValidationError.from_exception_data(err.title, untagged) from None


# one member per method, tagged with its name, and dus's `auto` count: the tag `_member` picks
MEMBERS = (
    *(Annotated[model, Tag(method)] for method, model in growth.SETTINGS.items()),
    Annotated[AutoDus, Tag("dus-auto")],
)
Spec = Annotated[
    Union[MEMBERS],  # noqa: UP007 (a computed tuple of members has no `|` spelling)
    Discriminator(_member),
    WrapValidator(_at_recipe_keys),
]


def _family(spec: GrowthSpec) -> ModuleType:
    return growth.FAMILIES[spec.method]


def card_tags(spec: GrowthSpec) -> list[str]:
    return _family(spec).card_tags(spec)


def preflight(spec: GrowthSpec, ctx: StageContext) -> None:
    """Raise the run-time UserErrors (layer counts, architecture, missing source) before the runner
    writes anything. A source this run builds first counts the layers the recipe gives it; a Hub
    source is checked when the stage starts, before any weight is fetched (a dry run stays offline)."""
    _family(spec).preflight(spec, ctx)


def output_shape(spec: GrowthSpec, input_shape) -> dict | None:
    """The grown model's shape: its source's, with the layer count the method gives; for moe a
    Mixtral of the base's sizes with `experts` experts per layer."""
    return _family(spec).output_shape(spec, input_shape)


def planned_layer_map(spec: GrowthSpec, ctx: StageContext) -> list[dict] | None:
    """The layer map the stage will record, from the recipe and its sources' layer counts (read
    from config.json, or planned for a source this run builds); None when it is not known
    offline."""
    return _family(spec).planned_layer_map(spec, ctx)


def check_at_load(spec: GrowthSpec, recipe, name: str) -> None:
    """What the method can check once the recipe is loaded: `layers` slice parameters on their
    sources' architectures; moe's base and experts' architectures and shapes."""
    _family(spec).check_at_load(spec, recipe, name)


def run(spec: GrowthSpec, ctx: StageContext) -> dict:
    return _family(spec).run(spec, ctx)


# --------------------------------------------------------------------------- depth from the GPUs


def settle(spec: GrowthSpec, recipe, name: str) -> GrowthSpec | None:
    """`target_layers: auto`: the Dus settings with the largest count whose training fits
    `launch.gpus` (`depth_search`); None for every other upscale."""
    if not isinstance(spec, AutoDus):
        return None
    from upstack.core.hardware import machine_for, parse_gpus

    loc = ("stages", name, "target_layers")
    if recipe.launch.gpus is None:
        raise recipe.error(
            loc,
            "auto sizes the model for the GPUs it trains on: set launch.gpus (e.g. "
            "8xH100-80GB), or try sizes with `upstack plan RECIPE --gpus 8xH100-80GB --fit`",
        )
    machine = machine_for(recipe.launch, parse_gpus(recipe.launch.gpus))
    search = depth_search(spec, recipe, name, machine)
    if "problem" in search:
        raise recipe.error(loc, search["problem"])
    recipe.settled[name] = search
    return _with_count(spec, search["target_layers"])


def _with_count(spec: Dus, count: int) -> Dus:
    data = spec.model_dump()
    data.update(target_layers=count, drop_layers=None)
    return Dus.model_validate(data)


def depth_search(spec: Dus, recipe, name: str, machine) -> dict:
    """The largest DUS count s (s = 2(n - m), or any count with `analysis:`) at which every
    training stage that takes this model fits the machine's GPUs at its batch and length,
    largest first; with the component that bounds it (the largest one, at the first count that
    does not fit). {"problem": ...} when it cannot be decided."""
    from upstack.core.runner import context
    from upstack.models.shapes import plan_shape

    source = next(ref for ref in recipe.refs(name) if ref.key == "model")
    every = frozenset(recipe.stages)
    n = (plan_shape(recipe, source, every) or {}).get("num_hidden_layers")
    if n is None:
        return {"problem": f"the layer count of {source.text} is not known offline"}
    trainers = [
        other
        for other in recipe.order()
        if any(r.key == "model" and r.stage == name for r in recipe.refs(other))
    ]
    step = 1 if spec.analysis is not None else 2
    original = recipe.stages[name]
    tried: list[dict] = []
    try:
        for count in range(2 * n, 0, -step):
            recipe.stages[name] = _with_count(spec, count)
            plans = []
            for other in trainers:
                ctx = context(recipe, other, "", every)
                ctx.machine = machine
                other_spec = recipe.stages[other]
                found = registry.kind(other_spec.kind).plan(other_spec, ctx)
                if found and not found.get("known", True):
                    return {"problem": f"stage {other}: {'; '.join(found['notes'])}"}
                if found and "fits" in found:
                    plans.append(found)
            if not plans:
                return {"problem": f"no training stage takes {name}'s model, so nothing sizes it"}
            worst = max(plans, key=lambda p: p["memory_per_gpu_gb"])
            row = {
                "target_layers": count,
                "drop_layers": n - count // 2 if step == 2 else None,
                "stage": worst["stage"],
                "memory_per_gpu_gb": worst["memory_per_gpu_gb"],
                "largest": worst["largest"],
                "components_gb": worst["components_gb"],
                "fits": all(p["fits"] for p in plans),
            }
            tried.append(row)
            if row["fits"]:
                bound = tried[-2] if len(tried) > 1 else None
                return {
                    "source_layers": n,
                    "target_layers": count,
                    "gpus": machine.gpus.describe(),
                    "need_gb": row["memory_per_gpu_gb"],
                    "bound_by": bound
                    and {
                        "target_layers": bound["target_layers"],
                        "stage": bound["stage"],
                        "memory_per_gpu_gb": bound["memory_per_gpu_gb"],
                        "largest": bound["largest"],
                        "components_gb": bound["components_gb"],
                    },
                    "tried": tried,
                }
    finally:
        recipe.stages[name] = original
    last = tried[-1]
    return {
        "problem": f"no count fits {machine.gpus.describe()}: even {last['target_layers']} "
        f"layers need {last['memory_per_gpu_gb']:.1f} GiB per GPU for stage {last['stage']} "
        f"({last['largest']} the largest part)",
        "tried": tried,
    }


def plan(spec: GrowthSpec, ctx: StageContext) -> dict | None:
    """For dus on a machine: the depth search (`depth_search`), what `upstack plan --fit`
    prints; for a count `auto` chose, how it was chosen."""
    if ctx.machine is None or not isinstance(spec, Dus):
        return None
    settled = ctx.recipe.settled.get(ctx.name)
    search = settled or depth_search(spec, ctx.recipe, ctx.name, ctx.machine)
    written = spec.target(search["source_layers"]) if "source_layers" in search else None
    return {
        "stage": ctx.name,
        "kind": spec.kind,
        "auto": settled is not None,
        "target_layers": written,
        "depth": search,
    }
