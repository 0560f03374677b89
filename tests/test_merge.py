"""merge stage: mergekit merges give the arithmetic they promise; bad configs fail at recipe load."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import run_cli, write_recipe
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from upstack.errors import UserError
from upstack.recipe import load_recipe
from upstack.runner import run


def _weights(model_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _variant(tiny_model, out_dir, seed: int):
    """A copy of the tiny model with every weight moved: a stand-in for a fine-tuned variant."""
    shutil.copytree(tiny_model, out_dir, ignore=shutil.ignore_patterns("upstack.json"))
    generator = torch.Generator().manual_seed(seed)
    for shard in out_dir.glob("*.safetensors"):
        tensors = load_file(shard)
        moved = {
            k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()
        }
        save_file(moved, shard, metadata={"format": "pt"})
    return out_dir


@pytest.fixture(scope="module")
def variants(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return _variant(tiny_model, root / "a", 1), _variant(tiny_model, root / "b", 2)


def _merge(tmp_path, block: str):
    recipe = write_recipe(
        tmp_path, f"name: m\noutput_dir: {tmp_path / 'runs'}\nstages:\n  merge:\n{block}"
    )
    run(load_recipe(recipe), ["merge"])
    return tmp_path / "runs" / "merge"


def test_linear_merge_is_the_weighted_average_tensor_by_tensor(tmp_path, variants):
    a, b = variants
    out = _merge(
        tmp_path,
        f"""\
    merge_method: linear
    models:
      - {{model: {a}, parameters: {{weight: 0.3}}}}
      - {{model: {b}, parameters: {{weight: 0.7}}}}
""",
    )
    merged, wa, wb = _weights(out), _weights(a), _weights(b)
    assert merged.keys() == wa.keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, 0.3 * wa[name] + 0.7 * wb[name])
        assert not torch.equal(tensor, wa[name])
    # tokenizer, chat template and generation config arrive with the weights
    for file_name in (
        "tokenizer.json",
        "chat_template.jinja",
        "generation_config.json",
        "config.json",
    ):
        assert (out / file_name).is_file(), file_name
    config = (out / "mergekit_config.yml").read_text()
    assert str(a) in config and "weight: 0.3" in config
    metrics = json.loads((out / "upstack.json").read_text())["metrics"]
    assert metrics["method"] == "linear" and metrics["parameters"] == sum(
        t.numel() for t in wa.values()
    )


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_slerp_endpoints_return_the_endpoint_models(tmp_path, variants, t):
    a, b = variants
    out = _merge(
        tmp_path,
        f"""\
    merge_method: slerp
    base_model: {a}
    models: [{{model: {a}}}, {{model: {b}}}]
    parameters: {{t: {t}}}
    tokenizer: {{source: base, pad_to_multiple_of: 64}}
""",
    )
    expected = _weights(a if t == 0 else b)
    # mergekit rebuilds the vocabulary from the tokenizer and pads it as asked: the rows of real
    # tokens come from the endpoint, the padding rows are mergekit's own
    tokenizer = AutoTokenizer.from_pretrained(out)
    for name, tensor in _weights(out).items():
        rows = len(tokenizer) if "embed_tokens" in name or "lm_head" in name else None
        assert tensor.shape == expected[name].shape
        torch.testing.assert_close(tensor[:rows], expected[name][:rows])
    # the chat template and the generation config arrive
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(a).chat_template
    assert (out / "generation_config.json").read_text() == (
        a / "generation_config.json"
    ).read_text()


def test_ties_merge_over_stage_outputs_has_every_tensor_and_no_nan(tmp_path, tiny_model, variants):
    # `base` and `sft_a` are stages of the recipe: stage names resolve to their stage dirs.
    a, b = variants
    recipe = write_recipe(
        tmp_path,
        f"""\
    name: m
    output_dir: {tmp_path / "runs"}
    stages:
      base:
        kind: init
      merge:
        merge_method: ties
        base_model: base
        models:
          - {{model: {a}, parameters: {{weight: 0.5, density: 0.5}}}}
          - {{model: {b}, parameters: {{weight: 0.5, density: 0.5}}}}
        parameters: {{normalize: true}}
    """,
    )
    run(load_recipe(recipe), ["merge"])
    out = tmp_path / "runs" / "merge"
    merged, base = _weights(out), _weights(tmp_path / "runs" / "base")
    assert merged.keys() == base.keys()
    assert all(not t.isnan().any() for t in merged.values())
    assert any(not torch.equal(merged[k], base[k]) for k in merged)
    assert str(tmp_path / "runs" / "base") in (out / "mergekit_config.yml").read_text()


def test_models_of_different_shapes_fail_before_anything_is_written(tmp_path, tiny_model):
    shallow = tmp_path / "shallow"
    shutil.copytree(tiny_model, shallow)
    config = json.loads((shallow / "config.json").read_text())
    (shallow / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    recipe = write_recipe(
        tmp_path,
        f"""\
        name: m
        output_dir: {tmp_path / "runs"}
        stages:
          merge:
            merge_method: linear
            models:
              - {{model: {tiny_model}, parameters: {{weight: 0.5}}}}
              - {{model: {shallow}, parameters: {{weight: 0.5}}}}
        """,
    )
    with pytest.raises(
        UserError, match=r"recipe.yaml:8: stages.merge.models.1.model: .*num_hidden_layers: 4 vs 8"
    ):
        run(load_recipe(recipe), ["merge"])
    assert not (tmp_path / "runs" / "merge").exists()


BAD = [
    (
        "merge_method: linear\n    tokenizer_source: base\n    tokenizer: {source: base}\n"
        "    models: [{model: x/a, parameters: {weight: 1}}]",
        "stages.merge: mergekit: Cannot specify both tokenizer_source and tokenizer",
    ),
    (
        "merge_method: lineer\n    models: [{model: x/a, parameters: {weight: 1}}]",
        "stages.merge.merge_method: unknown merge method 'lineer'",
    ),
    (
        "merge_method: slerp\n    base_model: x/a\n    parameters: {t: 0.5}\n"
        "    models: [{model: x/a}, {model: x/b}, {model: x/c}]",
        "stages.merge.models: merge_method 'slerp': Merge method requires exactly 2 inputs",
    ),
    (
        "merge_method: ties\n    models: [{model: x/a, parameters: {weight: 1}}]",
        "stages.merge.base_model: merge_method 'ties' needs a base_model",
    ),
    (
        "merge_method: task_arithmetic\n    models: [{model: x/a, parameters: {weight: 1}}]",
        "stages.merge.base_model: merge_method 'task_arithmetic' needs a base_model",
    ),
    (
        "merge_method: linear\n    models: [{model: x/a, parameters: {weight: 1}}, {model: x/b}]",
        "stages.merge.models.1.parameters.weight: required by merge_method 'linear'",
    ),
    (
        "merge_method: slerp\n    base_model: x/a\n    models: [{model: x/a}, {model: x/b}]",
        "stages.merge.parameters.t: required by merge_method 'slerp'",
    ),
    (
        "merge_method: linear\n    models: [{model: x/a, parameters: {wieght: 1}}]",
        "stages.merge.models.0.parameters.wieght: unknown parameter 'wieght' for linear",
    ),
    (
        "merge_method: linear\n    dtype: float33\n    models: [{model: x/a, parameters: {weight: 1}}]",
        "stages.merge.dtype: not a dtype mergekit knows",
    ),
    (
        "merge_method: linear\n    models: [{model: x/a, parameters: {weight: heavy}}]",
        "stages.merge.models.0.parameters.weight: not a valid value",
    ),
]


@pytest.mark.parametrize(
    ("block", "message"),
    BAD,
    ids=[m.split(":")[0].rsplit(".", 1)[-1] + str(i) for i, (_, m) in enumerate(BAD)],
)
def test_bad_merge_config_fails_at_load_with_the_key_path(tmp_path, block, message):
    recipe = write_recipe(tmp_path, f"name: m\nstages:\n  merge:\n    {block}\n")
    with pytest.raises(UserError) as err:
        load_recipe(recipe)
    assert re.search(rf"recipe\.yaml:\d+: {re.escape(message)}", str(err.value)), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_bad_merge_config_through_the_cli_is_one_line_and_exit_2(tmp_path):
    recipe = write_recipe(
        tmp_path,
        "name: m\nstages:\n  merge:\n    merge_method: ties\n"
        "    models: [{model: x/a, parameters: {weight: 1}}]\n",
    )
    result = run_cli("run", str(recipe), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {recipe}:3: stages.merge.base_model: merge_method 'ties' needs a base_model"
    ]
    assert not (tmp_path / "runs").exists()
