"""merge stage: mergekit's own configuration, stage names wherever a model goes, checked at load; or a sweep over it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from upstack.core import check_cache
from upstack.core.keys import KeyPath
from upstack.core.refs import Declared
from upstack.core.settings import StageSpec, error_at
from upstack.core.sweeps import Sweep
from upstack.models import mergekit_facts, merging
from upstack.models.checkpoints import count_parameters

# The stage contract (upstack.core.contract)
OUTPUT = "model"  # a checkpoint
LAYER_MAP = "keeps"  # a layer map passes through a merge of one lineage
LAUNCHABLE = False

# Files a checkpoint needs beside its weights that not every mergekit code path carries over
# (a `tokenizer_source` merge re-serializes the tokenizer and drops generation_config.json).
CARRIED_FILES = ("generation_config.json", "chat_template.jinja")


class Spec(StageSpec):
    """mergekit's configuration as mergekit defines it: every key but upstack's own is mergekit's
    (models or slices or modules, parameters, base_model, tokenizer, chat_template, dtype, ...),
    checked at load against mergekit's MergeConfiguration and merge method registry, with stage
    names (and `<sweep>.best`) allowed wherever a model goes."""

    # mergekit's keys are kept as written (model_extra) and handed to mergekit's own models:
    # declaring them here again would drift from the mergekit that runs them
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    kind: Literal["merge"] = "merge"
    # Each shard is written and freed before the next; with lazy per-tensor loading this is
    # what bounds peak memory, not the model size.
    out_shard_size: int | str = Field(
        "5B", description="parameters per output shard: 500M, 5B, ..."
    )
    sweep: Sweep | None = Field(
        None,
        description="a grid over this merge's settings: each combination a stage, this one the "
        "variant its eval scores best (`model: <this>.best`)",
    )

    @property
    def mergekit(self) -> dict[str, Any]:
        """The mergekit config as the recipe writes it (stage names not yet resolved)."""
        return dict(self.model_extra or {})

    def declared_names(self) -> list[Declared]:
        """The models the mergekit config names, found where mergekit's types put models."""
        return [
            Declared(
                key=name.loc,
                text=name.text,
                thing="model",
                where="any",
                use="adapter" if name.lora else "tokenizer" if name.tokenizer else "weights",
                kinds=(),
            )
            for name in merging.model_names(self.mergekit)
        ]

    @model_validator(mode="after")
    def _check_against_mergekit(self, info: ValidationInfo) -> Spec:
        if not (info.context or {}).get("deep", True):
            return self  # `upstack status`/`report`: importing mergekit (peft, torch) costs ~8 s
        if self.sweep is not None:
            return self  # the pick merges nothing: each variant is checked as a merge of its own
        # what mergekit's cached facts refuse needs no mergekit: a typo is refused in a second;
        # a key a model card carries that mergekit takes otherwise says how first
        ours = [name for name in Spec.model_fields if name != "kind"]
        problem = merging.instead_problem(self.mergekit)
        problem = problem or mergekit_facts.quick_problem(self.mergekit, ours)
        if problem:
            raise error_at(*problem)
        # a config mergekit accepted before is not re-checked: importing mergekit costs ~5-9 s
        inputs = [self.mergekit, self.out_shard_size]
        if check_cache.passed("merge.config", inputs, CHECKED_WITH):
            return self
        problem = mergekit_problem(self)
        if problem:
            raise error_at(*problem)
        check_cache.remember("merge.config", inputs, CHECKED_WITH)
        return self


CHECKED_WITH = ("mergekit", "transformers", "pydantic")  # the libraries a verdict depends on


def mergekit_problem(spec: Spec) -> tuple[tuple, str] | None:
    """(key path, message) for the first thing mergekit would reject when the merge runs, or None.

    mergekit only finds these once it has loaded every model; here they fail at recipe load.
    Checks that need the models' architecture are check_at_load's."""
    from mergekit.common import dtype_from_name, parse_kmb
    from mergekit.config import MergeConfiguration

    raw = spec.mergekit
    try:
        config = MergeConfiguration.model_validate(raw)
    except ValidationError as err:
        loc, message = merging.validation_problem(err, raw)
        return loc, f"mergekit: {message}"
    except RuntimeError as err:  # mergekit's cross-field checks raise RuntimeError, not ValueError
        return (), f"mergekit: {err}"

    method, problem = merging.merge_method(config.merge_method)
    if problem:
        return problem
    for key in ("dtype", "out_dtype"):
        try:
            dtype_from_name(raw.get(key))
        except RuntimeError:
            return (key,), f"not a dtype mergekit knows (float32, bfloat16, ...): {raw[key]!r}"
    try:
        parse_kmb(spec.out_shard_size)
    except (ValueError, IndexError):
        return ("out_shard_size",), f"not a size like 500M or 5B (got {spec.out_shard_size!r})"
    return merging.inputs_problem(config, method) or merging.parameters_problem(config, method)


def ignored_parameters(spec: Spec) -> list[str]:
    from mergekit.config import MergeConfiguration

    return merging.ignored_parameters(MergeConfiguration.model_validate(spec.mergekit))


def check_at_load(spec: Spec, recipe, name: str) -> None:
    """What needs the other stages: LoRA adapters are adapters, every model is one mergekit can
    read (not a multimodal wrapper, no tied head its definition wants apart), and every parameter
    evaluates for every tensor mergekit will merge, on the models' architecture (their
    config.json, or what the recipe says a stage will build)."""
    if spec.sweep is not None:
        return
    refs = recipe.refs(name)
    for ref in refs:
        if ref.use == "adapter" and ref.origin == "stage":
            raise recipe.error(
                ("stages", name, *ref.loc),
                f"'{ref.text}' after `+` is a LoRA adapter: a directory or Hub id holding "
                "adapter_config.json, not a stage",
            )
        # a local path that is not here (a model card's author's: /home/author/models/x) is
        # refused now, not when the run reaches this stage
        if ref.origin == "path" and not Path(ref.location).exists():
            message = (
                f"{ref.location} is not a LoRA adapter dir (no adapter_config.json): no such "
                "directory here; replace it with an adapter dir or a Hub id (org/name)"
                if ref.use == "adapter"
                else f"{ref.location}: no such directory here: replace it with a stage of this "
                "recipe, a model dir or a Hub id (org/name)"
            )
            raise recipe.error(("stages", name, *ref.loc), message)
    by_text = {ref.text: ref for ref in refs if ref.use != "adapter"}
    models = {text: merging.config_source(ref, recipe) for text, ref in by_text.items()}
    if check_cache.passed("merge.tensors", [spec.mergekit, models], CHECKED_WITH):
        return
    from mergekit.config import MergeConfiguration

    for ref in refs:  # a model whose weights mergekit cannot read at all, named on its key
        problem = merging.model_problem(ref, recipe) if ref.use == "weights" else None
        if problem:
            raise recipe.error(("stages", name, *ref.loc), problem)
    config = MergeConfiguration.model_validate(spec.mergekit)
    method, _ = merging.merge_method(config.merge_method)
    problem = _layer_range_problem(config, by_text, recipe)
    problem = problem or merging.tensor_parameter_problem(
        config, method, lambda model: merging.model_config(by_text.get(model.model.path), recipe)
    )
    if problem:
        loc, message = problem
        raise recipe.error(("stages", name, *loc), message)
    check_cache.remember("merge.tensors", [spec.mergekit, models], CHECKED_WITH)


def _layer_range_problem(config: Any, by_text: dict, recipe) -> tuple[tuple, str] | None:
    for _, _, slices in merging.output_slices(config, ["default"]).values():
        for out in slices:
            for source in out.sources:
                model_config = merging.model_config(by_text.get(source.model.model.path), recipe)
                layers = getattr(model_config, "num_hidden_layers", None)
                if source.layer_range is None or layers is None or source.loc is None:
                    continue
                first, end = source.layer_range
                if end > layers:
                    return (*source.loc[:-1], "layer_range"), (
                        f"[{first}, {end}) goes past the {layers} layers of {source.model}"
                    )
    return None


def preflight(spec: Spec, ctx) -> None:
    """Before the runner writes anything: every local input is a loadable safetensors checkpoint
    (a LoRA adapter, an adapter dir), and all inputs have the same shapes, including those this
    run builds first (as the recipe gives them). Hub inputs are left to mergekit."""
    from upstack.models.checkpoints import check_model
    from upstack.models.shapes import SHAPE_KEYS, differences, planned_shape

    if spec.sweep is not None:
        return  # the pick reads what its variants and its eval wrote
    raw = spec.mergekit
    # a tokenizer merge aligns the vocabularies; slices may take layers from deeper models
    ignored = {"vocab_size"} if raw.get("tokenizer_source") or raw.get("tokenizer") else set()
    ignored |= {"num_hidden_layers"} if raw.get("slices") or raw.get("modules") else set()
    keys = tuple(k for k in SHAPE_KEYS if k not in ignored)
    shapes: dict[str, tuple[str, dict]] = {}
    for ref in ctx.refs():
        if ref.origin == "hub" or ref.use == "tokenizer":
            continue
        if ref.use == "adapter":
            adapter = Path(ref.location)
            if ref.origin == "path" and not (adapter / "adapter_config.json").is_file():
                raise ctx.fail(
                    ref.key, f"{adapter} is not a LoRA adapter dir (no adapter_config.json)"
                )
            continue
        check_model(ctx, ref.key)
        shape = planned_shape(ctx.recipe, ref, ctx.pending)
        if shape is None:
            continue
        for other_key, (other_text, other_shape) in shapes.items():
            differ = differences(shape, other_shape, keys)
            if differ:
                raise ctx.fail(
                    ref.key,
                    f"'{ref.text}' does not match '{other_text}' ({other_key}): "
                    f"{', '.join(differ)}; merged models need the same shapes",
                )
        shapes[ref.key] = (ref.text, shape)


def output_shape(spec: Spec, input_shape) -> dict | None:
    """The merged model has its first input's shape, with as many layers as its slices give (the
    vocab of a tokenizer merge is known only after)."""
    raw = spec.mergekit
    models = [n for n in merging.model_names(raw) if not n.tokenizer and not n.lora]
    if spec.sweep is not None or not models or raw.get("modules"):
        return None
    shape = input_shape(str(KeyPath(models[0].loc)))
    if shape is None:
        return None
    if isinstance(raw.get("slices"), list):
        try:
            ranges = [s["sources"][0]["layer_range"] for s in raw["slices"]]
            shape = {**shape, "num_hidden_layers": sum(end - first for first, end in ranges)}
        except (KeyError, IndexError, TypeError, ValueError):
            return None
    if raw.get("tokenizer_source") or raw.get("tokenizer"):
        shape = {**shape, "vocab_size": None}
    return shape


def mergekit_config(spec: Spec, location) -> dict[str, Any]:
    """The mergekit YAML for this stage, every model name replaced by `location(key path)`."""
    return merging.with_locations(spec.mergekit, lambda name: location(str(KeyPath(name.loc))))


def card_tags(spec: Spec) -> list[str]:
    return ["merge", "mergekit"]


def run(spec: Spec, ctx) -> dict:
    if spec.sweep is not None:
        from upstack.core.sweeps import pick_best

        return pick_best(ctx)
    import yaml
    from mergekit.common import parse_kmb
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = mergekit_config(spec, lambda key: ctx.ref(key).location)
    for ref in ctx.refs():
        if ref.origin == "stage" and not Path(ref.location, "config.json").is_file():
            raise ctx.fail(
                ref.key, f"stage '{ref.text}' wrote no model (no {ref.location}/config.json)"
            )
    # The exact config mergekit ran, paths resolved: `mergekit-yaml mergekit_config.yml OUT` redoes it.
    config_text = yaml.safe_dump(config, sort_keys=False)
    (ctx.out_dir / "mergekit_config.yml").write_text(config_text)
    merge_config = MergeConfiguration.model_validate(config)
    ctx.log(f"{merge_config.merge_method} over {len(merge_config.referenced_models())} models")
    for note in ignored_parameters(spec):
        ctx.log(f"note: {note}")
    # mergekit names a merged adapter by its paths only: a retrained adapter must not be reused
    lora_cache = ctx.work_dir / "lora-merged"
    shutil.rmtree(lora_cache, ignore_errors=True)
    run_merge(
        merge_config,
        str(ctx.out_dir),
        MergeOptions(
            copy_tokenizer=True,
            # a layer placed twice (a frankenmerge) would otherwise be one tensor saved twice
            clone_tensors=_repeats_layers(merge_config),
            # `model+lora`: mergekit merges the adapter into its model first, here
            lora_merge_cache=str(lora_cache),
            out_shard_size=parse_kmb(spec.out_shard_size),
            trust_remote_code=ctx.recipe.trust_remote_code,
            random_seed=ctx.seed,  # dare/della drop weights at random
            write_model_card=False,  # the push stage writes the card, with the whole lineage
            safe_serialization=True,
        ),
        config_source=config_text,
    )
    # mergekit's own donor for the tokenizer and config: the base model, else the first it lists
    donor = Path((merge_config.base_model or merge_config.referenced_models()[0]).model.path)
    for file_name in CARRIED_FILES:
        if (donor / file_name).is_file() and not (ctx.out_dir / file_name).exists():
            shutil.copy(donor / file_name, ctx.out_dir / file_name)
    return {
        "method": merge_config.merge_method,
        "models": [ref.text for ref in ctx.refs() if ref.use == "weights"],
        "base_model": spec.mergekit.get("base_model"),
        "parameters": count_parameters(ctx.out_dir),
    }


def _repeats_layers(config: Any) -> bool:
    """Whether some source layer is placed twice in the output."""
    seen: set[tuple[str, int]] = set()
    for out in config.slices or []:
        for source in out.sources:
            for layer in range(*source.layer_range):
                if (str(source.model), layer) in seen:
                    return True
                seen.add((str(source.model), layer))
    return False
