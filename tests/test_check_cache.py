"""A recipe whose merge mergekit accepted once loads again without importing mergekit; a change
to the config or to a model's architecture is checked again; a mistake is never remembered."""

import json
import os
import subprocess
import sys

import pytest
from conftest import write_recipe

LOAD = """
import json, sys
from upstack.core.errors import UserError
from upstack.core.recipe import load_recipe
try:
    load_recipe(sys.argv[1])
    error = None
except UserError as err:
    error = str(err)
print(json.dumps({"mergekit_imported": "mergekit" in sys.modules, "error": error}))
"""


def _load(recipe, cache) -> dict:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(recipe)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _merge_recipe(directory, a, b, weights):
    return write_recipe(
        directory,
        f"name: m\noutput_dir: {directory / 'runs'}\nstages:\n  merge:\n"
        "    merge_method: linear\n    models:\n"
        f"      - {{model: {a}, parameters: {{weight: 0.3}}}}\n"
        f"      - {{model: {b}, parameters: {{weight: {weights}}}}}\n",
    )


def test_a_checked_merge_loads_again_without_mergekit(tmp_path, tiny_model):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    cache = tmp_path / "cache"
    recipe = _merge_recipe(tmp_path, tiny_model, other, "[{filter: mlp, value: 0.5}, {value: 0.7}]")
    assert _load(recipe, cache) == {"mergekit_imported": True, "error": None}
    assert _load(recipe, cache) == {"mergekit_imported": False, "error": None}


def _counting_checks(monkeypatch) -> list[str]:
    """The names of the mergekit checks that ran, in this process."""
    from upstack.models import merging
    from upstack.stages import merge

    ran: list[str] = []
    config_check, tensor_check = merge.mergekit_problem, merging.tensor_parameter_problem

    def count(name, check):
        def counted(*args, **kwargs):
            ran.append(name)
            return check(*args, **kwargs)

        return counted

    monkeypatch.setattr(merge, "mergekit_problem", count("config", config_check))
    monkeypatch.setattr(merging, "tensor_parameter_problem", count("tensors", tensor_check))
    return ran


def test_what_a_verdict_depends_on_is_checked_again(tmp_path, tiny_model, monkeypatch):
    import shutil

    from upstack.core.errors import UserError
    from upstack.core.recipe import load_recipe

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ran = _counting_checks(monkeypatch)
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)

    # a filter list without a fallback: mergekit has no weight for the attention tensors
    recipe = _merge_recipe(tmp_path, tiny_model, other, "[{filter: mlp, value: 0.5}]")
    for _ in range(2):  # a mistake is checked, and reported, every time
        with pytest.raises(UserError, match="weight"):
            load_recipe(recipe)
    # the config alone is valid, and kept; the check on its tensors failed and runs again
    assert ran == ["config", "tensors", "tensors"]

    recipe = _merge_recipe(tmp_path, tiny_model, other, "[{filter: mlp, value: 0.5}, {value: 0.7}]")
    ran.clear()
    load_recipe(recipe)
    load_recipe(recipe)
    assert ran == ["config", "tensors"]  # the second load asked nothing

    recipe.write_text(recipe.read_text().replace("value: 0.7", "value: 0.6"))
    ran.clear()
    load_recipe(recipe)
    assert ran == ["config", "tensors"]  # another value, another verdict

    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] += 1  # the same config on another architecture
    (other / "config.json").write_text(json.dumps(config))
    ran.clear()
    load_recipe(recipe)
    assert ran == ["tensors"]
