"""The end-of-run summary: each evaluated stage against the models it started from, in one line,
with a change smaller than twice its standard error called noise; the best model; no markdown
image syntax in what the terminal shows."""

import json

from conftest import recipe_from_stages

from upstack.commands.report import for_terminal, report, summary
from upstack.core.recipe import load_recipe


def _row(model, correct, total, loss):
    return {
        "model": model,
        "math_accuracy": correct / total,
        "math_correct": correct,
        "math_total": total,
        "loss": loss,
    }


def test_summary_says_each_stage_effect_against_its_inputs_and_the_noise(tmp_path):
    recipe_path = recipe_from_stages(
        tmp_path,
        {
            "init": {},
            "pretrain": {"kind": "cpt", "model": "init", "datasets": [{"arith": {"problems": 9}}]},
            "sft": {"model": "pretrain", "datasets": [{"arith": {"problems": 9}}]},
            "sft_b": {"kind": "sft", "model": "pretrain", "datasets": [{"arith": {"problems": 9}}]},
            "merge": {
                "merge_method": "linear",
                "models": [
                    {"model": "sft", "parameters": {"weight": 0.5}},
                    {"model": "sft_b", "parameters": {"weight": 0.5}},
                ],
            },
            "eval": {"after": ["pretrain", "sft", "sft_b", "merge"]},
        },
    )
    recipe = load_recipe(recipe_path, deep=False)
    (recipe.out_dir / "eval").mkdir(parents=True)
    rows = [
        _row("pretrain", 40, 1000, 0.9),
        _row("sft", 200, 1000, 1.1),  # +16 points on 1000 problems: far beyond the noise
        _row("sft_b", 50, 1000, 1.0),  # +1 point: within it
        _row("merge", 210, 1000, 1.05),  # +1 point on its best candidate, sft
    ]
    results = {"rows": rows, "problems": "arith:eval"}
    (recipe.out_dir / "eval" / "results.json").write_text(json.dumps(results))
    (recipe.out_dir / "eval" / "eval.png").write_bytes(b"png")

    markdown = report(recipe)  # as `upstack report --summary` does: report.md, plots beside it
    lines = summary(recipe).splitlines()
    line = {text.split()[0]: text for text in lines if text.startswith("  ")}
    assert "pretrain" in line and "->" not in line["pretrain"]  # its input was not evaluated
    assert "math 4% -> 20% (+16 pts, up" in line["sft"] and "(from pretrain)" in line["sft"]
    assert "math 4% -> 5% (+1 pts, within noise" in line["sft_b"]
    assert "math 20% -> 21%" in line["merge"] and "(from sft)" in line["merge"]
    assert "held-out loss 1.100 -> 1.050" in line["merge"]
    assert lines[-3] == "  best: merge (math 21%)"
    assert lines[-2] == f"report: {recipe.out_dir / 'report.md'} (`upstack report {recipe_path}`)"
    assert lines[-1] == f"plots: {recipe.out_dir / 'eval-eval.png'}"

    assert "![eval](eval-eval.png)" in markdown  # report.md shows the plot
    shown = for_terminal(markdown, recipe.out_dir)
    assert "![" not in shown and f"plot: {recipe.out_dir}/eval-eval.png" in shown
