"""Recipe loading: every recipe in the repo validates; every kind of mistake is one line with file:line and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, run_cli, write_recipe

from upstack.core.errors import UserError
from upstack.core.recipe import load_recipe

SMALL_INIT = """
    tokenizer: {corpus_problems: 100, vocab_size: 400}
    architecture: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                   num_attention_heads: 2, num_key_value_heads: 2}
"""


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_in_the_repo_validates(path: Path):
    recipe = load_recipe(path)
    assert recipe.stages
    assert recipe.order()  # a DAG: every stage ordered after what it reads


def _error(tmp_path: Path, text: str, overrides=()) -> str:
    path = write_recipe(tmp_path, text)
    with pytest.raises(UserError) as caught:
        load_recipe(path, overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_file_line_and_key_path(tmp_path):
    message = _error(
        tmp_path,
        """\
        name: bad
        stages:
          init:
            tokenizer:
              vocab_sise: 512
        """,
    )
    assert message == (
        f"{tmp_path / 'recipe.yaml'}:5: stages.init.tokenizer.vocab_sise: unknown key; "
        "did you mean 'vocab_size'?"
    )


def test_wrong_type_names_the_value(tmp_path):
    message = _error(
        tmp_path,
        """\
        name: bad
        stages:
          init:
            architecture: {hidden_size: lots}
        """,
    )
    assert message.startswith(
        f"{tmp_path / 'recipe.yaml'}:4: stages.init.architecture.hidden_size:"
    )
    assert "'lots'" in message


def test_unknown_kind_lists_the_known_ones(tmp_path):
    message = _error(tmp_path, "name: bad\nstages:\n  pretrain: {kind: pretraining}\n")
    assert ":3: stages.pretrain.kind: unknown stage kind 'pretraining'" in message
    assert "sft" in message and "upscale" in message


def test_unknown_stage_reference(tmp_path):
    message = _error(tmp_path, "name: bad\nstages:\n  init: {after: [tokenizer]}\n")
    assert message.endswith(":3: stages.init.after.0: no stage 'tokenizer'")


def test_cycle_is_named(tmp_path):
    message = _error(
        tmp_path,
        "name: bad\nstages:\n  a: {kind: init, after: [b]}\n  b: {kind: init, after: [a]}\n",
    )
    assert "dependency cycle a -> b -> a" in message


def test_bad_override_value_names_the_override(tmp_path):
    text = "name: ok\nstages:\n  init: {}\n"
    message = _error(tmp_path, text, ["stages.init.architecture.num_hidden_layers=many"])
    assert message.startswith("--set stages.init.architecture.num_hidden_layers=many: ")


def test_override_without_equals_sign(tmp_path):
    message = _error(tmp_path, "name: ok\nstages:\n  init: {}\n", ["stages.init.dtype"])
    assert message.startswith("--set stages.init.dtype: expected key.path=value")


def test_override_is_typed_and_applied(tmp_path):
    path = write_recipe(tmp_path, "name: ok\nstages:\n  init: {}\n")
    recipe = load_recipe(path, ["stages.init.architecture.num_hidden_layers=4", "seed=7"])
    assert recipe.stages["init"].architecture.num_hidden_layers == 4
    assert recipe.seed == 7


def test_yaml_syntax_error_has_a_line(tmp_path):
    message = _error(tmp_path, "name: bad\nstages:\n  init: {tokenizer: [}\n")
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}:3: not valid YAML")


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, overrides, expected",
    [
        (
            "name: bad\noutput_dir: OUT\nstages:\n  init: {tokenizr: {}}\n",
            [],
            "stages.init.tokenizr: unknown key",
        ),
        (
            "name: bad\noutput_dir: OUT\nstages:\n  init: {dtype: float8}\n",
            [],
            "stages.init.dtype:",
        ),
        ("name: bad\noutput_dir: OUT\nstages:\n  init: {after: [base]}\n", [], "no stage 'base'"),
        (
            "name: bad\noutput_dir: OUT\nstages:\n  a: {kind: init, after: [a]}\n",
            [],
            "cycle a -> a",
        ),
        (
            "name: ok\noutput_dir: OUT\nstages:\n  init: {}\n",
            ["--set", "stages.init.dtype=int3"],
            "--set stages.init.dtype=int3",
        ),
    ],
    ids=["unknown-key", "wrong-type", "unknown-reference", "cycle", "bad-override"],
)
def test_cli_bad_recipe_exits_2_with_one_line_and_writes_nothing(
    tmp_path, body, overrides, expected
):
    out = tmp_path / "out"
    path = write_recipe(tmp_path, body.replace("OUT", str(out)))
    result = run_cli("run", str(path), *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_show_prints_the_resolved_recipe(tmp_path):
    path = write_recipe(tmp_path, "name: ok\nstages:\n  init: {}\n")
    result = run_cli("show", str(path), "--set", "seed=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "seed: 3" in result.stdout and "num_hidden_layers: 8" in result.stdout


def test_status_loads_the_tiny_recipe_without_importing_torch(tmp_path):
    """`upstack status` is a quick look: the deep checks that import mergekit/torch are skipped
    (TRL's field names come from a per-version cache that the first full load writes)."""
    import subprocess
    import sys

    env = {
        "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}",
        "PATH": "/usr/bin:/bin",
        "XDG_CACHE_HOME": str(tmp_path),
    }

    def load(deep: bool) -> str:
        code = (
            "import sys; from upstack.core.recipe import load_recipe; "
            f"load_recipe('recipes/tiny.yaml', deep={deep}); print('torch' in sys.modules)"
        )
        return subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout.strip()

    assert load(deep=True) == "True"  # the full check: mergekit's registry, TRL's fields
    assert load(deep=False) == "False"


def test_show_prints_the_effective_trainer_settings_of_training_stages(tmp_path):
    """What each training stage passes to TRL: upstack's device defaults and the stage's own,
    under the recipe's `trainer:` values, the way TRL documents its departures from
    TrainingArguments."""
    import json

    result = run_cli("show", str(ROOT / "recipes" / "tiny.yaml"), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)["effective_trainer"]
    assert set(effective) == {"pretrain", "cpt", "sft", "dpo", "dpo_b"}
    pretrain, dpo = effective["pretrain"], effective["dpo"]
    assert pretrain["bf16"] is False and pretrain["activation_checkpointing"] is False  # CPU
    assert pretrain["packing_strategy"] == "wrapped" and pretrain["save_steps"] == 500
    assert pretrain["max_steps"] == 400  # the recipe's own value wins
    assert dpo["precompute_ref_log_probs"] is True and dpo["beta"] == 0.1

    text = run_cli("show", str(ROOT / "recipes" / "tiny.yaml"), cwd=tmp_path).stdout
    recipe_part, effective_part = text.split("\n---\n")
    assert "effective_trainer:" in effective_part and "effective_trainer" not in recipe_part
