"""`upstack import-merge`: a model card's mergekit YAML becomes a recipe stage, its comments and the recipe's kept."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from upstack.commands import cli, import_merge
from upstack.core.errors import UserError
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


def _import(tmp_path, capsys, card: str, *args: str, recipe: str | None = RECIPE):
    """`upstack import-merge card.yml ARGS --into recipe.yaml`: (exit code, stdout, stderr lines)."""
    (tmp_path / "card.yml").write_text(card)
    into = []
    if recipe is not None:
        (tmp_path / "recipe.yaml").write_text(recipe)
        into = ["--into", str(tmp_path / "recipe.yaml")]
    code = cli.main(["import-merge", str(tmp_path / "card.yml"), *args, *into])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def _loads_after(tmp_path, *replacements: tuple[str, str]):
    """The recipe, loaded once each (name, replacement) is made in its file."""
    path = tmp_path / "recipe.yaml"
    text = path.read_text()
    for old, new in replacements:
        text = text.replace(old, new)
    path.write_text(text)
    return load_recipe(path)


WINDOWS = r"G:\FModels\first-7b"


def test_a_windows_path_is_kept_for_the_user_to_replace_and_refused_until_then(tmp_path, capsys):
    card = CARD.replace("org/first-7b", WINDOWS)
    code, _, err = _import(tmp_path, capsys, card, "--stage", "gslerp")

    assert code == 0, err
    # one line per name to replace: the card's line, the name, what to write, where it now is
    card_file = tmp_path / "card.yml"
    assert err[:2] == [
        f"{card_file}:5: '{WINDOWS}': replace with a stage, a local path or a Hub id "
        f"({tmp_path / 'recipe.yaml'}:15, stages.gslerp.slices.0.sources.0.model)",
        f"{card_file}:10: '{WINDOWS}': replace with a stage, a local path or a Hub id "
        f"({tmp_path / 'recipe.yaml'}:20, stages.gslerp.base_model)",
    ]
    assert err[2] == f"added stage gslerp to {tmp_path / 'recipe.yaml'}"
    text = (tmp_path / "recipe.yaml").read_text()
    assert f"          - model: {WINDOWS}    # the instruct one\n" in text  # as the card wrote it
    assert yaml.safe_load(text)["stages"]["gslerp"] == {"kind": "merge", **yaml.safe_load(card)}

    with pytest.raises(UserError) as refused:
        load_recipe(tmp_path / "recipe.yaml")
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert message == (
        f"{tmp_path / 'recipe.yaml'}:15: stages.gslerp.slices.0.sources.0.model: '{WINDOWS}' is "
        "a Windows path, so it is not a stage of this recipe, an existing path, or a Hub id "
        "(org/name): replace it with one"
    )
    recipe = _loads_after(tmp_path, (WINDOWS, "up"))  # the stage that grows it
    assert recipe.deps("gslerp") == ["up"]


def test_an_absolute_path_of_the_authors_machine_is_refused_at_load_until_replaced(
    tmp_path, capsys
):
    author = "/home/author/models/second-7b"
    code, _, err = _import(tmp_path, capsys, CARD.replace("org/second-7b", author))

    assert code == 0, err
    assert err[0].endswith(
        f"card.yml:7: '{author}': replace with a stage, a local path or a Hub id "
        f"({tmp_path / 'recipe.yaml'}:16, stages.merge.slices.0.sources.1.model)"
    )
    with pytest.raises(UserError) as refused:
        load_recipe(tmp_path / "recipe.yaml")
    assert str(refused.value) == (
        f"{tmp_path / 'recipe.yaml'}:16: stages.merge.slices.0.sources.1.model: {author}: no such "
        "directory here: replace it with a stage of this recipe, a model dir or a Hub id (org/name)"
    )
    _loads_after(tmp_path, (author, "org/second-7b"))


# mergekit-multi: the first document's name is the second's model. "Step 1 (slerp)" is no stage
# name: it becomes one, and the second document names the stage.
MULTI = """\
# Two merges, the second of the first.
---
name: Step 1 (slerp)   # the intermediate merge
merge_method: slerp
base_model: org/first-7b
models: [{model: org/first-7b}, {model: org/second-7b}]
parameters: {t: 0.5}
dtype: bfloat16
---
name: final
merge_method: linear
models:
  - model: Step 1 (slerp)
    parameters: {weight: 0.7}
  - model: org/third-7b
    parameters: {weight: 0.3}
dtype: bfloat16
"""


@pytest.mark.parametrize(("args", "final"), [((), "final"), (("--stage", "soup"), "soup")])
def test_a_mergekit_multi_file_becomes_a_stage_per_document(tmp_path, capsys, args, final):
    code, _, err = _import(tmp_path, capsys, MULTI, *args)

    assert code == 0, err
    card = tmp_path / "card.yml"
    notes = [
        f"{card}:3: name 'Step 1 (slerp)' is stage 'Step-1-slerp' (a stage name is letters, "
        "digits, _ and -)",
        *([f"{card}:10: name 'final' is stage 'soup' (--stage)"] if final == "soup" else []),
        f"added stages Step-1-slerp, {final} to {tmp_path / 'recipe.yaml'}",
    ]
    assert err == notes
    text = (tmp_path / "recipe.yaml").read_text()
    assert "    # name: Step 1 (slerp)   # the intermediate merge\n" in text  # kept, in sight
    assert "      - model: Step-1-slerp\n" in text
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert list(recipe.stages) == ["up", "Step-1-slerp", final]
    assert recipe.deps(final) == ["Step-1-slerp"]
    first = yaml.safe_load(MULTI.split("---\n")[1])
    stages = yaml.safe_load(text)["stages"]
    assert stages["Step-1-slerp"] == {
        "kind": "merge",
        **{k: first[k] for k in first if k != "name"},
    }
    assert stages[final]["models"][0]["model"] == "Step-1-slerp"


def test_a_mistake_in_a_later_document_names_its_line_in_the_card(tmp_path, capsys):
    card = MULTI.replace("    parameters: {weight: 0.3}", "    parameters: {wieght: 0.3}")
    code, _, err = _import(tmp_path, capsys, card)
    assert code == 2 and len(err) == 1, err
    assert f"{tmp_path / 'card.yml'}:16: stages.final.models.1.parameters.wieght: " in err[0]
    assert (tmp_path / "recipe.yaml").read_text() == RECIPE


def test_a_check_made_once_the_recipe_is_read_names_the_cards_line(tmp_path, capsys):
    # an adapter after `+` may not be a stage: found by the merge's check_at_load, placed by
    # the text checked, not by the recipe file (which does not hold the stage yet)
    card = MULTI.replace("  - model: org/third-7b", "  - model: org/third-7b+up")
    code, _, err = _import(tmp_path, capsys, card)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(
        f"error: {tmp_path / 'card.yml'}:15: stages.final.models.1.model.lora: 'up' after `+`"
    )


@pytest.mark.parametrize(
    ("card", "expected"),
    [
        (
            CARD.replace(
                "        layer_range: [0, 32]",
                "        revision: v2\n        layer_range: [0, 32]",
                1,
            ),
            "card.yml:6: stages.merge.slices.0.sources.0.revision: mergekit reads a model's "
            "revision from its name: write `model: org/first-7b@v2` and drop this key",
        ),
        (
            CARD + "trust_remote_code: true\n",
            "card.yml:22: stages.merge.trust_remote_code: a mergekit option: write "
            "`trust_remote_code: true` at the recipe's top level instead",
        ),
        (
            MULTI.replace("name: final\n", "").replace(
                "name: Step 1 (slerp)   # the intermediate merge\n", ""
            ),
            "card.yml:9: a second document without `name:`; mergekit-multi takes one, the final "
            "merge: name the others",
        ),
        (
            MULTI.replace("Step 1 (slerp)", "up"),
            "card.yml:3: name: stages.up is already a stage of",
        ),
        (
            "experts:\n  - source_model: org/first-7b\ngate_mode: random\n",
            "card.yml:1: a mergekit-moe config (experts:): write an upscale stage with `method: "
            "moe` instead",
        ),
    ],
    ids=["revision", "option", "two-unnamed", "name-taken", "moe"],
)
def test_a_refusal_says_what_to_write_instead(tmp_path, capsys, card, expected):
    code, _, err = _import(tmp_path, capsys, card)
    assert code == 2 and len(err) == 1, err
    assert expected in err[0], err[0]
    assert (tmp_path / "recipe.yaml").read_text() == RECIPE


def test_the_check_writes_nothing_beside_the_users_files(tmp_path, capsys, monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        return load_recipe(*args, **kwargs)

    monkeypatch.setattr(import_merge, "load_recipe", spy)
    code, _, err = _import(tmp_path, capsys, MULTI)
    assert code == 0, err
    # while the recipe with the new stages is checked, nothing but the user's two files is there
    assert seen == [["card.yml", "recipe.yaml"]]
    # and after: the recipe was replaced in one step, no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.yml", "recipe.yaml"]
    code, out, err = _import(tmp_path, capsys, CARD, recipe=None)  # printed: the card alone
    assert code == 0 and out.startswith("  merge:\n"), err
    assert seen[-1] == ["card.yml", "recipe.yaml"]
