"""The stage contract: what a stage kind's module declares, and the hooks the kernel may call.

A stage kind is one module, `upstack/stages/<kind>.py`, named in upstack.core.registry. The
kernel reaches it only through this contract, as a `Kind` (every hook present, the defaults below
where the module defines none), and never by the kind's name: what the kernel needs to know of a
kind (does it make a model? may it run under accelerate?) the module declares.
tests/test_contract.py checks every stage module against `StageKind`.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from types import ModuleType
from typing import Any, Literal, Protocol, get_args

from pydantic import BaseModel, Discriminator, Tag, TypeAdapter

# What a stage's dir holds, for references that name the stage: `model: sft` must name a stage
# whose output is a model, `datasets: [{stage: pairs}]` one whose output is data.
Output = Literal["model", "data", "analysis", "results", "nothing"]
# How a stage's output model relates to the layers of its input model:
#   writes  it builds a new layer stack and records where each layer came from (upscale)
#   keeps   its model has its input's layers one for one, so a layer map passes through it
#   none    no model, or a model of its own (init)
LayerMap = Literal["writes", "keeps", "none"]


class StageKind(Protocol):
    """The module of a stage kind.

    Declared attributes (every stage module states all four):
      Spec        its settings: a StageSpec subclass, or an Annotated union of them discriminated
                  by one field (upscale's `method`: one settings model per growth method)
      OUTPUT      what its stage dir holds (`Output`)
      LAYER_MAP   how its model's layers relate to its input's (`LayerMap`)
      LAUNCHABLE  True when it may run under `accelerate launch` (the training stages)

    Hooks (only `run` is required; `Kind` gives the others the defaults below):
      run(spec, ctx) -> metrics               do the work into ctx.out_dir; the metrics go into
                                              the manifest. Raise ctx.fail(...) for the user's
                                              mistakes, ctx.fail(..., error=StageFailed) when
                                              the work could not be done.
      preflight(spec, ctx)                    before anything of the run is written: what needs
                                              the stage's inputs (a source's layer count, a
                                              file's columns). Offline and cheap: runs on
                                              --dry-run too. Default: nothing to check.
      check_at_load(spec, recipe, name)       at load, once every stage is validated and every
                                              reference resolved: checks that need the other
                                              stages. Raises recipe.error(loc, message).
      output_shape(spec, input_shape)         the shape of the model it will write (upstack.
                                              models.shapes), from its inputs' planned shapes
                                              (`input_shape(reference key)`), before it runs.
                                              Default: None (not known).
      planned_layer_map(spec, ctx)            LAYER_MAP "writes": the layer map it will record,
                                              from the recipe. Default: None.
      measures(spec) -> tuple[str, ...]       OUTPUT "results": the columns its results table
                                              will have (`task/` for a prefix), so a sweep
                                              scored by it is refused at load for a metric it
                                              never measures. Default: ().
      effective_settings(spec) -> dict|None   what it passes to its library on this machine,
                                              after upstack's defaults (`upstack show`).
      card_tags(spec) -> list[str]            tags it adds to the model card of a model built
                                              through it (push). Default: [].
      plan(spec, ctx) -> dict | None          what it will need on the machine `ctx.machine`
                                              (upstack.core.hardware.Machine), before it runs:
                                              for the kinds that train, parameters, memory per
                                              GPU by component and `fits`, tokens, time, cost
                                              (upstack.train.plan); for synth, requests and
                                              tokens to generate. `upstack plan` prints it and
                                              the runner refuses a stage whose `fits` is False.
                                              Default: None (nothing to plan).
      settle(spec, recipe, name) -> spec|None at load, once references are resolved, in run
                                              order: the stage's settings with what they leave
                                              to the rest of the recipe decided (upscale's
                                              `target_layers: auto`: the depth the GPUs fit),
                                              or None to keep them. Default: None.

    Generated data is declared by the settings, not the kind: a settings model whose data come
    from the tiny world's generators has `GENERATED: ClassVar[bool] = True`
    (upstack.core.hashing reads the marks).
    """

    Spec: Any
    OUTPUT: Output
    LAYER_MAP: LayerMap
    LAUNCHABLE: bool

    def run(self, spec: Any, ctx: Any) -> dict: ...


DECLARED = {"Spec": None, "OUTPUT": Output, "LAYER_MAP": LayerMap, "LAUNCHABLE": bool}


def _nothing(*args: Any) -> None:
    return None


# hook name -> (its parameters, its default)
HOOKS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "run": (("spec", "ctx"), _nothing),  # required: no default is used
    "preflight": (("spec", "ctx"), _nothing),
    "check_at_load": (("spec", "recipe", "name"), _nothing),
    "output_shape": (("spec", "input_shape"), _nothing),
    "planned_layer_map": (("spec", "ctx"), _nothing),
    "measures": (("spec",), lambda spec: ()),
    "effective_settings": (("spec",), _nothing),
    "card_tags": (("spec",), lambda spec: []),
    "plan": (("spec", "ctx"), _nothing),
    "settle": (("spec", "recipe", "name"), _nothing),
}
REQUIRED_HOOKS = ("run",)


class ContractError(TypeError):
    """A stage module that does not satisfy StageKind: a bug in upstack, not a user's mistake."""


class Kind:
    """A stage kind as the kernel uses it: the module's declarations, and every hook (the
    module's own, read when called, or the contract's default)."""

    def __init__(self, name: str, module: ModuleType):
        problems = contract_problems(module)
        if problems:
            raise ContractError(f"stage module {module.__name__}: {'; '.join(problems)}")
        self.name, self.module = name, module

    @classmethod
    def of(cls, name: str, module: ModuleType) -> Kind:
        return cls(name, module)

    def __getattr__(self, hook: str) -> Callable:
        if hook not in HOOKS:
            raise AttributeError(hook)
        return getattr(self.module, hook, HOOKS[hook][1])

    def __repr__(self) -> str:
        return f"Kind({self.name!r})"

    @property
    def Spec(self) -> Any:
        return self.module.Spec

    @property
    def output(self) -> Output:
        return self.module.OUTPUT

    @property
    def layer_map(self) -> LayerMap:
        return self.module.LAYER_MAP

    @property
    def launchable(self) -> bool:
        return self.module.LAUNCHABLE

    @property
    def spec_classes(self) -> tuple[type[BaseModel], ...]:
        """The settings models: Spec itself, or each member of its union."""
        return spec_classes(self.Spec)

    def validate(self, body: dict, context: dict) -> Any:
        """The stage's settings from its recipe body (kind filled in)."""
        if isinstance(self.Spec, type):
            return self.Spec.model_validate(body, context=context)
        return _adapter(self.Spec).validate_python(body, context=context)

    def spec_class(self, body: Any) -> type[BaseModel]:
        """The settings model that reads `body`: the union member its discriminator picks."""
        if isinstance(self.Spec, type):
            return self.Spec
        discriminator, members = union_members(self.Spec)
        return members.get(discriminator(body), next(iter(members.values())))

    def fields(self) -> set[str]:
        """Every settings key the kind has, in any member of its union."""
        return {name for c in self.spec_classes for name in c.model_fields}

    def settings(self, spec: BaseModel) -> dict[str, Any]:
        """The stage's settings as plain data, as its hash and manifest take them: for a union,
        every member's keys (None where this member has none), so a kind's settings table does
        not depend on which member holds them. Keys that only members' `added` settings declare
        (upstack.core.settings.added) are left out where absent: a member added later leaves
        the other members' hashes as they were."""
        data = spec.model_dump(mode="json")
        if len(self.spec_classes) > 1:
            data = {**dict.fromkeys(sorted(self.fields() - self._added_only())), **data}
        return data

    def _added_only(self) -> set[str]:
        """Keys every member that declares them marks `added`."""
        declared: dict[str, list[bool]] = {}
        for cls in self.spec_classes:
            for name, info in cls.model_fields.items():
                extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
                declared.setdefault(name, []).append(bool(extra.get("added")))
        return {name for name, marks in declared.items() if all(marks)}


@functools.cache
def _adapter(spec: Any) -> TypeAdapter:
    return TypeAdapter(spec)


def spec_classes(spec: Any) -> tuple[type[BaseModel], ...]:
    if isinstance(spec, type):
        return (spec,)
    return tuple(union_members(spec)[1].values())


def union_members(spec: Any) -> tuple[Callable[[Any], Any], dict[Any, type[BaseModel]]]:
    """A union Spec, `Annotated[Union[Annotated[A, Tag("a")], ...], Discriminator(tag_of)]`, as
    its discriminator function and its members by tag."""
    if typing.get_origin(spec) is not typing.Annotated:
        raise ContractError("a union Spec is Annotated[Union[...], Discriminator(...)]")
    union, *extras = get_args(spec)
    discriminator = next((e.discriminator for e in extras if isinstance(e, Discriminator)), None)
    if not callable(discriminator):
        raise ContractError("a union Spec needs Discriminator(function of the raw settings)")
    members = {}
    for member in get_args(union):
        cls, *meta = get_args(member) if typing.get_origin(member) is typing.Annotated else [member]
        tag = next((m.tag for m in meta if isinstance(m, Tag)), None)
        if tag is None:
            raise ContractError(f"union member {cls.__name__} has no Tag")
        members[tag] = cls
    return discriminator, members


def contract_problems(module: ModuleType) -> list[str]:
    """What keeps `module` from satisfying StageKind (empty when it does)."""
    problems = []
    for name, allowed in DECLARED.items():
        if not hasattr(module, name):
            problems.append(f"declares no {name}")
        elif allowed is not None:
            value = getattr(module, name)
            values = get_args(allowed) or (True, False)
            if value not in values or (allowed is bool and not isinstance(value, bool)):
                problems.append(f"{name} = {value!r}, expected one of {values}")
    if hasattr(module, "Spec"):
        try:
            classes = spec_classes(module.Spec)
        except ContractError as err:
            classes, problem = (), str(err)
        else:
            problem = "Spec is not a settings model or a union of them"
        if not classes or not all(issubclass(c, BaseModel) for c in classes):
            problems.append(problem)
    for hook, (params, _) in HOOKS.items():
        function = getattr(module, hook, None)
        if function is None:
            if hook in REQUIRED_HOOKS:
                problems.append(f"defines no {hook}()")
            continue
        if not callable(function):
            problems.append(f"{hook} is not a function")
            continue
        takes = [
            p.name
            for p in inspect.signature(function).parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(takes) != len(params):
            problems.append(f"{hook}({', '.join(takes)}) should take ({', '.join(params)})")
    return problems
