"""`upstack report`: the stage table and every finished eval table, printed and written to
<output_dir>/report.md; `upstack layers`: the layer maps of the upscale stages."""

from __future__ import annotations

from upstack.core import runner
from upstack.core.errors import UserError
from upstack.core.recipe import Recipe
from upstack.core.results import PLOT, read_results, results_table
from upstack.core.sweeps import PLOT as SWEEP_PLOT
from upstack.core.tables import markdown_table, short


def report(recipe: Recipe) -> str:
    """The report as markdown; also written, with the eval plots beside it, under the output dir."""
    state_of = runner.states(recipe)
    sections = [
        f"# {recipe.name}",
        "## Stages",
        markdown_table(runner.STATUS_HEADERS, runner.status_rows(recipe)),
    ]
    run_dir = recipe.run_dir
    problem = run_dir.check_owner(recipe.name)
    if problem:
        raise UserError(f"{recipe.source}: output_dir: {problem}")
    files: dict[str, bytes] = {}  # written together, or none of them
    evals = recipe.stages_with(output="results")
    for name in evals:
        stage_dir = recipe.out_dir / name
        state = state_of[name]
        results = read_results(stage_dir)
        if results is None:
            sections += [
                f"## Eval `{name}`",
                f"not run yet ({state}): `upstack run {recipe.source} {name}`",
            ]
            continue
        note = "" if state == "done" else f" ({state}: results are from an older configuration)"
        sections += [
            f"## Eval `{name}`{note}",
            f"problems: {results.get('problems')}",
            results_table(results),
        ]
        if (stage_dir / PLOT).is_file():
            plot_name = f"eval-{name}.png"
            files[plot_name] = (stage_dir / PLOT).read_bytes()
            sections.append(f"![{name}]({plot_name})")
    if not evals:
        sections.append("No eval stage in this recipe: add one (kind: eval) to compare the models.")
    for name in recipe.sweeps:
        sections += _sweep_section(recipe, name, state_of[name], files)
    text = "\n\n".join(sections) + "\n"
    run_dir.write_files({**files, "report.md": text.encode()})
    return text


def layers_report(recipe: Recipe, stage: str | None = None) -> str:
    """Each upscale stage's layer map (or the one `stage`'s model descends from): for every
    output layer its source, source layer, copy and roles, and a column per training stage
    below it that trains part of it (x: trained), as recorded or, not yet run, as planned."""
    from upstack.core.errors import UserError
    from upstack.core.runner import context
    from upstack.models import layermap

    hashes = runner.stage_hashes(recipe)
    states = runner.states(recipe, hashes)
    pending = frozenset(name for name, state in states.items() if state != "done")
    if stage is None:
        upscales = recipe.stages_with(layer_map="writes")
        if not upscales:
            return "No upscale stage in this recipe: no layer map to show.\n"
    else:
        if stage not in recipe.stages:
            raise UserError(f"{recipe.source}: no stage '{stage}'")
        try:
            ancestor = layermap.upscale_ancestor(recipe, stage)
        except ValueError as err:
            raise UserError(f"{recipe.source}: {err}") from None
        if ancestor is None:
            raise UserError(f"{recipe.source}: stage '{stage}' has no upscale stage in its lineage")
        upscales = [ancestor]

    sections = []
    for name in upscales:
        spec = recipe.stages[name]
        layer_map = layermap.layer_map_of(recipe, name, pending)
        where = "recorded" if name not in pending else "planned from the recipe"
        title = f"## {name} (upscale, {spec.method}, {states[name]}: {where})"
        if layer_map is None:
            sections.append(
                f"{title}\n\nnot known before it runs (a Hub source, or a seam an analysis places)"
            )
            continue
        trainers = {}
        for other in recipe.order():
            train_layers = getattr(recipe.stages[other], "train_layers", "all")
            if train_layers == "all" or _ancestor(recipe, other) != name:
                continue
            manifest = recipe.run_dir.manifest(other) or {}
            recorded = manifest.get("metrics", {}).get("trained", {}).get("layers")
            if other in pending or recorded is None:
                try:
                    ctx = context(recipe, other, hashes[other], pending)
                    recorded = layermap.train_layers(train_layers, ctx, len(layer_map))
                except UserError:
                    recorded = None
            trainers[other] = set(recorded or ())
        rows = [
            [
                e["layer"],
                e["source"],
                e["source_layer"],
                e["copy"],
                "+".join(e["roles"]),
                *("x" if e["layer"] in chosen else "" for chosen in trainers.values()),
            ]
            for e in layer_map
        ]
        headers = ["layer", "source", "source layer", "copy", "roles", *trainers]
        if any("experts" in e for e in layer_map):  # a moe layer: whose FFN each expert is
            headers.insert(5, "experts")
            for row, e in zip(rows, layer_map, strict=True):
                row.insert(5, ", ".join(e.get("experts", ())))
        sections.append(f"{title}\n\n{markdown_table(headers, rows)}")
    return "\n\n".join(sections) + "\n"


def _ancestor(recipe: Recipe, stage: str) -> str | None:
    from upstack.models import layermap

    try:
        return layermap.upscale_ancestor(recipe, stage)
    except ValueError:
        return None


def _sweep_section(recipe: Recipe, name: str, state: str, files: dict[str, bytes]) -> list[str]:
    """A sweep's variants as a table (their grid values and scores), its plot, and the best."""
    plan = recipe.sweeps[name]
    title = f"## Sweep `{name}` (scored by `{plan.scored_by}`, {plan.goal} {plan.metric})"
    metrics = (recipe.run_dir.manifest(name) or {}).get("metrics", {})
    if "variants" not in metrics:
        return [title, f"no pick yet ({state}): `upstack run {recipe.source} {name}`"]
    rows = metrics["variants"]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = markdown_table(
        columns,
        [
            [
                f"**{row[c]}**"
                if c == "variant" and row[c] == metrics["best"]
                else short(row.get(c))
                for c in columns
            ]
            for row in rows
        ],
    )
    note = "" if state == "done" else f" ({state}: from an older configuration)"
    parts = [
        title + note,
        table,
        f"best: `{metrics['best']}` ({plan.metric} = {short(metrics['score'])}); "
        f"later stages take it as `model: {name}.best`",
    ]
    if (recipe.out_dir / name / SWEEP_PLOT).is_file():
        plot_name = f"sweep-{name}.png"
        files[plot_name] = (recipe.out_dir / name / SWEEP_PLOT).read_bytes()
        parts.append(f"![{name}]({plot_name})")
    return parts


# --------------------------------------------------------------------------- the short summary

# what an eval row may carry, best first; accuracies are shares of `<task>_total` problems
ACCURACY_SUFFIX = "_accuracy"


def summary(recipe: Recipe) -> str:
    """What a person reads in ten seconds at the end of a run: each evaluated stage's effect
    on the models it started from, in one line, the best model, and where the report and plots
    are. A change in accuracy smaller than twice its standard error is called noise."""
    state_of = runner.states(recipe)
    evals = recipe.stages_with(output="results")
    seconds = sum(
        (recipe.run_dir.manifest(name) or {}).get("seconds") or 0 for name in recipe.order()
    )
    lines = [f"{recipe.name}: {len(recipe.stages)} stages, {_duration(seconds)} of stage time"]
    for name in evals:
        results = read_results(recipe.out_dir / name)
        if not results or not results.get("rows"):
            lines.append(f"eval {name}: not run yet")
            continue
        rows = {row["model"]: row for row in results["rows"]}
        state = state_of[name]
        note = "" if state == "done" else f", {state}: from an older configuration"
        lines.append(f"eval {name} ({results.get('problems') or 'held-out loss'}{note}):")
        width = max(len(model) for model in rows)
        for model, row in rows.items():
            refs = recipe.refs(model) if model in recipe.stages else []
            inputs = [
                ref.stage
                for ref in refs
                if ref.thing == "model" and ref.use == "weights" and ref.stage in rows
            ]
            lines.append(f"  {model:<{width}}  {_effect(row, [rows[i] for i in inputs], inputs)}")
        best = _best(list(rows.values()))
        if best:
            lines.append(f"  best: {best}")
    if not evals:
        lines.append("no eval stage: add one (kind: eval) to compare the models")
    lines.append(f"report: {recipe.out_dir / 'report.md'} (`upstack report {recipe.source}`)")
    # the report's copies of eval and sweep plots (not whatever else is in the dir)
    plots = [p for p in recipe.run_dir.written_files() if p.suffix == ".png"]
    if plots:
        lines.append("plots: " + ", ".join(str(p) for p in plots))
    if any(recipe.out_dir.glob("*/loss.png")):
        lines.append(f"loss curves: {recipe.out_dir}/<stage>/loss.png")
    return "\n".join(lines) + "\n"


def _effect(row: dict, inputs: list[dict], names: list[str]) -> str:
    """`row`'s measures, and against its best input (a merge has several) the change."""
    accuracies = [k for k in row if k.endswith(ACCURACY_SUFFIX)]
    parts = []
    best_input = max(inputs, key=lambda r: _score(r), default=None)
    for key in accuracies:
        now, total = row[key], row.get(key.replace(ACCURACY_SUFFIX, "_total")) or 0
        text = f"{key.removesuffix(ACCURACY_SUFFIX)} {now:.0%}"
        if best_input is not None and key in best_input:
            before = best_input[key]
            delta = (now - before) * 100
            noise = (
                200 * (((now * (1 - now) + before * (1 - before)) / total) ** 0.5) if total else 0
            )
            verdict = "within noise" if abs(delta) <= noise else "up" if delta > 0 else "down"
            text = f"{key.removesuffix(ACCURACY_SUFFIX)} {before:.0%} -> {now:.0%} ({delta:+.0f} pts, {verdict}, 2se {noise:.1f})"
        parts.append(text)
    if "loss" in row:
        before = f"{best_input['loss']:.3f} -> " if best_input and "loss" in best_input else ""
        parts.append(f"held-out loss {before}{row['loss']:.3f}")
    source = names[inputs.index(best_input)] if best_input is not None else None
    return "; ".join(parts) + (f"  (from {source})" if source else "")


def _score(row: dict) -> tuple:
    accuracy = [v for k, v in row.items() if k.endswith(ACCURACY_SUFFIX)]
    return (sum(accuracy) / len(accuracy) if accuracy else 0.0, -(row.get("loss") or 0.0))


def _best(rows: list[dict]) -> str | None:
    if not rows:
        return None
    best = max(rows, key=_score)
    measure = [
        f"{k.removesuffix(ACCURACY_SUFFIX)} {v:.0%}"
        for k, v in best.items()
        if k.endswith(ACCURACY_SUFFIX)
    ]
    if not measure and "loss" in best:
        measure = [f"held-out loss {best['loss']:.3f}"]
    return f"{best['model']} ({', '.join(measure)})"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def for_terminal(markdown: str, out_dir) -> str:
    """The report as a terminal shows it: an image is its file's path, not markdown syntax."""
    import re

    return re.sub(r"!\[[^\]]*\]\(([^)]+)\)", lambda m: f"plot: {out_dir}/{m.group(1)}", markdown)
