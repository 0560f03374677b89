"""`upstack report`: the stage table and every finished eval table, printed and written to <output_dir>/report.md."""

from __future__ import annotations

import shutil

from upstack import runner
from upstack.recipe import Recipe
from upstack.results import PLOT, read_results, results_table
from upstack.tables import markdown_table


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
    text = "\n\n".join(sections) + "\n"
    (recipe.out_dir / "report.md").write_text(text)
    return text
