"""`upstack import-merge`: a model card's mergekit YAML becomes a recipe stage, its comments and the recipe's kept."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from upstack.commands import cli
from upstack.core.recipe import load_recipe

# As a model card prints it: a header comment, comments beside values, a block scalar.
CARD = """\
---
# Gradient SLERP of two fine-tunes: attention leans on the first, MLPs on the second.
slices:
  - sources:
      - model: org/first-7b    # the instruct one
        layer_range: [0, 32]
      - model: org/second-7b
        layer_range: [0, 32]
merge_method: slerp
base_model: org/first-7b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5   # every other tensor
chat_template: |
  {%- for message in messages %}{{ message['content'] }}
    {%- endfor %}
dtype: bfloat16
"""

RECIPE = """\
# my recipe: its comments must survive the import
name: mine
stages:
  # the base model, grown
  up:
    kind: upscale
    model: org/first-7b   # DUS, SOLAR style
    drop_layers: 8

# evaluation comes last
"""


def test_a_model_card_config_goes_into_a_recipe_with_every_comment(tmp_path, capsys):
    (tmp_path / "card.yml").write_text(CARD)
    (tmp_path / "recipe.yaml").write_text(RECIPE)

    code = cli.main(
        [
            "import-merge",
            str(tmp_path / "card.yml"),
            "--stage",
            "gslerp",
            "--into",
            str(tmp_path / "recipe.yaml"),
        ]
    )

    assert code == 0, capsys.readouterr().err
    text = (tmp_path / "recipe.yaml").read_text()
    lines = text.splitlines()
    # the recipe's own lines, comments included, all there and in order
    kept = iter(lines)
    assert all(any(line == other for other in kept) for line in RECIPE.splitlines())
    # every comment of the card, moved under the stage
    for comment in ("# Gradient SLERP", "# the instruct one", "# every other tensor"):
        assert any(comment in line for line in lines), comment
    assert lines.index("  gslerp:") < lines.index("# evaluation comes last")
    # and YAML reads the stage as exactly the card's config
    stage = yaml.safe_load(text)["stages"]["gslerp"]
    assert stage == {"kind": "merge", **yaml.safe_load(CARD)}
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert {ref.text for ref in recipe.refs("gslerp")} == {"org/first-7b", "org/second-7b"}


def test_without_into_the_block_is_printed(tmp_path, capsys):
    (tmp_path / "card.yml").write_text(CARD)
    assert cli.main(["import-merge", str(tmp_path / "card.yml")]) == 0
    block = capsys.readouterr().out
    assert block.startswith("  merge:\n    # Gradient SLERP")
    assert yaml.safe_load(textwrap.dedent(block))["merge"] == yaml.safe_load(CARD)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("value: 0.5   # every other", "value: half   # every other"),
            "card.yml:17: stages.gslerp.parameters.t.2.value: not a valid value for slerp's 't'",
        ),
        (
            ("    - filter: mlp", "    - filer: mlp"),
            "card.yml:15: stages.gslerp.parameters.t.1.filer: unknown key",
        ),
    ],
    ids=["value", "key"],
)
def test_a_mistake_names_the_cards_line_and_leaves_the_recipe_alone(
    tmp_path, capsys, change, expected
):
    (tmp_path / "card.yml").write_text(CARD.replace(*change))
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    args = ["import-merge", str(tmp_path / "card.yml"), "--stage", "gslerp"]
    code = cli.main([*args, "--into", str(tmp_path / "recipe.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert expected in err, err
    assert (tmp_path / "recipe.yaml").read_text() == RECIPE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.yml", "recipe.yaml"]


def test_a_stage_name_already_taken_is_refused(tmp_path, capsys):
    (tmp_path / "card.yml").write_text(CARD)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    code = cli.main(
        [
            "import-merge",
            str(tmp_path / "card.yml"),
            "--stage",
            "up",
            "--into",
            str(tmp_path / "recipe.yaml"),
        ]
    )
    assert code == 2
    assert "stages.up: already a stage; name the new one with --stage" in capsys.readouterr().err
