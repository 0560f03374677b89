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

from upstack.core.errors import UserError
from upstack.core.recipe import load_recipe
from upstack.core.runner import run


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


# Shapes mergekit's own configs and model cards take, each refused or crashing before issue 14:
# a filter list (an AttributeError traceback at load, `show` included), the `slices:` form,
# `weight` for methods that accept and ignore it.
GOOD = {
    "filter-list-and-gradient": """\
    merge_method: slerp
    base_model: x/a
    models: [{model: x/a}, {model: x/b}]
    parameters:
      t:
        - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
        - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
        - {value: 0.5}
""",
    "ties-weight-filter-list": """\
    merge_method: ties
    base_model: x/base
    models:
      - model: x/a
        parameters:
          weight: [{filter: mlp, value: 0.5}, {value: 0}]
          density: [1, 0.5]
""",
    "slices-form": """\
    slices:
      - sources:
          - {model: x/a, layer_range: [0, 32]}
          - {model: x/b, layer_range: [0, 32]}
    merge_method: slerp
    base_model: x/a
    parameters:
      t: [{filter: self_attn, value: [0, 1]}, {value: 0.5}]
""",
    "weight-for-sce": """\
    merge_method: sce
    base_model: x/base
    models: [{model: x/a, parameters: {weight: 1.0}}, {model: x/b, parameters: {weight: 1.0}}]
""",
    "weight-for-karcher": """\
    merge_method: karcher
    models: [{model: x/a, parameters: {weight: 0.5}}, {model: x/b, parameters: {weight: 0.5}}]
""",
    "weight-for-nearswap": """\
    merge_method: nearswap
    base_model: x/a
    models: [{model: x/a}, {model: x/b, parameters: {weight: 1}}]
    parameters: {t: 0.5}
""",
    "weight-for-ram": """\
    merge_method: ram
    base_model: x/base
    models: [{model: x/a, parameters: {weight: 0.5}}]
""",
    "lora-reference": """\
    merge_method: linear
    models: [{model: x/base+x/adapter, parameters: {weight: 1}}]
""",
}


@pytest.mark.parametrize("name", list(GOOD))
def test_model_card_shapes_load(tmp_path, name):
    recipe = write_recipe(tmp_path, f"name: m\nstages:\n  merge:\n{GOOD[name]}")
    loaded = load_recipe(recipe)
    texts = {ref.key: ref.text for ref in loaded.refs("merge")}
    assert "x/a" in texts.values() or "x/base" in texts.values()
    if name == "lora-reference":  # two names, each resolved: the model and its adapter
        assert texts == {"models.0.model": "x/base", "models.0.model.lora": "x/adapter"}
        assert [r.use for r in loaded.refs("merge")] == ["weights", "adapter"]


def test_show_of_a_filter_list_prints_the_recipe(tmp_path):
    recipe = write_recipe(
        tmp_path, f"name: m\nstages:\n  merge:\n{GOOD['filter-list-and-gradient']}"
    )
    result = run_cli("show", str(recipe), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "filter: self_attn" in result.stdout


def _local(tmp_path, zoo, block: str) -> str:
    for name, path in zoo.items():
        block = block.replace("{" + name + "}", str(path))
    recipe = write_recipe(tmp_path, f"name: m\noutput_dir: {tmp_path / 'runs'}\nstages:\n{block}")
    with pytest.raises(UserError) as err:
        load_recipe(recipe)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_filter_list_that_leaves_tensors_without_a_weight_fails_at_load(tmp_path, merge_zoo):
    error = _local(
        tmp_path,
        merge_zoo,
        """\
  merge:
    merge_method: linear
    models:
      - model: {a}
        parameters:
          weight:
            - {filter: self_attn, value: 0.7}
            - {filter: mlp, value: 0.3}
      - {model: {b}, parameters: {weight: 0.5}}
""",
    )
    assert re.search(
        r"recipe.yaml:9: stages.merge.models.0.parameters.weight: no 'weight' for tensor "
        r"model.embed_tokens.weight of .*/a: no filter of this list matches it",
        error,
    ), error


def test_a_gradient_is_evaluated_where_the_layers_put_it(tmp_path, merge_zoo):
    # karcher's max_iter is an int: [10, 20] over 4 layers asks for 13.3 at the second layer
    error = _local(
        tmp_path,
        merge_zoo,
        """\
  merge:
    merge_method: karcher
    models: [{model: {a}}, {model: {b}}]
    parameters:
      max_iter: [10, 20]
""",
    )
    assert (
        "recipe.yaml:8: stages.merge.parameters.max_iter: not a valid 'max_iter' for tensor "
        in error
    )
    assert "model.layers.1." in error and "t=0.333" in error and "integer" in error


def test_a_filter_in_no_tensor_name_fails_at_load(tmp_path, merge_zoo):
    error = _local(
        tmp_path,
        merge_zoo,
        """\
  merge:
    merge_method: slerp
    base_model: {a}
    models: [{model: {a}}, {model: {b}}]
    parameters:
      t: [{filter: self_atn, value: 0.2}, {value: 0.5}]
""",
    )
    assert "stages.merge.parameters.t.0.filter: 'self_atn' is in no tensor name" in error
    assert "model.layers.0." in error


def test_filter_lists_are_checked_on_a_model_the_run_has_yet_to_build(tmp_path):
    # `base` is an init stage nothing has run: its tensors come from the architecture it will have
    recipe = write_recipe(
        tmp_path,
        f"""\
        name: m
        output_dir: {tmp_path / "runs"}
        stages:
          base:
            kind: init
            architecture: {{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                           num_attention_heads: 2, num_key_value_heads: 2}}
          tuned:
            kind: init
            architecture: {{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                           num_attention_heads: 2, num_key_value_heads: 2}}
          merge:
            merge_method: task_arithmetic
            base_model: base
            models:
              - model: base
              - model: tuned
                parameters:
                  weight: [{{filter: mlp, value: 0.5}}, {{filter: self_attn, value: 1}}]
        """,
    )
    with pytest.raises(
        UserError,
        match=r"recipe.yaml:19: stages.merge.models.1.parameters.weight: "
        r"no 'weight' for tensor model.embed_tokens.weight",
    ):
        load_recipe(recipe)
    assert not (tmp_path / "runs").exists()


def test_slices_past_a_models_layers_fail_at_load(tmp_path, merge_zoo):
    error = _local(
        tmp_path,
        merge_zoo,
        """\
  merge:
    merge_method: passthrough
    slices:
      - sources: [{model: {a}, layer_range: [0, 3]}]
      - sources: [{model: {b}, layer_range: [2, 6]}]
""",
    )
    assert (
        "recipe.yaml:8: stages.merge.slices.1.sources.0.layer_range: [2, 6) goes past the 4 layers"
        in error
    )


def test_a_lora_adapter_that_is_not_one_fails_before_the_run(tmp_path, merge_zoo):
    recipe = write_recipe(
        tmp_path,
        f"""\
        name: m
        output_dir: {tmp_path / "runs"}
        stages:
          merge:
            merge_method: linear
            models:
              - {{model: {merge_zoo["base"]}+{merge_zoo["a"]}, parameters: {{weight: 1}}}}
        """,
    )
    with pytest.raises(
        UserError,
        match=r"recipe.yaml:7: stages.merge.models.0.model.lora: .*/a is "
        r"not a LoRA adapter dir \(no adapter_config.json\)",
    ):
        run(load_recipe(recipe), ["merge"])
    assert not (tmp_path / "runs" / "merge").exists()


def test_weight_given_to_sce_is_a_note_when_it_runs(tmp_path, merge_zoo, capsys):
    out = _merge(
        tmp_path,
        f"""\
    merge_method: sce
    base_model: {merge_zoo["base"]}
    models:
      - {{model: {merge_zoo["a"]}, parameters: {{weight: 1.0}}}}
      - {{model: {merge_zoo["b"]}, parameters: {{weight: 1.0}}}}
""",
    )
    assert (out / "model.safetensors").is_file()
    assert (
        "[merge] note: models.0.parameters.weight: sce takes no 'weight'; mergekit ignores it"
        in capsys.readouterr().err
    )
