"""upscale stage: a deeper model from a base by layer surgery (SOLAR's DUS, Gstack, LLaMA Pro), or a
wider one by sparse upcycling into a mixture of experts (Mixtral), done by mergekit.

The methods are upstack.growth's. Here is the stage contract over them: the settings are the
union of the methods' settings models, the one `method` names, and each hook is its family's."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import (
    Discriminator,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from upstack import growth
from upstack.growth.base import GrowthSpec

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


# one member per method, tagged with its name: the tag `_method` picks
MEMBERS = tuple(Annotated[model, Tag(method)] for method, model in growth.SETTINGS.items())
Spec = Annotated[
    Union[MEMBERS],  # noqa: UP007 (a computed tuple of members has no `|` spelling)
    Discriminator(_method),
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
