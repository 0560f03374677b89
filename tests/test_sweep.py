"""Merge sweeps: a grid of variant stages, scored by an eval, the best taken by a later stage as `<sweep>.best`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file

from upstack.commands.report import report
from upstack.core import runner
from upstack.core.errors import UserError
from upstack.core.recipe import load_recipe

VARIANTS = ["soup-weight-0p2", "soup-weight-0p5", "soup-weight-0p8"]


def _recipe(tmp_path, zoo) -> str:
    return write_recipe(
        tmp_path,
        f"""\
        name: s
        output_dir: {tmp_path / "runs"}
        stages:
          # SOLAR picked its merge weights by evaluation; here the grid is the recipe's
          soup:
            kind: merge
            merge_method: linear
            models:
              - {{model: {zoo["a"]}, parameters: {{weight: 0.5}}}}
              - {{model: {zoo["b"]}, parameters: {{weight: 0.5}}}}
            dtype: float32
            sweep:
              grid:
                - {{key: models.0.parameters.weight, values: [0.2, 0.5, 0.8]}}
              metric: loss
          eval:
            after: [soup]     # the sweep's name stands for its variants here
            math: null
            loss: {{count: 8, batch_size: 8, max_length: 64}}
          grown:
            kind: upscale
            model: soup.best
            drop_layers: 1
        """,
    )


def _tensors(model_dir):
    return load_file(model_dir / "model.safetensors")


def test_a_sweep_runs_its_variants_once_and_hands_on_the_best(
    tmp_path, merge_zoo, one_torch_thread
):
    recipe_path = _recipe(tmp_path, merge_zoo)
    recipe = load_recipe(recipe_path)
    runs = tmp_path / "runs"
    assert [v.name for v in recipe.sweeps["soup"].variants] == VARIANTS
    assert runner.plan(recipe, []) == [*VARIANTS, "eval", "soup", "grown"]
    # `soup.best` is a typed reference to the sweep stage: it depends on the variants and the eval
    assert [(r.key, r.stage, r.kind) for r in recipe.refs("grown")] == [("model", "soup", "merge")]
    assert recipe.deps("soup") == [*VARIANTS, "eval"]
    from upstack.stages.push import lineage

    assert lineage(recipe, "grown") == [*VARIANTS, "eval", "soup", "grown"]

    runner.run(recipe, [])

    # each variant is the merge its grid value asks for (linear normalizes the weights)
    a, b = _tensors(merge_zoo["a"]), _tensors(merge_zoo["b"])
    low = _tensors(runs / "soup-weight-0p2")
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(low[name], (0.2 * a[name] + 0.5 * b[name]) / 0.7)
    # the eval scored every variant; the best is the lowest loss, as the recipe asks
    rows = {r["model"]: r for r in json.loads((runs / "eval" / "results.json").read_text())["rows"]}
    assert sorted(rows) == VARIANTS
    best = min(VARIANTS, key=lambda v: rows[v]["loss"])
    metrics = json.loads((runs / "soup" / "upstack.json").read_text())["metrics"]
    assert (metrics["best"], metrics["metric"], metrics["goal"]) == (best, "loss", "min")
    assert [row["weight"] for row in metrics["variants"]] == [0.2, 0.5, 0.8]
    # soup.best is the winner's model, and what the next stage grew
    picked, winner = _tensors(runs / "soup"), _tensors(runs / best)
    assert all(torch.equal(picked[k], winner[k]) for k in winner)
    grown = _tensors(runs / "grown")
    assert torch.equal(
        grown["model.layers.0.self_attn.q_proj.weight"],
        winner["model.layers.0.self_attn.q_proj.weight"],
    )
    assert (runs / "soup" / "sweep.png").stat().st_size > 0

    text = report(recipe)
    assert "## Sweep `soup` (scored by `eval`, min loss)" in text
    assert f"| **{best}**" in text and f"best: `{best}`" in text
    assert "![soup](sweep-soup.png)" in text and (runs / "sweep-soup.png").is_file()

    # a second run finds everything done: no variant is merged or evaluated again
    started = json.loads((runs / "eval" / "upstack.json").read_text())["started"]
    assert runner.run(load_recipe(recipe_path), []) == []
    # `upstack status` (no mergekit import) sees the same stages and hashes
    shallow = load_recipe(recipe_path, deep=False)
    assert {row[0]: row[2] for row in runner.status_rows(shallow)} == dict.fromkeys(
        [*VARIANTS, "eval", "soup", "grown"], "done"
    )
    # another goal changes the pick only: the variants' and the eval's hashes are unchanged
    again = load_recipe(recipe_path, ["stages.soup.sweep.goal=max"])
    assert runner.plan(again, []) == ["soup", "grown"]
    runner.run(again, [])
    assert json.loads((runs / "eval" / "upstack.json").read_text())["started"] == started
    worst = max(VARIANTS, key=lambda v: rows[v]["loss"])
    assert json.loads((runs / "soup" / "upstack.json").read_text())["metrics"]["best"] == worst


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("values: [0.2, 0.5, 0.8]", "values: [0.2, heavy]"),
            r"recipe.yaml:14: stages.soup.sweep.grid.0.values.1: not a valid value for linear's "
            r"'weight' \('heavy'\).* \(in sweep variant soup-weight-heavy\)",
        ),
        (
            ("key: models.0.parameters", "key: models.2.parameters"),
            r"recipe.yaml:14: stages.soup.sweep.grid.0.key: models has 2 entries: no entry 2",
        ),
        (
            ("metric: loss", "metric: math_accuracy"),
            r"recipe.yaml:15: stages.soup.sweep.metric: eval stage 'eval' does not measure "
            r"math_accuracy; it measures: loss, perplexity",
        ),
        (
            ("metric: loss", "scored_by: grown"),
            r"recipe.yaml:15: stages.soup.sweep.scored_by: 'grown' is a stage of kind upscale, "
            r"not an eval stage",
        ),
        (
            ("model: soup.best", "model: soup"),
            r"recipe.yaml:22: stages.grown.model: 'soup' is a sweep of several merges: take "
            r"'soup.best'",
        ),
        (
            ("after: [soup]", "after: [soup, grown]"),
            r"dependency cycle",
        ),
    ],
    ids=["value", "key", "metric", "scorer", "bare-name", "cycle"],
)
def test_sweep_mistakes_fail_at_load_where_they_are_written(tmp_path, merge_zoo, change, expected):
    text = _recipe(tmp_path, merge_zoo).read_text().replace(*change)
    (tmp_path / "recipe.yaml").write_text(text)
    with pytest.raises(UserError, match=expected) as err:
        load_recipe(tmp_path / "recipe.yaml")
    assert "\n" not in str(err.value)


def test_a_grid_of_two_axes_and_keys_moved_together(tmp_path):
    recipe = load_recipe(
        write_recipe(
            tmp_path,
            """\
            name: s
            stages:
              ratio:
                kind: merge
                merge_method: slerp
                base_model: x/a
                models: [{model: x/a}, {model: x/b}]
                parameters: {t: 0.5}
                sweep:
                  grid:
                    - {key: parameters.t, values: [0.25, 0.75]}
                    - key: [models.0.model, base_model]     # two settings, one axis
                      values: [[x/a, x/a], [x/c, x/c]]
                  metric: perplexity
              eval: {after: [ratio], math: null}
            """,
        )
    )
    names = [v.name for v in recipe.sweeps["ratio"].variants]
    assert names == [
        "ratio-t-0p25-model-x_a_x_a",
        "ratio-t-0p25-model-x_c_x_c",
        "ratio-t-0p75-model-x_a_x_a",
        "ratio-t-0p75-model-x_c_x_c",
    ]
    variant = recipe.stages["ratio-t-0p75-model-x_c_x_c"]
    assert variant.mergekit["parameters"] == {"t": 0.75}
    assert variant.mergekit["base_model"] == "x/c" and variant.mergekit["models"][0] == {
        "model": "x/c"
    }
    assert variant.sweep is None and recipe.stages["ratio"].sweep is not None
    # each variant reads its own models; the eval scores all four
    assert {r.text for r in recipe.refs("ratio-t-0p75-model-x_c_x_c")} == {"x/c", "x/b"}
    assert recipe.stages["eval"].after == names
