"""Sweeps: a grid over a stage's settings, expanded at load into variant stages, and the pick of the variant an eval scores best."""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from data_synth.config import Strict
from upstack.core import registry
from upstack.core.keys import KeyPath

Loc = tuple  # a key path: ("models", 0, "parameters", "weight")
KEY_PATH = re.compile(r"^[\w-]+(\.[\w-]+)*$")  # what `--set` takes after `stages.<name>.`
# keys a variant may not change: they say what the stage is and what it waits for
FIXED_KEYS = ("kind", "after", "sweep")
# measures where lower is better; every other one (accuracies, lm-eval scores) is higher-better
LOWER_IS_BETTER = ("loss", "perplexity")
PLOT = "sweep.png"
# every variant is a stage with a model of its own (gigabytes each at real sizes)
MAX_VARIANTS = 256
TABLE = "sweep.json"


class Axis(Strict):
    """One axis of the grid: the values one setting (or several, moved together) takes."""

    key: str | list[str] = Field(
        description="key path inside the stage, as --set writes it (models.0.parameters.weight); "
        "a list of paths moves them together, each value then a list with one item per path"
    )
    values: list[Any] = Field(min_length=1, description="the values, in the order to try them")

    @field_validator("key")
    @classmethod
    def _key_paths(cls, key: str | list[str]) -> str | list[str]:
        for path in [key] if isinstance(key, str) else key:
            if not KEY_PATH.match(path):
                raise ValueError(f"not a key path like models.0.parameters.weight: {path!r}")
            if path.split(".")[0] in FIXED_KEYS:
                raise ValueError(f"a variant cannot change `{path.split('.')[0]}`")
        if isinstance(key, list) and not key:
            raise ValueError("name at least one key path")
        return key


class Sweep(Strict):
    """A grid of variants of this stage, each a stage of its own (`<stage>-<label>-<value>`);
    the stage itself becomes the pick: a copy of the variant its eval stage scores best."""

    grid: list[Axis] = Field(
        min_length=1, description="axes; every combination of their values is one variant"
    )
    scored_by: str | None = Field(
        None, description="the eval stage that scores the variants; default: the only one"
    )
    metric: str = Field(
        "math_accuracy",
        description="the column of that eval's table that picks the best: math_accuracy, loss, "
        "perplexity, or an lm-eval score (arc_easy/acc)",
    )
    goal: Literal["max", "min"] | None = Field(
        None, description="default: min for loss and perplexity, max for every other measure"
    )

    @property
    def direction(self) -> str:
        return self.goal or ("min" if self.metric in LOWER_IS_BETTER else "max")


@dataclass
class Variant:
    name: str
    values: dict[str, Any]  # axis label -> the value this variant takes
    # each setting the grid gives it: (key path in the variant, key path in the sweep, value)
    settings: list[tuple[Loc, Loc, Any]] = field(default_factory=list)


@dataclass
class SweepPlan:
    """A sweep as the recipe runs it: its variant stages, and who picks among them."""

    stage: str
    variants: list[Variant]
    labels: list[str]  # short names of the axes (`weight`), as columns and in variant names
    keys: list[str]  # the axes' key paths, as the grid writes them
    scored_by: str
    metric: str
    goal: str

    def source_loc(self, variant: str, loc: Loc) -> Loc:
        """Where a variant's setting is written: its grid value, else the sweep stage's own key."""
        found = next(v for v in self.variants if v.name == variant)
        for inside, origin, _ in found.settings:
            if tuple(loc[: len(inside)]) == inside:
                return ("stages", self.stage, *origin, *loc[len(inside) :])
        return ("stages", self.stage, *loc)


class SweepProblem(ValueError):
    """A sweep that cannot be expanded, at key path `loc` (relative to the recipe)."""

    def __init__(self, loc: Loc, message: str):
        super().__init__(message)
        self.loc = loc


# --------------------------------------------------------------------------- expansion


def expand(
    stages: dict[str, Any], sweeps: dict[str, Sweep], kinds: dict[str, str]
) -> tuple[dict[str, Any], dict[str, SweepPlan]]:
    """The recipe's stages with every sweep's variants added (ordinary stages, each cached like
    any other), and each eval stage's listing of a sweep replaced by its variants (the scoring
    eval lists them even where the recipe does not).

    `stages`: raw stage bodies by name; `sweeps`: the validated `sweep:` blocks by stage name;
    `kinds`: stage name -> kind."""
    expanded = dict(stages)
    plans: dict[str, SweepPlan] = {}
    scorers = [name for name, kind in kinds.items() if scores(kind)]
    for name, sweep in sweeps.items():
        body = stages[name]
        scored_by = sweep.scored_by
        if scored_by is None:
            if len(scorers) != 1:
                raise SweepProblem(
                    ("stages", name, "sweep"),
                    f"name the eval stage that scores the variants in sweep.scored_by "
                    f"(this recipe has {len(scorers) or 'no'} eval stages"
                    + (f": {', '.join(scorers)})" if scorers else "; add one, kind: eval)"),
                )
            scored_by = scorers[0]
        elif not scores(kinds.get(scored_by)):
            what = f"a stage of kind {kinds[scored_by]}" if scored_by in kinds else "no stage"
            raise SweepProblem(
                ("stages", name, "sweep", "scored_by"),
                f"'{scored_by}' is {what}, not an eval stage",
            )
        variants, labels = _variants(name, sweep)
        for variant in variants:
            if variant.name in expanded:
                raise SweepProblem(
                    ("stages", variant.name),
                    f"this name belongs to a variant of sweep '{name}': rename the stage, or "
                    f"set stages.{name}.<key> (every variant) or stages.{name}.sweep.grid",
                )
            expanded[variant.name] = _variant_body(name, body, variant)
        keys = [a.key if isinstance(a.key, str) else ", ".join(a.key) for a in sweep.grid]
        plans[name] = SweepPlan(
            name, variants, labels, keys, scored_by, sweep.metric, sweep.direction
        )

    # In an eval's lists the sweep's name stands for what to compare: its variants. Anywhere
    # else (`after: [soup]` in a push) it is the pick, which comes after them all.
    for stage, body in list(expanded.items()):
        if not isinstance(body, dict) or not scores(kinds.get(stage)):
            continue
        body = expanded[stage] = dict(body)
        for key in ("after", "models"):
            if isinstance(body.get(key), list):
                body[key] = _listed_variants(body[key], plans)
        for plan in plans.values():
            if stage == plan.scored_by and not _lists_any(body, plan):
                key = "models" if isinstance(body.get("models"), list) else "after"
                body[key] = [*(body.get(key) or []), *(v.name for v in plan.variants)]
    return expanded, plans


def scores(kind: object) -> bool:
    """Whether stages of `kind` write a results table that can score a sweep's variants."""
    return (
        isinstance(kind, str) and registry.known(kind) and registry.kind(kind).output == "results"
    )


def _variants(stage: str, sweep: Sweep) -> tuple[list[Variant], list[str]]:
    """Every combination of the axes' values, named `<stage>-<label>-<value>[-...]`."""
    count = math.prod(len(axis.values) for axis in sweep.grid)  # known before any is made
    if count > MAX_VARIANTS:
        sizes = " x ".join(str(len(axis.values)) for axis in sweep.grid)
        raise SweepProblem(
            ("stages", stage, "sweep", "grid"),
            f"{sizes} = {count:,} variants, each a merge of its own; at most {MAX_VARIANTS}: "
            "sweep fewer values (mergekit-evolve searches larger spaces)",
        )
    labels = _labels(sweep.grid)
    for i, axis in enumerate(sweep.grid):
        if isinstance(axis.key, list):
            for j, value in enumerate(axis.values):
                if not isinstance(value, list) or len(value) != len(axis.key):
                    raise SweepProblem(
                        ("stages", stage, "sweep", "grid", i, "values", j),
                        f"needs a list of {len(axis.key)} values, one per key path in `key`",
                    )
    variants = []
    for picks in itertools.product(*(range(len(axis.values)) for axis in sweep.grid)):
        parts, values, settings = [stage], {}, []
        for i, (axis, j) in enumerate(zip(sweep.grid, picks, strict=True)):
            value = axis.values[j]
            values[labels[i]] = value
            parts += [labels[i], _name_part(value) or f"v{j + 1}"]
            where = ("sweep", "grid", i, "values", j)
            if isinstance(axis.key, str):
                settings.append((_key_loc(axis.key), where, value))
            else:  # keys moved together: item k of the value goes to key k
                settings += [
                    (_key_loc(key), (*where, k), value[k]) for k, key in enumerate(axis.key)
                ]
        variants.append(Variant("-".join(parts), values, settings))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise SweepProblem(
            ("stages", stage, "sweep", "grid"), f"two values make the same variant name '{twice}'"
        )
    return variants, labels


def _key_loc(key: str) -> Loc:
    return KeyPath.of(key)


def _labels(grid: list[Axis]) -> list[str]:
    """Short names of the axes for variant names and table columns: the setting's own name
    (`weight`, `t`), or the whole key path where two axes would share one."""
    structural = {"parameters", "value", "models", "sources", "slices", "modules"}

    def short(key: str) -> str:
        parts = [p for p in key.split(".") if not p.isdigit() and p not in structural]
        return parts[-1] if parts else key.replace(".", "_")

    labels = [short(a.key if isinstance(a.key, str) else a.key[0]) for a in grid]
    return [
        label
        if labels.count(label) == 1
        else (a.key if isinstance(a.key, str) else a.key[0]).replace(".", "_")
        for label, a in zip(labels, grid, strict=True)
    ]


def _name_part(value: Any) -> str | None:
    """A value as part of a stage name (letters, digits, _): 0.3 -> 0p3, -1 -> m1; None when
    it has no short form (a filter list), and the variant is numbered instead."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, int | float):
        text = repr(value).replace(".", "p").replace("-", "m").replace("+", "")
    elif isinstance(value, str):
        text = re.sub(r"[^A-Za-z0-9_]+", "_", value).strip("_")
    elif isinstance(value, list) and value and all(not isinstance(v, dict | list) for v in value):
        parts = [_name_part(v) for v in value]
        text = "_".join(parts) if all(parts) else ""
    else:
        return None
    return text if text and len(text) <= 32 else None


def _variant_body(stage: str, body: dict, variant: Variant) -> dict:
    """The sweep stage's settings without `sweep:`, each axis's value put in place."""
    out = copy.deepcopy({k: v for k, v in body.items() if k != "sweep"})
    out["kind"] = body.get("kind", stage)
    for inside, (_, _, axis, *_), value in variant.settings:
        _put(out, inside, copy.deepcopy(value), ("stages", stage, "sweep", "grid", axis, "key"))
    return out


def _put(body: dict, loc: Loc, value: Any, key_loc: Loc) -> None:
    node: Any = body
    for i, key in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, list):
            if not isinstance(key, int) or key >= len(node):
                raise SweepProblem(
                    key_loc,
                    f"{KeyPath(loc[:i])} has {len(node)} entries: no entry {key}",
                )
            if last:
                node[key] = value
            node = node[key]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise SweepProblem(key_loc, f"{KeyPath(loc[:i])} is a value, not a mapping or a list")


def _listed_variants(names: list, plans: dict[str, SweepPlan]) -> list:
    """A list of stage names with each sweep's name replaced by its variants' names."""
    out = []
    for name in names:
        plan = plans.get(name) if isinstance(name, str) else None
        out += [v.name for v in plan.variants] if plan else [name]
    return out


def _lists_any(body: dict, plan: SweepPlan) -> bool:
    listed = [*(body.get("after") or []), *(body.get("models") or [])]
    return any(v.name in listed for v in plan.variants)


# --------------------------------------------------------------------------- the pick


def pick_best(ctx) -> dict:
    """The sweep stage's run: read the scoring eval's table, pick the variant with the best
    metric (the first in grid order on a tie), and make this stage a copy of it."""
    from upstack.core.errors import StageFailed
    from upstack.core.results import read_results

    plan: SweepPlan = ctx.recipe.sweeps[ctx.name]
    results = read_results(ctx.stage_dir(plan.scored_by))
    if results is None:
        raise ctx.fail(
            "sweep.scored_by",
            f"eval stage '{plan.scored_by}' left no results.json",
            error=StageFailed,
        )
    rows = {row["model"]: row for row in results["rows"]}
    table = []
    for variant in plan.variants:
        row = rows.get(variant.name)
        if row is None:
            raise ctx.fail(
                "sweep.scored_by",
                f"eval stage '{plan.scored_by}' has no row for variant {variant.name}",
                error=StageFailed,
            )
        if not isinstance(row.get(plan.metric), int | float):
            measured = ", ".join(k for k, v in row.items() if isinstance(v, int | float))
            raise ctx.fail(
                "sweep.metric",
                f"eval stage '{plan.scored_by}' has no {plan.metric} for {variant.name} "
                f"(it measured: {measured})",
                error=StageFailed,
            )
        scores = {k: v for k, v in row.items() if k != "model" and k != "seconds"}
        table.append({"variant": variant.name, **variant.values, **scores})
    sign = 1 if plan.goal == "max" else -1
    best = max(table, key=lambda row: sign * row[plan.metric])  # max keeps the first of equals
    shutil.copytree(
        ctx.stage_dir(best["variant"]),
        ctx.out_dir,
        dirs_exist_ok=True,
        copy_function=_link_or_copy,
        ignore=shutil.ignore_patterns("upstack.json"),  # the runner writes this stage's own
    )
    (ctx.out_dir / TABLE).write_text(json.dumps(table, indent=2) + "\n")
    plot(plan, table, best, ctx.out_dir / PLOT)
    ctx.log(f"best of {len(table)}: {best['variant']} ({plan.metric} = {best[plan.metric]})")
    return {
        "best": best["variant"],
        "metric": plan.metric,
        "goal": plan.goal,
        "score": best[plan.metric],
        "scored_by": plan.scored_by,
        "variants": table,
    }


def _link_or_copy(source: str, target: str) -> None:
    """A hard link where the file system allows it: a winner's weights need not take twice the disk."""
    try:
        Path(target).unlink(missing_ok=True)
        Path(target).hardlink_to(source)
    except OSError:
        shutil.copy2(source, target)


def plot(plan: SweepPlan, table: list[dict], best: dict, path: Path) -> None:
    """The metric against the first axis, one line per combination of the other axes, the best
    variant starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_label, others = plan.labels[0], plan.labels[1:]
    xs = [row[x_label] for row in table]
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
    categories = list(dict.fromkeys(json.dumps(x) for x in xs))

    def position(value: Any) -> float:
        return value if numeric else categories.index(json.dumps(value))

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    lines: dict[str, list[dict]] = {}
    for row in table:
        lines.setdefault(", ".join(f"{o}={row[o]}" for o in others), []).append(row)
    for label, rows in lines.items():
        axis.plot(
            [position(r[x_label]) for r in rows],
            [r[plan.metric] for r in rows],
            marker="o",
            label=label or None,
        )
    axis.plot(
        [position(best[x_label])],
        [best[plan.metric]],
        marker="*",
        markersize=16,
        color="gold",
        markeredgecolor="black",
        linestyle="none",
        label=f"best: {best['variant']}",
    )
    if not numeric:
        axis.set_xticks(range(len(categories)), [c.strip('"') for c in categories], rotation=20)
    axis.set_xlabel(x_label if x_label == plan.keys[0] else f"{x_label} ({plan.keys[0]})")
    axis.set_ylabel(f"{plan.metric} ({'higher' if plan.goal == 'max' else 'lower'} is better)")
    axis.set_title(f"sweep {plan.stage}, scored by {plan.scored_by}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
