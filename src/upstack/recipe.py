"""The recipe a user edits: typed stage specs, `--set` overrides, and errors that name file, line and key."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from upstack.errors import UserError

# Stage kind -> module holding its `Spec` (a StageSpec) and `run(spec, ctx)`. A literal dict,
# not a plugin system: adding a kind is one line here and one module. Modules are imported only
# for the kinds a recipe uses, and keep heavy imports (torch, trl, mergekit) inside `run`.
STAGE_MODULES: dict[str, str] = {
    "init": "upstack.init_model",
    "upscale": "upstack.upscale",
    "cpt": "upstack.cpt",
    "sft": "upstack.sft",
    "dpo": "upstack.dpo",
    "synth": "data_synth.synth",
    "pairs": "data_synth.pairs",
    "merge": "upstack.merge",
    "eval": "upstack.evaluate",
    "push": "upstack.hub",
}


class Strict(BaseModel):
    """Every recipe model: an unknown key is an error, not a silently ignored typo."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class StageSpec(Strict):
    """Fields every stage has. Each stage kind's module subclasses this as `Spec`."""

    kind: str
    after: list[str] = Field(
        default_factory=list, description="stages to finish first, beyond the ones this stage reads"
    )

    def refs(self) -> dict[str, str]:
        """Key path (relative to the stage) -> a model or data source this stage reads.

        A value that names a stage of the recipe makes that stage a dependency; anything else
        is an outside source (a local path or a Hub id) that the stage resolves when it runs.
        """
        return {}


class Launch(Strict):
    """How training stages are launched: in-process, or under `accelerate launch`."""

    accelerate_config: str | None = Field(
        None,
        description="accelerate config file (recipes/accelerate/*.yaml); env ACCELERATE overrides",
    )
    num_processes: int | None = Field(
        None, ge=1, description="processes per machine; env NPROC overrides"
    )
    extra_args: list[str] = Field(
        default_factory=list, description="passed to accelerate launch as is"
    )


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seed: int = 42
    output_dir: str | None = Field(None, description="default: runs/<name>")
    trust_remote_code: bool = Field(
        False, description="let transformers run code shipped with a model"
    )
    launch: Launch = Field(default_factory=Launch)
    stages: dict[str, StageSpec]

    # Set by load_recipe, not by the YAML: where the recipe came from, so a subprocess
    # (accelerate launch) can load exactly the same recipe again.
    source: str = Field("", exclude=True)
    overrides: list[str] = Field(default_factory=list, exclude=True)

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe, defaults filled in, as plain data."""
        data = self.model_dump(mode="json", exclude={"stages"})
        data["stages"] = {n: s.model_dump(mode="json") for n, s in self.stages.items()}
        return data

    def deps(self, stage: str) -> list[str]:
        """The stages `stage` reads from or is ordered after."""
        spec = self.stages[stage]
        names = [*spec.refs().values(), *spec.after]
        return list(dict.fromkeys(n for n in names if n in self.stages))

    def order(self) -> list[str]:
        """All stages, each after its dependencies; ties keep the recipe's order."""
        done: list[str] = []

        def visit(name: str, path: list[str]) -> None:
            if name in done:
                return
            if name in path:
                cycle = " -> ".join([*path[path.index(name) :], name])
                raise UserError(f"{self.source}: stages: dependency cycle {cycle}")
            for dep in self.deps(name):
                visit(dep, [*path, name])
            done.append(name)

        for name in self.stages:
            visit(name, [])
        return done

    def resolve_targets(self, targets: list[str]) -> list[str]:
        """Stage names for targets given as stage names or kinds (`sft` = every sft stage)."""
        names: list[str] = []
        for target in targets:
            if target in self.stages:
                names.append(target)
                continue
            of_kind = [n for n, s in self.stages.items() if s.kind == target]
            if not of_kind:
                known = ", ".join(self.stages)
                raise UserError(
                    f"{self.source}: no stage or stage kind named '{target}' (stages: {known})"
                )
            names.extend(of_kind)
        return list(dict.fromkeys(names))


def spec_class(kind: str) -> type[StageSpec]:
    module = importlib.import_module(STAGE_MODULES[kind])
    return module.Spec


def stage_module(kind: str) -> Any:
    return importlib.import_module(STAGE_MODULES[kind])


# --------------------------------------------------------------------------- loading


def load_recipe(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), deep: bool = True
) -> Recipe:
    """Read, override and validate a recipe. Every mistake becomes a one-line UserError.

    `deep=False` skips checks that import heavy libraries (a merge against mergekit's registry):
    for commands that only read state, like `upstack status`.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping with at least `name` and `stages`")

    for item in overrides:
        key_path, value = _parse_override(item)
        _set_path(raw, key_path, value, item)

    def where(loc: tuple[str | int, ...]) -> str:
        return _locate(root, str(path), overrides, loc)

    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise UserError(
            f"{where(('stages',))}: stages: a mapping of stage name -> settings is required"
        )

    stages: dict[str, StageSpec] = {}
    for name, body in stages_raw.items():
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise UserError(
                f"{where(('stages', name))}: stages.{name}: must be a mapping of settings"
            )
        kind = body.get("kind", name)
        if kind not in STAGE_MODULES:
            loc = ("stages", name, "kind") if "kind" in body else ("stages", name)
            known = ", ".join(STAGE_MODULES)
            raise UserError(
                f"{where(loc)}: {'.'.join(map(str, loc))}: unknown stage kind '{kind}' (known: {known})"
            )
        try:
            stages[name] = spec_class(kind).model_validate(
                {**body, "kind": kind}, context={"deep": deep}
            )
        except ValidationError as err:
            raise UserError(_describe(err, ("stages", name), where)) from None

    try:
        recipe = Recipe.model_validate({**raw, "stages": {}})
    except ValidationError as err:
        raise UserError(_describe(err, (), where)) from None
    recipe.stages = stages
    recipe.source = str(path)
    recipe.overrides = list(overrides)

    for name, spec in stages.items():
        for key, ref in spec.refs().items():
            if ref in stages or "/" in ref or Path(ref).exists():
                continue  # a stage, or a local path / Hub id that the stage resolves at run time
            loc = ("stages", name, *(int(k) if k.isdigit() else k for k in key.split(".")))
            raise UserError(
                f"{where(loc)}: stages.{name}.{key}: '{ref}' is not a stage of this recipe, "
                "an existing path, or a Hub id (org/name)"
            )
        for i, dep in enumerate(spec.after):
            if dep not in stages:
                raise UserError(
                    f"{where(('stages', name, 'after', i))}: stages.{name}.after: no stage '{dep}'"
                )
    recipe.order()  # raises on a cycle
    return recipe


def locate(recipe: Recipe, *loc: str | int) -> str:
    """`FILE:LINE` (or `--set ITEM`) of a recipe key, for errors found after loading (at run time)."""
    try:
        root = yaml.compose(Path(recipe.source).read_text())
    except (OSError, yaml.YAMLError):
        root = None
    loc = tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in loc)
    return _locate(root, recipe.source, recipe.overrides, loc)


def _locate(root: yaml.Node | None, source: str, overrides, loc: tuple[str | int, ...]) -> str:
    """Where a key came from: the `--set` that touched it, else the file and line that hold it."""
    keys = tuple(str(k) for k in loc)
    for item in overrides:
        key_path = tuple(item.split("=", 1)[0].split("."))
        if keys[: len(key_path)] == key_path or key_path[: len(keys)] == keys:
            return f"--set {item}"
    line = _line_of(root, loc)
    return f"{source}:{line}" if line else source


def _describe(err: ValidationError, prefix: tuple, where) -> str:
    first = err.errors()[0]
    loc = (*prefix, *first["loc"])
    key = ".".join(str(k) for k in loc)
    kind = first["type"]
    if kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "missing":
        message = "required key is missing"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if "input" in first and not isinstance(first["input"], dict | list):
            message += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    suffix = f" (and {more} more)" if more else ""
    return f"{where(loc)}: {key}: {message}{suffix}"


_OVERRIDE = re.compile(r"^([A-Za-z_][\w-]*(?:\.[\w-]+)*)=(.*)$", re.S)


def _parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    match = _OVERRIDE.match(item)
    if not match:
        raise UserError(
            f"--set {item}: expected key.path=value, e.g. stages.sft.trainer.learning_rate=1e-5"
        )
    try:
        value = yaml.safe_load(match.group(2)) if match.group(2) else ""
    except yaml.YAMLError:
        value = match.group(2)  # not YAML: keep the literal text
    return tuple(match.group(1).split(".")), value


def _set_path(raw: dict, key_path: tuple[str, ...], value: Any, item: str) -> None:
    node: Any = raw
    for i, key in enumerate(key_path[:-1]):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
            continue
        if not isinstance(node, dict):
            raise UserError(f"--set {item}: {'.'.join(key_path[:i])} is not a mapping")
        node = node.setdefault(key, {})
    last = key_path[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"--set {item}: {'.'.join(key_path[:-1])} is not a mapping")


def _line_of(node: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the deepest part of `loc` that exists in the YAML tree."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line
