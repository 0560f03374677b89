"""The recipe a user edits: typed stage specs, `--set` overrides, and errors that name file, line and key."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import Field, ValidationError, field_validator

from data_synth.config import key_path
from upstack.core import registry
from upstack.core.errors import UserError, is_secret_key, looks_like_secret
from upstack.core.keys import KeyPath
from upstack.core.refs import Reference, declared, resolve
from upstack.core.rundir import RunDir
from upstack.core.settings import STAGE_NAME, StageSpec, Strict, did_you_mean
from upstack.core.sweeps import LOWER_IS_BETTER, Sweep, SweepPlan, SweepProblem, expand
from upstack.core.yamltext import (
    construct,
    finite,
    leaves,
    located,
    parse_override,
    parse_yaml,
    read_text,
    set_path,
)

__all__ = ["Recipe", "load_recipe", "locate"]


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
    # The hardware training runs on, for what is decided before it runs: `upstack plan`'s default
    # GPUs, the memory a training stage is checked against before the run, and the GPUs
    # `target_layers: auto` sizes a DUS model for.
    gpus: str | None = Field(
        None,
        description="the GPUs the training stages run on, e.g. 8xH100-80GB or 8x80GB (per node); "
        "default for the fit check: this machine's (nvidia-smi)",
    )
    fit_check: bool = Field(
        True,
        description="before the run, refuse a training stage whose planned memory per GPU "
        "exceeds the GPUs' (upstack plan); false, or `upstack run --no-fit-check`, runs it anyway",
    )
    # Several machines: every one runs the same `upstack run` with its own machine_rank; only
    # machine 0 writes stage dirs and manifests (upstack.core.runner.secondary_node).
    num_machines: int | None = Field(None, ge=1, description="machines; env NNODES overrides")
    machine_rank: int | None = Field(
        None, ge=0, description="this machine's rank, 0 on the main one; env NODE_RANK overrides"
    )
    main_process_ip: str | None = Field(
        None, description="the main machine's address; env MASTER_ADDR overrides"
    )
    main_process_port: int | None = Field(
        None, ge=1, le=65535, description="its rendezvous port; env MASTER_PORT overrides"
    )
    # How much work a kill may cost, whatever the trainer's save_steps: a training stage also
    # saves a checkpoint every this many minutes (not part of any stage's hash: it changes no
    # result, only what a rerun can resume from).
    checkpoint_minutes: float = Field(
        30.0, gt=0, description="training stages checkpoint at least this often"
    )
    grace_seconds: float = Field(
        120.0,
        gt=0,
        description="after SIGTERM or Ctrl-C, how long a training stage may take to save a "
        "checkpoint and stop (Slurm's KillWait and Kubernetes' terminationGracePeriodSeconds "
        "should allow it)",
    )

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, value: str | None) -> str | None:
        from upstack.core.hardware import gpus_problem

        problem = gpus_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("accelerate_config")
    @classmethod
    def _config_file(cls, value: str | None) -> str | None:
        """A missing or unreadable file is found at load, not when the training stage starts
        after the stages before it ran."""
        if value is not None:
            problem = accelerate_config_problem(value)
            if problem:
                raise ValueError(problem)
        return value


def accelerate_config_problem(
    path: str, stages: dict[str, dict[str, Any]] | None = None
) -> str | None:
    """Why `path` is not an accelerate config file upstack can pass on, or None: the file itself
    (at load), and with `stages` (each launched training stage's effective trainer settings on
    this machine, which the runner knows before anything runs) whether it agrees with them."""
    file = Path(path).expanduser()
    if not file.is_file():
        return f"{path}: file not found"
    try:
        config = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        return f"{path}: not a readable YAML file ({str(err).splitlines()[0]})"
    if not isinstance(config, dict):
        return f"{path}: an accelerate config is a mapping (accelerate config --config_file ...)"
    problem = _saves_a_full_model(config) or _agrees_with_stages(config, stages or {})
    return f"{path}: {problem}" if problem else None


def _deepspeed_settings(config: dict) -> tuple[dict, str]:
    """The DeepSpeed settings an accelerate config gives: its `deepspeed_config` keys, or the
    JSON file it names (deepspeed_config_file), read into the same keys; and where they are."""
    section = config.get("deepspeed_config") or {}
    if not isinstance(section, dict):
        return {}, "deepspeed_config"
    name = section.get("deepspeed_config_file")
    if not name:
        return section, "deepspeed_config"
    try:
        data = json.loads(Path(name).expanduser().read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"deepspeed_config.deepspeed_config_file: {name}: {err}") from None
    zero = data.get("zero_optimization") or {}
    precision = "bf16" if (data.get("bf16") or {}).get("enabled") is True else None
    precision = precision or ("fp16" if (data.get("fp16") or {}).get("enabled") is True else None)
    return {
        "zero_stage": zero.get("stage"),
        "zero3_save_16bit_model": zero.get("stage3_gather_16bit_weights_on_model_save"),
        "gradient_accumulation_steps": data.get("gradient_accumulation_steps"),
        "mixed_precision": precision,
    }, f"{name}: "


def _saves_a_full_model(config: dict) -> str | None:
    """A training stage's output is one plain checkpoint; a config whose final save would be
    sharded (one file per rank, which no next stage or mergekit loads) is refused."""
    kind = config.get("distributed_type")
    if kind == "DEEPSPEED":
        try:
            ds, where = _deepspeed_settings(config)
        except ValueError as err:
            return str(err)
        if str(ds.get("zero_stage")) == "3" and ds.get("zero3_save_16bit_model") is not True:
            key = (
                "zero_optimization.stage3_gather_16bit_weights_on_model_save"
                if where.endswith(": ")
                else "deepspeed_config.zero3_save_16bit_model"
            )
            return (
                f"{where if where.endswith(': ') else ''}{key}: must be true: ZeRO-3 holds "
                "only shards, and without it the stage's final save is not the full model the "
                "next stage loads"
            )
    if kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        state = fsdp.get("fsdp_state_dict_type") if isinstance(fsdp, dict) else None
        if state != "FULL_STATE_DICT":
            return (
                f"fsdp_config.fsdp_state_dict_type: {state or '(unset)'}: must be "
                "FULL_STATE_DICT: the stage saves one full model (gathered on rank 0); a sharded "
                "state dict leaves no model.safetensors for the next stage"
            )
    return None


def _agrees_with_stages(config: dict, stages: dict[str, dict[str, Any]]) -> str | None:
    """The config's precision and DeepSpeed's gradient accumulation against each launched
    stage's trainer settings: accelerate and DeepSpeed would take theirs over the recipe's."""
    for name, settings in stages.items():
        wanted = "bf16" if settings.get("bf16") else "fp16" if settings.get("fp16") else "no"
        mixed = config.get("mixed_precision") or "no"
        if mixed != "no" and mixed != wanted:
            return (
                f"mixed_precision: '{mixed}', but stages.{name} trains in "
                f"{'fp32' if wanted == 'no' else wanted} on this machine (trainer.bf16/fp16): "
                "set mixed_precision: 'no' (the stage's trainer setting decides)"
            )
        if config.get("distributed_type") != "DEEPSPEED":
            continue
        try:
            ds, where = _deepspeed_settings(config)
        except ValueError as err:
            return str(err)
        prefix = where if where.endswith(": ") else "deepspeed_config."
        if ds.get("mixed_precision") and ds["mixed_precision"] != wanted:
            return (
                f"{prefix}{ds['mixed_precision']}.enabled: true, but stages.{name} trains in "
                f"{'fp32' if wanted == 'no' else wanted} on this machine (trainer.bf16/fp16)"
            )
        steps = ds.get("gradient_accumulation_steps")
        accumulate = int(settings.get("gradient_accumulation_steps") or 1)
        if steps not in (None, "auto") and str(steps) != str(accumulate):
            return (
                f"{prefix}gradient_accumulation_steps: {steps}, but stages.{name} accumulates "
                f"{accumulate} (trainer.gradient_accumulation_steps): set it to 'auto' or "
                f"{accumulate}"
            )
    return None


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    # numpy (datasets' shuffles) takes seeds below 2**32
    seed: int = Field(42, ge=0, lt=2**32)
    output_dir: str | None = Field(
        None, description="where the stages write (~ expanded); default: runs/<name>"
    )
    trust_remote_code: bool = Field(
        False, description="let transformers run code shipped with a model"
    )
    allow_pickle: bool = Field(
        False,
        description="load pickled checkpoints (pytorch_model.bin): unpickling runs code from the "
        "file, so upstack loads safetensors only unless you trust every model",
    )
    launch: Launch = Field(default_factory=Launch)
    stages: dict[str, StageSpec]

    # Set by load_recipe, not by the YAML: where the recipe came from, so a subprocess
    # (accelerate launch) can load exactly the same recipe again; and each stage's references.
    source: str = Field("", exclude=True)
    # The text loaded, when it was given rather than read from `source` (a recipe checked before
    # it is written): errors found after loading are placed in it, not in the file.
    source_text: str | None = Field(None, exclude=True)
    overrides: list[str] = Field(default_factory=list, exclude=True)
    references: dict[str, list[Reference]] = Field(default_factory=dict, exclude=True)
    # A stage with `sweep:` -> its plan: the variant stages load added, and the eval that scores them.
    sweeps: dict[str, Any] = Field(default_factory=dict, exclude=True)
    # A stage whose settings its `settle` hook decided at load -> how (upscale's depth search)
    settled: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}").expanduser()

    @property
    def run_dir(self) -> RunDir:
        """Every path of a run: stage dirs, work dirs, temp dirs, manifests, the lock."""
        return RunDir(self.out_dir)

    @field_validator("output_dir")
    @classmethod
    def _a_dir_of_its_own(cls, value: str | None) -> str | None:
        """Stages are directories right under output_dir, and upstack keeps a `.upstack/` there:
        the file system's root or a home directory is no place for them."""
        if value is None:
            return value
        path = Path(value).expanduser().resolve()
        if path == Path(path.anchor):
            raise ValueError(f"{value} is the file system's root: give the runs a directory")
        if path == Path.home().resolve():
            raise ValueError(f"{value} is your home directory: give the runs a directory")
        return value

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe, defaults filled in, as plain data."""
        data = self.model_dump(mode="json", exclude={"stages"})
        data["stages"] = {n: s.model_dump(mode="json") for n, s in self.stages.items()}
        return data

    def refs(self, stage: str) -> list[Reference]:
        """The models and data sets `stage` names, resolved."""
        return self.references.get(stage, [])

    def deps(self, stage: str) -> list[str]:
        """The stages `stage` reads from or is ordered after."""
        read = [ref.stage for ref in self.refs(stage) if ref.stage]
        # a sweep's pick reads its variants and the eval that scored them
        plan = self.sweeps.get(stage)
        picked = [*(v.name for v in plan.variants), plan.scored_by] if plan else []
        return list(dict.fromkeys([*read, *picked, *self.stages[stage].after]))

    def source_loc(self, loc) -> KeyPath:
        """Where key path `loc` is written in the recipe file: a sweep variant's settings are the
        sweep stage's, its swept value an entry of the sweep's grid."""
        return _source_loc(self.sweeps, loc)

    def error(self, loc, message: str, error: type[UserError] = UserError) -> UserError:
        """The one-line error for the recipe key `loc` (a variant's key: where it is written)."""
        loc = KeyPath.of(loc)
        place = self.source_loc(loc)
        if place != loc:
            message += f" (in sweep variant {loc[1]})"
        return error(f"{locate(self, *place)}: {place}: {message}")

    def order(self) -> list[str]:
        """All stages, each after its dependencies; ties keep the recipe's order."""
        done: list[str] = []

        def visit(name: str, path: list[str]) -> None:
            if name in done:
                return
            if name in path:
                cycle = " -> ".join([*path[path.index(name) :], name])
                where = locate(self, "stages", name)
                raise UserError(f"{where}: stages.{name}: dependency cycle {cycle}")
            for dep in self.deps(name):
                visit(dep, [*path, name])
            done.append(name)

        for name in self.stages:
            visit(name, [])
        return done

    def stages_with(self, **declared: object) -> list[str]:
        """The stages, in run order, whose kind declares these values (upstack.core.contract):
        `stages_with(output="results")` are the eval stages."""
        return [
            name
            for name in self.order()
            if all(
                getattr(registry.kind(self.stages[name].kind), key) == value
                for key, value in declared.items()
            )
        ]

    def resolve_targets(self, targets: list[str]) -> list[str]:
        """Stage names for targets given as stage names or kinds (`sft` = every sft stage)."""
        names: list[str] = []
        for target in targets:
            if target in self.stages:
                names.append(target)
                continue
            of_kind = [n for n, s in self.stages.items() if s.kind == target]
            if not of_kind:
                known = [*self.stages, *(s.kind for s in self.stages.values())]
                raise UserError(
                    f"{self.source}: no stage or stage kind named '{target}'"
                    f"{did_you_mean(target, known)} (stages: {', '.join(self.stages)})"
                )
            names.extend(of_kind)
        return list(dict.fromkeys(names))


# --------------------------------------------------------------------------- loading


def load_recipe(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    deep: bool = True,
    text: str | None = None,
) -> Recipe:
    """Read, override and validate a recipe. Every mistake becomes a one-line UserError.

    `deep=False` skips checks that import heavy libraries (a merge against mergekit's registry):
    for commands that only read state, like `upstack status`.
    `text` is loaded instead of the file at `path`, which still names it in errors: a recipe
    checked before it is written (`upstack import-merge --into`), with no file of its own.
    """
    written = _read(Path(path), list(overrides), text)
    _check_top_level(written)
    stages_raw, plans = _expand_sweeps(written)
    kinds = _kinds(stages_raw)
    stages = _validate_stages(written, stages_raw, plans, deep)
    try:
        recipe = Recipe.model_validate({**written.raw, "stages": {}})
    except ValidationError as err:
        raise UserError(_describe(err, (), written.raw, Recipe, written.where)) from None
    recipe.stages = stages
    recipe.source = str(written.path)
    recipe.source_text = text
    recipe.overrides = written.overrides
    recipe.sweeps = plans
    _resolve_references(recipe, kinds, written)
    recipe.order()  # raises on a cycle, before anything walks the graph (planned shapes)
    _settle(recipe)
    _check_sweep_metrics(recipe)
    if deep:
        # checks that need the other stages: a merge's parameters on its models' architecture
        for name, spec in stages.items():
            registry.kind(spec.kind).check_at_load(spec, recipe, name)
    return recipe


@dataclass
class _Written:
    """A recipe as written: its data (overrides applied), and where each key of it is."""

    path: Path
    root: yaml.Node | None
    raw: dict
    overrides: list[str]

    def where(self, loc) -> str:
        """`FILE:LINE` of key path `loc`, or the `--set` that gave it."""
        return located(self.root, str(self.path), self.overrides, KeyPath.of(loc))

    def error(self, loc, message: str) -> UserError:
        loc = KeyPath.of(loc)
        return UserError(f"{self.where(loc)}: {loc}: {message}")


def _read(path: Path, overrides: list[str], text: str | None = None) -> _Written:
    """The recipe's data (`text`, else the file's): UTF-8, YAML of bounded size, a mapping,
    `--set` applied, every number finite (a NaN or infinite setting is never what anyone meant:
    .nan, .inf, 1e999, anywhere, upstack's keys, TRL's, mergekit's, a sweep's grid)."""
    text = read_text(path) if text is None else text
    root = parse_yaml(text, str(path))
    raw = construct(text, str(path))
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping with at least `name` and `stages`")
    for item in overrides:
        key_path, value = parse_override(item)
        set_path(raw, key_path, value, item)
    written = _Written(path, root, raw, overrides)
    for loc, value in leaves(raw):
        if not finite(value):
            raise written.error(loc, f"not a finite number (got {value!r})")
    return written


def _check_top_level(written: _Written) -> None:
    """Known top-level keys (the top level first: `stage:` for `stages:` is a typo, not a
    missing `stages`), a mapping of stages, stage names that are names."""
    top_level = [k for k, f in Recipe.model_fields.items() if not f.exclude]
    for key in written.raw:
        if key not in top_level:
            raise written.error((key,), f"unknown key{did_you_mean(str(key), top_level)}")
    stages_raw = written.raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise written.error(("stages",), "a mapping of stage name -> settings is required")
    for name in stages_raw:
        if not isinstance(name, str) or not STAGE_NAME.match(name):
            raise written.error(
                ("stages", name),
                "a stage name is letters, digits, _ and - (it names the stage's directory under "
                "output_dir, so nothing else may be in it: no /, no .., no spaces)",
            )


def _expand_sweeps(written: _Written) -> tuple[dict[str, Any], dict[str, SweepPlan]]:
    """The stages with every sweep's variants added. A variant becomes a stage of its own before
    anything is validated, so each is checked, resolved and cached like any stage; its mistakes
    are placed where they are written."""
    stages_raw = written.raw["stages"]
    kinds = _kinds(stages_raw)
    sweeps: dict[str, Sweep] = {}
    for name, body in stages_raw.items():
        if isinstance(body, dict) and body.get("sweep") is not None and _sweepable(kinds[name]):
            try:
                sweeps[name] = Sweep.model_validate(body["sweep"])
            except ValidationError as err:
                loc = ("stages", name, "sweep")
                raise UserError(_describe(err, loc, body["sweep"], Sweep, written.where)) from None
    try:
        return expand(stages_raw, sweeps, kinds)
    except SweepProblem as err:
        raise written.error(err.loc, str(err)) from None


def _validate_stages(
    written: _Written, stages_raw: dict[str, Any], plans: dict[str, SweepPlan], deep: bool
) -> dict[str, StageSpec]:
    """Each stage's settings, validated by its kind's settings model."""
    kinds = _kinds(stages_raw)

    def place(loc: tuple) -> tuple:
        return _source_loc(plans, loc)

    stages: dict[str, StageSpec] = {}
    for name, body in stages_raw.items():
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise written.error(("stages", name), "must be a mapping of settings")
        kind = body.get("kind", name)
        if not isinstance(kind, str) or not registry.known(kind):
            loc = ("stages", name, "kind") if "kind" in body else ("stages", name)
            known = ", ".join(registry.STAGE_MODULES)
            hint = did_you_mean(str(kind), registry.STAGE_MODULES)
            raise written.error(loc, f"unknown stage kind '{kind}'{hint} (known: {known})")
        stage_kind = registry.kind(kind)
        try:
            context = {"deep": deep, "stages": kinds, "recipe_dir": written.path.parent}
            stages[name] = stage_kind.validate({**body, "kind": kind}, context=context)
        except ValidationError as err:
            spec_class = stage_kind.spec_class(body)
            raise UserError(
                _describe(err, ("stages", name), body, spec_class, written.where, place)
            ) from None
    return stages


def _resolve_references(recipe: Recipe, kinds: dict[str, str], written: _Written) -> None:
    """Every name a stage's settings hold, resolved once (upstack.core.refs); `after:` names
    stages."""
    for name, spec in recipe.stages.items():
        refs = []
        for found in declared(spec):
            try:
                refs.append(resolve(found, kinds, recipe.out_dir, sweeps=recipe.sweeps))
            except ValueError as err:
                raise recipe.error(("stages", name, *found.key), str(err)) from None
        recipe.references[name] = refs
        _check_inputs_outside_outputs(recipe, name, refs)
        for i, dep in enumerate(spec.after):
            if dep not in recipe.stages:
                hint = did_you_mean(dep, list(recipe.stages))
                raise written.error(("stages", name, "after", i), f"no stage '{dep}'{hint}")


def _settle(recipe: Recipe) -> None:
    """Settings a stage leaves to the rest of the recipe (the `settle` hook: upscale's
    `target_layers: auto`), decided in run order, so a stage below sees its input settled."""
    for name in recipe.order():
        spec = recipe.stages[name]
        settled = registry.kind(spec.kind).settle(spec, recipe, name)
        if settled is not None:
            recipe.stages[name] = settled


def _kinds(stages_raw: dict) -> dict[str, str]:
    return {
        name: (body.get("kind", name) if isinstance(body, dict) else name)
        for name, body in stages_raw.items()
    }


def _sweepable(kind: Any) -> bool:
    """A kind whose settings take a `sweep:` (merge); elsewhere the key is an unknown key."""
    return (
        isinstance(kind, str) and registry.known(kind) and "sweep" in registry.kind(kind).fields()
    )


def _source_loc(plans: dict[str, SweepPlan], loc) -> KeyPath:
    loc = KeyPath.of(loc)
    if len(loc) >= 2 and loc[0] == "stages":
        for plan in plans.values():
            if any(v.name == loc[1] for v in plan.variants):
                return KeyPath(plan.source_loc(loc[1], loc[2:]))
    return loc


def _check_inputs_outside_outputs(recipe: Recipe, stage: str, refs: list[Reference]) -> None:
    """A local file or dir a stage reads must not lie where a run writes: inside a stage's
    directory (replaced when that stage reruns) or upstack's own `.upstack/`."""
    run_dir = recipe.run_dir
    written = {name: run_dir.stage(name) for name in recipe.stages}
    written[".upstack"] = run_dir.internal
    for ref in refs:
        if ref.origin != "path":
            continue
        path = Path(ref.location).resolve()
        for owner, place in written.items():
            if path == place.resolve() and owner != ".upstack":
                raise recipe.error(
                    ("stages", stage, *ref.loc),
                    f"{ref.text} is the output of stage '{owner}': name the stage ({owner}), so "
                    "the run knows to build it first",
                )
            if path == place.resolve() or place.resolve() in path.parents:
                what = "upstack's own files" if owner == ".upstack" else f"stage '{owner}''s output"
                raise recipe.error(
                    ("stages", stage, *ref.loc),
                    f"{ref.text} is inside {place}, {what}, which a run replaces: keep inputs "
                    "outside the stage directories of output_dir",
                )


def _check_sweep_metrics(recipe: Recipe) -> None:
    """A sweep's metric must be one its scoring eval measures: found now, not after every variant ran."""
    for name, plan in recipe.sweeps.items():
        scorer = recipe.stages[plan.scored_by]
        measures = registry.kind(scorer.kind).measures(scorer)
        if plan.metric in measures or any(
            m.endswith("/") and plan.metric.startswith(m) for m in measures
        ):
            continue
        shown = ", ".join(m + ("<metric>" if m.endswith("/") else "") for m in measures)
        hint = " (lower is better)" if plan.metric in LOWER_IS_BETTER else ""
        raise recipe.error(
            ("stages", name, "sweep", "metric"),
            f"eval stage '{plan.scored_by}' does not measure {plan.metric}{hint}; "
            f"it measures: {shown or 'nothing'}",
        )


def output_dir_of(raw: Any, overrides: list[str] | tuple[str, ...] = ()) -> Path | None:
    """The output dir a recipe's raw YAML names, overrides applied, without validating the rest."""
    if not isinstance(raw, dict):
        return None
    for item in overrides:
        key_path, value = parse_override(item)
        set_path(raw, key_path, value, item)
    if raw.get("output_dir"):
        return Path(str(raw["output_dir"]))
    return Path(f"runs/{raw['name']}") if isinstance(raw.get("name"), str) else None


def locate(recipe: Recipe, *loc: str | int) -> str:
    """`FILE:LINE` (or `--set ITEM`) of a recipe key, for errors found after loading (at run time)."""
    try:
        text = recipe.source_text
        root = yaml.compose(Path(recipe.source).read_text() if text is None else text)
    except (OSError, yaml.YAMLError):
        root = None
    loc = recipe.source_loc(loc)
    return located(root, recipe.source, recipe.overrides, loc)


def _describe(err: ValidationError, prefix: tuple, raw: Any, model: type, where, place=None) -> str:
    """pydantic's first error as one line: the key path as `--set` writes it (no union tags),
    "did you mean" for an unknown key, the offending value unless it looks like a secret."""
    errors = err.errors()
    # an unknown key beside a missing one is most likely its typo: name the typo. Else the error
    # that reaches deepest into what the user wrote: a union (`experts: 2` or a list of experts)
    # reports each member's complaint, and the one about the value given is the one that helps
    first = next((e for e in errors if e["type"] == "extra_forbidden"), None)
    first = first or max(errors, key=lambda e: _depth(e["loc"], raw))
    loc = key_path(first["loc"], raw)
    key = str(KeyPath((*prefix, *loc)))
    kind = first["type"]
    if kind == "extra_forbidden":
        message = "unknown key" + did_you_mean(str(loc[-1]), _fields_at(model, loc[:-1]))
    elif kind == "missing":
        message = "required key is missing"
    else:
        message = first["msg"].removeprefix("Value error, ")
        value = first.get("input")
        secret = looks_like_secret(value) or (loc and is_secret_key(loc[-1]))
        named = "input" in first and not isinstance(value, dict | list) and not secret
        if named and repr(value) not in message:  # a validator's own message may name it
            message += f" (got {value!r})"
    more = len(errors) - 1
    suffix = f" (and {more} more)" if more else ""
    full = (*prefix, *loc)
    shown = place(full) if place else full
    if shown != full:  # a sweep variant: where its setting is written, and which variant it is
        key = str(KeyPath(shown))
        suffix += f" (in sweep variant {prefix[1]})"
    return f"{where(shown)}: {key}: {message}{suffix}"


def _depth(loc: tuple, raw: Any) -> int:
    """How many keys of `loc` exist in the raw settings, in order (union tags skipped)."""
    depth, node = 0, raw
    for key in loc:
        if (isinstance(node, dict) and key in node) or (
            isinstance(node, list) and isinstance(key, int) and key < len(node)
        ):
            node, depth = node[key], depth + 1
        elif isinstance(node, dict | list):
            continue  # a union member's name between two keys
        else:
            break
    return depth


def _fields_at(model: type, loc: tuple) -> list[str]:
    """The field names of the settings model(s) at key path `loc` below `model`."""
    models = [model]
    for key in loc:
        if isinstance(key, int):
            continue  # a list index: the element models are already in hand
        models = [
            found
            for m in models
            if key in m.model_fields
            for found in _models_in(m.model_fields[key].annotation)
        ]
    return sorted({name for m in models for name in m.model_fields})


def _models_in(annotation: Any) -> list[type]:
    """The pydantic models a field annotation holds (through unions, lists, dicts, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, Strict):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]
