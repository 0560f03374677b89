"""`upstack report`: the stage table and every finished eval table, printed and written to <output_dir>/report.md."""

from __future__ import annotations

import shutil

from upstack import runner
from upstack.recipe import Recipe
from upstack.results import PLOT, read_results, results_table
from upstack.sweeps import PLOT as SWEEP_PLOT
from upstack.tables import markdown_table, short


def report(recipe: Recipe) -> str:
    """The report as markdown; also written, with the eval plots beside it, under the output dir."""
    hashes = runner.stage_hashes(recipe)
    sections = [
        f"# {recipe.name}",
        "## Stages",
        markdown_table(runner.STATUS_HEADERS, runner.status_rows(recipe)),
    ]
    recipe.out_dir.mkdir(parents=True, exist_ok=True)
    evals = [name for name in recipe.order() if recipe.stages[name].kind == "eval"]
    for name in evals:
        stage_dir = recipe.out_dir / name
        state = runner.stage_state(recipe, name, hashes[name])
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
            shutil.copy(stage_dir / PLOT, recipe.out_dir / plot_name)
            sections.append(f"![{name}]({plot_name})")
    if not evals:
        sections.append("No eval stage in this recipe: add one (kind: eval) to compare the models.")
    for name in recipe.sweeps:
        sections += _sweep_section(recipe, name, runner.stage_state(recipe, name, hashes[name]))
    text = "\n\n".join(sections) + "\n"
    (recipe.out_dir / "report.md").write_text(text)
    return text


def _sweep_section(recipe: Recipe, name: str, state: str) -> list[str]:
    """A sweep's variants as a table (their grid values and scores), its plot, and the best."""
    plan = recipe.sweeps[name]
    title = f"## Sweep `{name}` (scored by `{plan.scored_by}`, {plan.goal} {plan.metric})"
    metrics = (runner.read_manifest(recipe.out_dir / name) or {}).get("metrics", {})
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
        shutil.copy(recipe.out_dir / name / SWEEP_PLOT, recipe.out_dir / plot_name)
        parts.append(f"![{name}]({plot_name})")
    return parts
