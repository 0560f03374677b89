"""push: the card tells the lineage, a dry run lists exactly what would go up, no token is ever written."""

from __future__ import annotations

import pytest
from conftest import run_cli, write_recipe
from huggingface_hub import DatasetCard, HfApi, ModelCard

from upstack.core.errors import UserError
from upstack.core.recipe import load_recipe
from upstack.core.runner import run
from upstack.stages.push import push_stage

SENTINEL = "hf_SENTINEL0token0never0written"

RECIPE = """\
name: p
output_dir: {out}
stages:
  init:
    tokenizer: {{corpus_problems: 100, vocab_size: 400}}
    architecture: {{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                   num_attention_heads: 2, num_key_value_heads: 2}}
  merge:
    merge_method: linear
    models: [{{model: init, parameters: {{weight: 1.0}}}}]
  synth:
    seeds: [{{source: arith, count: 6}}]
    teacher: {{kind: scripted}}
  eval:
    models: [merge]
    math: {{problems: {{source: arith, split: eval, count: 4}}, max_new_tokens: 4}}
    loss: {{count: 4}}
  push:
    model: merge
    repo_id: me/tiny-merged
    private: true
    license: apache-2.0
    datasets: [{{stage: synth}}]
    after: [eval]
"""


@pytest.fixture(autouse=True)
def token(monkeypatch, one_torch_thread):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)


def _files(root):
    return {p for p in root.rglob("*") if p.is_file()}


def _stage_files(stage_dir):
    return sorted(
        str(p.relative_to(stage_dir)) for p in _files(stage_dir) if p.name != "upstack.json"
    )


def _no_token_anywhere(root):
    for path in _files(root):
        assert SENTINEL.encode() not in path.read_bytes(), path


def test_push_stage_uploads_the_stage_and_its_card_through_hfapi(tmp_path, monkeypatch, capfd):
    calls, uploads = [], {}

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, **kwargs):
        calls.append(("upload_folder", repo_id, repo_type))
        uploads[repo_id] = {
            str(p.relative_to(folder_path)): p.read_bytes() for p in _files(folder_path)
        }
        return type("Commit", (), {"oid": "abc123"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    recipe = load_recipe(write_recipe(tmp_path, RECIPE.format(out=tmp_path / "runs")))
    run(recipe, ["push"])
    runs = tmp_path / "runs"

    assert calls[0] == (
        "create_repo",
        "me/tiny-merged",
        {"private": True, "repo_type": "model", "exist_ok": True},
    )
    assert ("upload_folder", "me/tiny-merged-synth", "dataset") in calls
    model = uploads["me/tiny-merged"]
    assert sorted(model) == sorted([*_stage_files(runs / "merge"), "README.md"])
    for name in _stage_files(runs / "merge"):
        assert model[name] == (runs / "merge" / name).read_bytes()

    card = ModelCard(model["README.md"].decode())
    assert {"upstack", "merge", "mergekit", "solar"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0" and card.data.model_name == "me/tiny-merged"
    for part in (
        "## Lineage",
        "`init` (init)",
        "`merge` (merge)",
        "merge_method: linear",
        "## Evaluation",
        "math_accuracy",
    ):
        assert part in card.text, part
    assert (runs / "push" / "README.md").read_text() == model["README.md"].decode()

    data = uploads["me/tiny-merged-synth"]
    assert sorted(data) == sorted([*_stage_files(runs / "synth"), "README.md"])
    assert "synthetic" in DatasetCard(data["README.md"].decode()).data.tags

    out, err = capfd.readouterr()
    assert SENTINEL not in out + err
    _no_token_anywhere(tmp_path)


@pytest.mark.slow
def test_cli_dry_run_lists_exactly_the_stage_files_and_the_card_and_sends_nothing(tmp_path):
    # only the init stage: a merge stage would make the CLI import mergekit to check it
    text = RECIPE.format(out=tmp_path / "runs").split("  merge:")[0]
    recipe_path = write_recipe(tmp_path, text)
    run(load_recipe(recipe_path), ["init"])
    stage_dir = tmp_path / "runs" / "init"
    before = {p: p.stat().st_mtime for p in _files(tmp_path)}

    # HfApi's network calls would fail loudly here: there is no network and the token is fake.
    result = run_cli(
        "push",
        str(recipe_path),
        "init",
        "--repo-id",
        "me/tiny",
        "--dry-run",
        cwd=tmp_path,
        env={"HF_TOKEN": SENTINEL},
    )
    assert result.returncode == 0, result.stderr
    listing, card_text = result.stdout.split("--- README.md (model card) ---\n")
    listed = [line.split()[0] for line in listing.splitlines()[1:] if line.strip()]
    assert listed == [*_stage_files(stage_dir), "README.md"]
    assert "public model repo me/tiny" in listing
    card = ModelCard(card_text)
    assert "upstack" in card.data.tags and card.data.model_name == "me/tiny"
    assert "depth-upscaling" not in card.data.tags  # no upscale stage in this lineage
    assert SENTINEL not in result.stdout + result.stderr
    assert {p: p.stat().st_mtime for p in _files(tmp_path)} == before  # nothing written
    _no_token_anywhere(tmp_path)


def test_push_of_an_unfinished_stage_is_a_user_error(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, RECIPE.format(out=tmp_path / "runs")))
    with pytest.raises(UserError, match=r"stages.merge is missing: run `upstack run"):
        push_stage(recipe, "merge", "me/x", dry_run=True)
    with pytest.raises(UserError, match="expected org/name"):
        push_stage(recipe, "merge", "not-a-repo-id", dry_run=True)
    # the push stage's own inputs are checked when the recipe loads, before any stage runs
    wrong = RECIPE.replace("datasets: [{{stage: synth}}]", "datasets: [{{stage: init}}]")
    with pytest.raises(
        UserError,
        match=r"stages.push.datasets.0.stage: 'init' is a stage of kind init, not a data "
        r"\(synth, pairs\) stage",
    ):
        load_recipe(write_recipe(tmp_path, wrong.format(out=tmp_path / "runs")))
    assert not (tmp_path / "runs" / "init").exists()


def test_solar_merge_card_lists_training_data_not_the_decontamination_sets():
    """The card's `datasets` are what the lineage trained on: synth's seeds (MATH train) and the
    SFT/DPO sets; MATH and GSM8K test, used only to decontaminate the seeds, are not."""
    from conftest import ROOT

    from upstack.stages.push import model_card

    recipe = load_recipe(ROOT / "recipes" / "solar-10.7b.yaml", deep=False)
    card = ModelCard(model_card(recipe, "merge", "org/solar"))
    assert sorted(card.data.datasets) == sorted(
        [
            "HuggingFaceFW/fineweb-edu",  # cpt
            "DigitalLearningGmbH/MATH-lighteval",  # synth seeds, train split
            "vicgalle/alpaca-gpt4",
            "Open-Orca/OpenOrca",
            "Intel/orca_dpo_pairs",
            "argilla/ultrafeedback-binarized-preferences-cleaned",
        ]
    )
    assert card.data.base_model == "mistralai/Mistral-7B-v0.1"
