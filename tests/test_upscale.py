"""upscale stage: every output tensor is its source's, expansion is exact, mistakes stop before any write."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, write_recipe
from safetensors.torch import load_file

from upstack.core.errors import UserError
from upstack.core.recipe import load_recipe
from upstack.core.runner import run

N = 8  # layers of the tiny_model fixture
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
OUTSIDE_LAYERS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def by_layer(weights: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in weights.items():
        if match := LAYER.match(name):
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    return layers


def assert_copied(out_dir: Path, source_dir: Path, expected_map: list[int], dtype=None) -> None:
    """Output layer i is source layer expected_map[i], tensor for tensor; the rest is the source's."""
    source, output = tensors(source_dir), tensors(out_dir)
    src_layers, out_layers = by_layer(source), by_layer(output)
    assert sorted(out_layers) == list(range(len(expected_map)))
    for i, j in enumerate(expected_map):
        assert out_layers[i].keys() == src_layers[j].keys()
        for name, tensor in out_layers[i].items():
            want = src_layers[j][name] if dtype is None else src_layers[j][name].to(dtype)
            assert torch.equal(tensor, want), f"layer {i}.{name} is not source layer {j}'s"
    for name in OUTSIDE_LAYERS:
        want = source[name] if dtype is None else source[name].to(dtype)
        assert torch.equal(output[name], want), name
    assert len(output) == len(OUTSIDE_LAYERS) + sum(len(v) for v in out_layers.values())
    assert json.loads((out_dir / "config.json").read_text())["num_hidden_layers"] == len(
        expected_map
    )


@pytest.fixture(scope="module")
def grown(tiny_model, tmp_path_factory) -> Path:
    """One recipe, every method on the tiny model, run once in-process."""
    directory = tmp_path_factory.mktemp("upscale")
    recipe = write_recipe(
        directory,
        f"""
        name: grow
        output_dir: {directory}/runs
        stages:
          dus: {{kind: upscale, model: {tiny_model}, drop_layers: 3}}
          dus_target: {{kind: upscale, model: {tiny_model}, target_layers: 10}}
          stack: {{kind: upscale, model: {tiny_model}, method: stack, copies: 3, dtype: bfloat16}}
          expand: {{kind: upscale, model: {tiny_model}, method: expand, new_layers: 4, shard_size: 300KB}}
          custom:
            kind: upscale
            model: {tiny_model}
            method: layers
            slices: [{{layer_range: [0, 2]}}, {{layer_range: [6, 8]}}, {{layer_range: [1, 2]}}]
          mixed:  # slices of another stage's output and of the stage's own model
            kind: upscale
            model: {tiny_model}
            method: layers
            slices: [{{model: dus, layer_range: [8, 10]}}, {{layer_range: [0, 1]}}]
    """,
    )
    run(load_recipe(recipe), [])
    return directory / "runs"


def test_dus_keeps_the_two_halves_of_solar(grown, tiny_model):
    # n=8, m=3: layers [0, 5) of one copy, [3, 8) of the other: s = 2(n-m) = 10
    expected = [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]
    assert_copied(grown / "dus", tiny_model, expected)
    metrics = json.loads((grown / "dus" / "upstack.json").read_text())["metrics"]
    assert metrics["layer_map"] == expected
    assert (metrics["layers_before"], metrics["layers_after"]) == (N, 10)
    per_layer = metrics["parameters_before"] - metrics["parameters_after"]
    assert metrics["parameters_after"] > metrics["parameters_before"] and per_layer % 2 == 0
    # the layer map: every layer's source and role, as SOLAR's n, m give them
    origins = metrics["layer_origins"]
    assert [(e["source"], e["source_layer"]) for e in origins] == [
        (str(tiny_model), j) for j in expected
    ]
    assert [i for i, e in enumerate(origins) if "seam" in e["roles"]] == [4, 5]
    assert [i for i, e in enumerate(origins) if "duplicate" in e["roles"]] == [5, 6]
    assert [e["copy"] for e in origins] == [0] * 5 + [1, 1] + [0] * 3


def test_target_layers_gives_the_same_model_as_drop_layers(grown):
    a, b = tensors(grown / "dus"), tensors(grown / "dus_target")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stack_repeats_the_whole_stack_in_the_asked_dtype(grown, tiny_model):
    assert_copied(grown / "stack", tiny_model, list(range(N)) * 3, dtype=torch.bfloat16)
    origins = json.loads((grown / "stack" / "upstack.json").read_text())["metrics"]["layer_origins"]
    assert [e["layer"] for e in origins if "seam" in e["roles"]] == [7, 8, 15, 16]
    assert [e["copy"] for e in origins] == [0] * N + [1] * N + [2] * N
    assert json.loads((grown / "stack" / "config.json").read_text())["dtype"] == "bfloat16"


def test_layers_method_takes_explicit_slices(grown, tiny_model):
    assert_copied(grown / "custom", tiny_model, [0, 1, 6, 7, 1])


def test_layers_method_mixes_sources_and_orders_after_them(grown, tiny_model):
    # dus layers 8, 9 are tiny layers 6, 7 (its map: 0 1 2 3 4 3 4 5 6 7)
    assert_copied(grown / "mixed", tiny_model, [6, 7, 0])
    metrics = json.loads((grown / "mixed" / "upstack.json").read_text())["metrics"]
    assert metrics["layer_map"] == [8, 9, 0]
    assert [Path(p).name for p in metrics["layer_sources"]] == ["dus", "dus", tiny_model.name]
    origins = metrics["layer_origins"]
    assert [e["source"] for e in origins] == [
        "dus",
        "dus",
        str(tiny_model),
    ]  # as the recipe names them
    assert [e["roles"] for e in origins] == [
        ["original"],
        ["original", "seam"],
        ["original", "seam"],
    ]


def test_expanded_model_computes_what_the_base_computes(grown, tiny_model):
    from transformers import AutoModelForCausalLM

    out_dir = grown / "expand"
    # groups of 2: after layers 1, 3, 5, 7 an identity copy of that layer
    expected = [0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7]
    identity = {2, 5, 8, 11}
    assert len(list(out_dir.glob("*.safetensors"))) > 1  # shard_size bounded the shards
    source, out_layers = by_layer(tensors(tiny_model)), by_layer(tensors(out_dir))
    assert sorted(out_layers) == list(range(N + 4))
    for i, j in enumerate(expected):
        for name, tensor in out_layers[i].items():
            zeroed = i in identity and ("o_proj" in name or "down_proj" in name)
            if zeroed:
                assert not tensor.any(), f"{i}.{name} should start at zero"
            else:
                assert torch.equal(tensor, source[j][name]), f"{i}.{name} is not source layer {j}'s"
    metrics = json.loads((out_dir / "upstack.json").read_text())["metrics"]
    assert metrics["identity_layers"] == sorted(identity)
    origins = metrics["layer_origins"]
    assert [e["layer"] for e in origins if e["roles"] == ["new"]] == sorted(identity)
    assert all(e["roles"] == ["original"] for e in origins if e["layer"] not in identity)

    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    grown_model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert grown_model.config.num_hidden_layers == N + 4
    ids = torch.randint(4, 700, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(grown_model(ids).logits, base(ids).logits, atol=1e-5, rtol=0)


def test_output_is_a_checkpoint_with_tokenizer_and_chat_template(grown, tiny_model):
    from mergekit.config import MergeConfiguration
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = grown / "dus"
    for name in ("chat_template.jinja", "generation_config.json", "tokenizer.json"):
        assert (out_dir / name).read_bytes() == (tiny_model / name).read_bytes(), name
    messages = [{"role": "user", "content": "Ana has 3 apples."}]
    kwargs = {"add_generation_prompt": True, "return_dict": True, "return_tensors": "pt"}
    source_tok, out_tok = (
        AutoTokenizer.from_pretrained(tiny_model),
        AutoTokenizer.from_pretrained(out_dir),
    )
    prompt = out_tok.apply_chat_template(messages, **kwargs)
    assert torch.equal(
        prompt["input_ids"], source_tok.apply_chat_template(messages, **kwargs)["input_ids"]
    )
    assert out_tok.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    generated = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5

    config = MergeConfiguration.model_validate(
        yaml.safe_load((out_dir / "mergekit_config.yml").read_text())
    )
    assert config.merge_method == "passthrough"
    assert [s.sources[0].layer_range for s in config.slices] == [(0, 5), (3, 8)]
    assert {str(s.sources[0].model.model.path) for s in config.slices} == {
        str(tiny_model.resolve())
    }


def test_upscales_a_stage_and_remaps_per_layer_config_lists(tmp_path, tiny_model):
    """Source is another stage (run first, in order); a Qwen3 config's `layer_types` follows the map."""
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    qwen = tmp_path / "qwen"
    config = Qwen3Config(
        vocab_size=768,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=2,
        tie_word_embeddings=False,
    )
    Qwen3ForCausalLM(config).save_pretrained(qwen)
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    recipe = write_recipe(
        tmp_path,
        f"""
        name: chain
        output_dir: {tmp_path}/runs
        stages:
          init: {{architecture: {{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
                                  num_attention_heads: 2, num_key_value_heads: 2}},
                  tokenizer: {{corpus_problems: 50}}}}
          upscale: {{model: init, drop_layers: 0}}
          qwen: {{kind: upscale, model: {qwen}, drop_layers: 1}}
          qwen_mixed:
            kind: upscale
            model: {qwen}
            method: layers
            slices: [{{model: qwen, layer_range: [4, 6]}}, {{layer_range: [0, 1]}}]
    """,
    )
    run(load_recipe(recipe), [])
    assert_copied(tmp_path / "runs" / "upscale", tmp_path / "runs" / "init", [0, 1, 0, 1])

    out = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "qwen")
    # n=4, m=1: layers [0, 1, 2] + [1, 2, 3]
    assert out.config.layer_types == [
        "full_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "sliding_attention",
    ]
    assert_copied(tmp_path / "runs" / "qwen", qwen, [0, 1, 2, 1, 2, 3])
    # layers 4, 5 of the grown stage (sliding), then layer 0 of the base (full)
    mixed = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "qwen_mixed")
    assert mixed.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert_copied(tmp_path / "runs" / "qwen_mixed", qwen, [2, 3, 0])


# --------------------------------------------------------------------------- mistakes


@pytest.fixture(scope="module")
def foreign_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model under an architecture name mergekit has no definition for."""
    path = tmp_path_factory.mktemp("foreign") / "model"
    shutil.copytree(tiny_model, path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FooForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    return path


RUN_TIME_MISTAKES = {
    "m_equals_n": ("drop_layers: 8", "drop_layers", "must be less than the source's 8 layers"),
    "unreachable_target": ("target_layers: 18", "target_layers", "not reachable from 8 layers"),
    "k_not_dividing_n": (
        "method: expand\n    new_layers: 3",
        "new_layers",
        "must divide the source's 8 layers",
    ),
    "slice_past_the_end": (
        "method: layers\n    slices: [{layer_range: [4, 12]}]",
        "slices.0.layer_range",
        "goes past the 8 layers",
    ),
    "missing_source": (
        "model: /nonexistent/base\n    drop_layers: 2",
        "model",
        "no such directory",
    ),
    "unknown_architecture": (
        "model: FOREIGN\n    drop_layers: 2",
        "model",
        "no architecture definition for FooForCausalLM",
    ),
}
LOAD_TIME_MISTAKES = {
    "odd_target": ("target_layers: 9", "target_layers", "must be even"),
    "key_of_other_method": (
        "drop_layers: 2\n    copies: 2",
        "copies",
        "only for method stack, not dus",
    ),
    "neither_m_nor_s": ("method: dus", "", "needs exactly one of drop_layers"),
    # no `method:` is dus: its errors name the stage's keys, not the union member's
    "neither_without_method": ("shard_size: 1GB", "", "needs exactly one of drop_layers"),
    "unknown_method": (
        "method: grow\n    drop_layers: 2",
        "method",
        "Input should be 'dus', 'stack', 'expand', 'layers', 'moe' or 'peer' (got 'grow')",
    ),
    "stack_of_one": ("method: stack\n    copies: 1", "copies", "greater than or equal to 2"),
    "bad_shard_size": (
        "drop_layers: 2\n    shard_size: lots",
        "shard_size",
        "expected a size like 2GB",
    ),
}


def mistake_recipe(directory: Path, body: str, tiny_model: Path, foreign: Path) -> Path:
    if not body.startswith("model:"):
        body = f"model: {tiny_model}\n    {body}"
    body = body.replace("FOREIGN", str(foreign))
    return write_recipe(
        directory,
        f"name: oops\noutput_dir: {directory}/runs\nstages:\n  up:\n    kind: upscale\n    {body}\n",
    )


@pytest.mark.parametrize("case", [*RUN_TIME_MISTAKES, *LOAD_TIME_MISTAKES])
def test_mistakes_are_one_line_errors_naming_the_key_and_write_nothing(
    case, tmp_path, tiny_model, foreign_model
):
    body, key, message = {**RUN_TIME_MISTAKES, **LOAD_TIME_MISTAKES}[case]
    recipe = mistake_recipe(tmp_path, body, tiny_model, foreign_model)
    with pytest.raises(UserError) as caught:
        run(load_recipe(recipe), [])
    text = str(caught.value)
    assert "\n" not in text
    assert re.match(
        rf"^{re.escape(str(recipe))}:\d+: stages\.up{re.escape('.' + key if key else '')}: ", text
    ), text
    assert message in text
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_cli_reports_a_bad_drop_layers_with_exit_2_and_no_output(tmp_path, tiny_model):
    recipe = mistake_recipe(tmp_path, "drop_layers: 12", tiny_model, tiny_model)
    result = run_cli("run", str(recipe), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {recipe}:7: stages.up.drop_layers: "), (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def _hub_files(files):
    def list_repo_files(repo_id, **kwargs):
        if isinstance(files, Exception):
            raise files
        return files

    return list_repo_files


@pytest.mark.parametrize(
    ("listing", "message"),
    [
        (["config.json", "pytorch_model.bin"], "has no *.safetensors weights on the Hub"),
        (
            OSError("We couldn't connect to 'https://huggingface.co'"),
            "cannot list someorg/base on the Hub",
        ),
    ],
)
def test_hub_sources_must_be_listable_and_safetensors(listing, message, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "list_repo_files", _hub_files(listing))
    recipe = write_recipe(
        tmp_path,
        f"name: hub\noutput_dir: {tmp_path}/runs\nstages:\n  up: {{kind: upscale, model: someorg/base, drop_layers: 2}}\n",
    )
    with pytest.raises(UserError, match=re.escape(message)) as caught:
        run(load_recipe(recipe), [])
    assert f"{recipe}:4: stages.up.model: " in str(caught.value)
    # checked when the stage starts (a dry run stays offline): only the runner's own bookkeeping
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".upstack"]


def test_a_pickled_checkpoint_is_refused(tmp_path, tiny_model):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_model / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    recipe = mistake_recipe(
        tmp_path, f"model: {pickled}\n    drop_layers: 2", tiny_model, tiny_model
    )
    with pytest.raises(UserError, match=r"stages\.up\.model: .* holds only pickled weights"):
        run(load_recipe(recipe), [])


def test_a_source_stage_without_output_and_an_override_are_named(tmp_path, tiny_model):
    from upstack.core.runner import context
    from upstack.stages import upscale

    recipe_path = write_recipe(
        tmp_path,
        f"""
        name: order
        output_dir: {tmp_path}/runs
        stages:
          init: {{}}
          up: {{kind: upscale, model: init, drop_layers: 2}}
          other: {{kind: upscale, model: {tiny_model}, drop_layers: 2}}
        """,
    )
    recipe = load_recipe(recipe_path)
    with pytest.raises(
        UserError, match=r":6: stages\.up\.model: stage 'init' has no finished model"
    ):
        upscale.preflight(recipe.stages["up"], context(recipe, "up", "h"))
    # init runs first: not yet
    upscale.preflight(recipe.stages["up"], context(recipe, "up", "h", frozenset({"init", "up"})))

    overridden = load_recipe(recipe_path, ["stages.other.drop_layers=8"])
    with pytest.raises(UserError) as caught:
        run(overridden, ["other"])
    assert str(caught.value).startswith(
        "--set stages.other.drop_layers=8: stages.other.drop_layers: "
    )
    assert not (tmp_path / "runs").exists()


def test_every_growth_method_has_its_settings_and_its_familys_hooks():
    """The stage hands each hook to the family of the spec's method: every family has them all."""
    from upstack import growth
    from upstack.core.contract import HOOKS
    from upstack.stages import upscale

    # the depth from the GPUs (`settle`, `plan`) is the stage's own: it asks every training
    # stage's plan, which no growth method can (growth sits below the runner)
    hooks = [hook for hook in HOOKS if hasattr(upscale, hook) and hook not in ("settle", "plan")]
    assert {"preflight", "run", "check_at_load", "output_shape", "card_tags"} <= set(hooks)
    for method, family in growth.FAMILIES.items():
        assert growth.SETTINGS[method].model_fields["method"].default == method
        assert [hook for hook in hooks if not callable(getattr(family, hook, None))] == [], method


def test_a_mergekit_without_the_wrapped_function_is_a_clear_error(monkeypatch):
    """upscale wraps one private mergekit function; a release without it fails in one line
    that says what to install, and only when the model has per-layer lists to fix."""
    import mergekit.merge

    from upstack.growth.passthrough import _output_config_lists

    monkeypatch.delattr(mergekit.merge, "_model_out_config")
    with _output_config_lists({}):
        pass  # Llama/Mistral: nothing to fix, nothing wrapped
    lists = _output_config_lists({"layer_types": ["full_attention"] * 4})
    with pytest.raises(UserError, match=r"has no merge._model_out_config.*'mergekit<0.2'"):
        lists.__enter__()


def test_layers_slices_take_mergekit_parameters_per_tensor(tmp_path, merge_zoo):
    # a scaled frankenmerge: the second slice's attention and MLP outputs start at half and
    # grow back to whole over its three layers (a gradient inside a filter list)
    base = merge_zoo["base"]
    recipe = write_recipe(
        tmp_path,
        f"""\
        name: u
        output_dir: {tmp_path / "runs"}
        stages:
          up:
            kind: upscale
            model: {base}
            method: layers
            slices:
              - layer_range: [0, 3]
              - layer_range: [1, 4]
                parameters:
                  scale:
                    - {{filter: o_proj, value: [0.5, 1.0]}}
                    - {{filter: down_proj, value: [0.5, 1.0]}}
                    - {{value: 1.0}}
        """,
    )
    run(load_recipe(recipe), ["up"])
    out_dir = tmp_path / "runs" / "up"
    source, output = by_layer(tensors(base)), by_layer(tensors(out_dir))
    for i, (j, scale) in enumerate([(0, 1), (1, 1), (2, 1), (1, 0.5), (2, 0.75), (3, 1.0)]):
        for name, tensor in output[i].items():
            scaled = "o_proj" in name or "down_proj" in name
            torch.testing.assert_close(tensor, source[j][name] * (scale if scaled else 1))
    assert "scale:" in (out_dir / "mergekit_config.yml").read_text()


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (
            "{scael: 0.5}",
            "recipe.yaml:9: stages.up.slices.0.parameters.scael: unknown parameter 'scael' for "
            "passthrough (takes: scale); did you mean 'scale'?",
        ),
        (
            "{scale: [{filter: o_proj, value: half}, {value: 1}]}",
            "recipe.yaml:9: stages.up.slices.0.parameters.scale.0.value: not a valid value for "
            "passthrough's 'scale' ('half')",
        ),
        (
            "{scale: [{filter: out_proj, value: 0}, {value: 1}]}",
            "recipe.yaml:9: stages.up.slices.0.parameters.scale.0.filter: 'out_proj' is in no "
            "tensor name of this LlamaForCausalLM merge",
        ),
    ],
    ids=["typo", "value", "filter"],
)
def test_layers_slice_parameters_fail_at_load(tmp_path, merge_zoo, parameters, expected):
    recipe = write_recipe(
        tmp_path,
        f"""\
        name: u
        output_dir: {tmp_path / "runs"}
        stages:
          up:
            kind: upscale
            model: {merge_zoo["base"]}
            method: layers
            slices:
              - {{layer_range: [0, 4], parameters: {parameters}}}
        """,
    )
    with pytest.raises(UserError) as err:
        load_recipe(recipe)
    assert expected in str(err.value), str(err.value)
