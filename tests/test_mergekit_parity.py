"""Model-card mergekit configs through `mergekit-yaml` and through upstack: the same tensors, dtypes and config.json."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from upstack.core.recipe import load_recipe
from upstack.core.runner import run

SEED = (
    42  # the recipe's seed: upstack gives it to mergekit (dare, della), mergekit-yaml gets it too
)


@dataclass
class Config:
    name: str
    text: (
        str  # mergekit YAML as a model card prints it; {base} {a} {b} {c} {wide} {lora} are models
    )
    clone_tensors: bool = False  # a layer placed twice: mergekit-yaml needs --clone-tensors
    # mergekit 0.1.5 numbers the tokens a union adds in the order of a Rust hash map (a new order
    # in every run of mergekit-yaml itself): such outputs are compared token by token
    tokens_in_any_order: bool = False


CONFIGS = [
    Config(
        "linear",
        """\
        # a plain weighted average of two fine-tunes
        merge_method: linear
        models:
          - model: {a}
            parameters: {weight: 0.7}
          - model: {b}
            parameters: {weight: 0.3}
        dtype: float32
        """,
    ),
    Config(
        "linear-filters-bf16-out",
        """\
        merge_method: linear
        models:
          - model: {a}
            parameters:
              weight:
                - {filter: self_attn, value: [0.9, 0.1]}   # a gradient over the layers
                - {filter: mlp, value: 0.25}
                - value: 0.5                                # everything else
          - model: {b}
            parameters: {weight: 0.5}
        parameters: {normalize: false}
        dtype: float32
        out_dtype: bfloat16
        """,
    ),
    Config(
        "slerp-gradient-models-form",
        """\
        merge_method: slerp
        base_model: {a}
        models: [{model: {a}}, {model: {b}}]
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: float32
        """,
    ),
    Config(
        "slerp-gradient-slices-form",
        """\
        slices:
          - sources:
              - {model: {a}, layer_range: [0, 4]}
              - {model: {b}, layer_range: [0, 4]}
        merge_method: slerp
        base_model: {a}
        parameters:
          t:
            - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
            - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
            - {value: 0.5}  # layernorms, embeddings
        dtype: float32
        """,
    ),
    Config(
        "slerp-per-slice-parameters",
        """\
        merge_method: slerp
        base_model: {a}
        slices:
          - sources: [{model: {a}, layer_range: [0, 2]}, {model: {b}, layer_range: [0, 2]}]
            parameters: {t: 0.2}
          - sources: [{model: {a}, layer_range: [2, 4]}, {model: {b}, layer_range: [2, 4]}]
            parameters: {t: [0.4, 0.9]}
        parameters: {t: 0.5}
        """,
    ),
    Config(
        "ties-filters-and-gradients",
        """\
        merge_method: ties
        base_model: {base}
        models:
          - model: {base}   # no parameters: the base
          - model: {a}
            parameters:
              density: [1, 0.7, 0.1]
              weight:
                - {filter: mlp, value: 0.5}
                - {value: 0}
          - model: {b}
            parameters:
              density: 0.5
              weight: [0, 0.3, 0.7, 1]
        parameters: {normalize: true, int8_mask: true}
        dtype: float32
        """,
    ),
    Config(
        "task-arithmetic",
        """\
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - {model: {a}, parameters: {weight: 0.6}}
          - {model: {b}, parameters: {weight: 0.4}}
        parameters: {lambda: 0.8}
        dtype: float32
        """,
    ),
    Config(
        "dare-ties-seeded",
        """\
        merge_method: dare_ties
        base_model: {base}
        models:
          - {model: {a}, parameters: {density: 0.53, weight: 0.4}}
          - {model: {b}, parameters: {density: 0.53, weight: 0.3}}
          - {model: {c}, parameters: {density: 0.53, weight: 0.3}}
        parameters: {int8_mask: true}
        dtype: float32
        """,
    ),
    Config(
        "della-seeded",
        """\
        merge_method: della
        base_model: {base}
        models:
          - {model: {a}, parameters: {density: 0.6, weight: 0.5, epsilon: 0.1}}
          - {model: {b}, parameters: {density: 0.4, weight: 0.5, epsilon: 0.15}}
        parameters: {lambda: 1.1, normalize: true}
        dtype: float32
        """,
    ),
    Config(
        "breadcrumbs",
        """\
        merge_method: breadcrumbs
        base_model: {base}
        models:
          - {model: {a}, parameters: {weight: 0.5, density: 0.9, gamma: 0.01}}
          - {model: {b}, parameters: {weight: 0.5, density: 0.9, gamma: 0.02}}
        dtype: float32
        """,
    ),
    Config(
        "model-stock",
        """\
        merge_method: model_stock
        base_model: {base}
        models: [{model: {a}}, {model: {b}}, {model: {c}}]
        parameters: {filter_wise: false}
        dtype: float32
        """,
    ),
    Config(
        "nuslerp",
        """\
        merge_method: nuslerp
        models:
          - {model: {a}, parameters: {weight: 0.4}}
          - {model: {b}, parameters: {weight: 0.6}}
        parameters: {nuslerp_row_wise: true}
        """,
    ),
    Config(
        "multislerp",
        """\
        merge_method: multislerp
        base_model: {base}
        models:
          - {model: {a}, parameters: {weight: 0.5}}
          - {model: {b}, parameters: {weight: 0.3}}
          - {model: {c}, parameters: {weight: 0.2}}
        """,
    ),
    Config(
        "sce-with-ignored-weight",
        """\
        merge_method: sce
        base_model: {base}
        models:
          - {model: {a}, parameters: {weight: 1.0}}   # sce takes no weight: ignored, as mergekit does
          - {model: {b}, parameters: {weight: 1.0}}
        parameters: {select_topk: 0.5}
        dtype: float32
        """,
    ),
    Config(
        "karcher-with-ignored-weight",
        """\
        merge_method: karcher
        models:
          - {model: {a}, parameters: {weight: 0.5}}
          - {model: {b}, parameters: {weight: 0.5}}
          - {model: {c}}
        parameters: {max_iter: 20, tol: 1.0e-6}
        """,
    ),
    Config(
        "nearswap",
        """\
        merge_method: nearswap
        base_model: {base}
        models:
          - {model: {base}}
          - {model: {a}, parameters: {weight: 1.0}}
        parameters: {t: 0.01}
        dtype: float32
        """,
    ),
    Config(
        "ram-with-ignored-weight",
        """\
        merge_method: ram
        base_model: {base}
        models:
          - {model: {a}, parameters: {weight: 0.5}}
          - {model: {b}, parameters: {weight: 0.5}}
        """,
    ),
    Config(
        "arcee-fusion",
        """\
        merge_method: arcee_fusion
        base_model: {base}
        models: [{model: {base}}, {model: {a}}]
        dtype: float32
        """,
    ),
    Config(
        "passthrough-frankenmerge-scaled",
        """\
        # six layers from two four-layer models; the seam's projections scaled down
        merge_method: passthrough
        slices:
          - sources: [{model: {a}, layer_range: [0, 3]}]
          - sources:
              - model: {b}
                layer_range: [1, 4]
                parameters:
                  scale:
                    - {filter: o_proj, value: [0.5, 1.0]}
                    - {filter: down_proj, value: [0.5, 1.0]}
                    - {value: 1.0}
        dtype: float32
        """,
    ),
    Config(
        "passthrough-repeated-layers",
        """\
        merge_method: passthrough
        slices:
          - sources: [{model: {a}, layer_range: [0, 3]}]
          - sources: [{model: {a}, layer_range: [1, 4]}]
        """,
        clone_tensors=True,
    ),
    Config(
        "tokenizer-union-differing-vocabularies",
        """\
        merge_method: linear
        models:
          - {model: {a}, parameters: {weight: 0.5}}
          - {model: {wide}, parameters: {weight: 0.5}}
        tokenizer:
          source: union
          pad_to_multiple_of: 64
        dtype: float32
        """,
        tokens_in_any_order=True,
    ),
    Config(
        "tokenizer-source-base",
        """\
        merge_method: slerp
        base_model: {wide}
        models: [{model: {wide}}, {model: {a}}]
        parameters: {t: 0.3}
        tokenizer_source: base
        dtype: float32
        """,
    ),
    Config(
        "chat-template",
        """\
        merge_method: linear
        models:
          - {model: {a}, parameters: {weight: 0.5}}
          - {model: {b}, parameters: {weight: 0.5}}
        chat_template: chatml   # one of mergekit's named templates
        dtype: float32
        """,
    ),
    Config(
        "lora-reference",
        """\
        merge_method: linear
        models:
          - {model: {base}+{lora}, parameters: {weight: 0.5}}   # mergekit applies the adapter first
          - {model: {a}, parameters: {weight: 0.5}}
        dtype: float32
        """,
    ),
    Config(
        "modules-form",
        """\
        merge_method: linear
        modules:
          default:
            models:
              - {model: {a}, parameters: {weight: 0.25}}
              - {model: {b}, parameters: {weight: 0.75}}
        dtype: float32
        """,
    ),
]


def _filled(config: Config, zoo: dict[str, Path]) -> str:
    text = textwrap.dedent(config.text)
    for name, path in zoo.items():
        text = text.replace("{" + name + "}", str(path))
    return text


def _mergekit_yaml(text: str, out: Path, clone_tensors: bool) -> None:
    """mergekit's own command, `mergekit-yaml CONFIG OUT`, run in this process (its click entry
    point, options and all) to spare ~10 s of imports per config."""
    from mergekit.scripts.run_yaml import main

    config = out.parent / "mergekit.yml"
    config.write_text(text)
    args = [str(config), str(out), "--random-seed", str(SEED), "--quiet"]
    args += ["--lora-merge-cache", str(out.parent / "lora-cache")]
    args += ["--clone-tensors"] if clone_tensors else []
    main.main(args, standalone_mode=False)


def _upstack(text: str, root: Path) -> Path:
    block = textwrap.indent(text, "    ")
    root.mkdir()
    recipe = root / "recipe.yaml"
    recipe.write_text(
        f"name: p\nseed: {SEED}\noutput_dir: {root / 'runs'}\nstages:\n  merge:\n{block}"
    )
    run(load_recipe(recipe), ["merge"])
    return root / "runs" / "merge"


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _by_token(tensors: dict[str, torch.Tensor], model_dir: Path) -> dict[str, torch.Tensor]:
    """Vocabulary tensors split into one row per token (by the token's text) and the padding
    rows after the vocabulary; every other tensor as it is."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(model_dir).get_vocab()
    out = {}
    for name, tensor in tensors.items():
        if "embed_tokens" not in name and "lm_head" not in name:
            out[name] = tensor
            continue
        out.update({f"{name}#{token}": tensor[i] for token, i in vocab.items()})
        out[f"{name}#padding"] = tensor[len(vocab) :]
    return out


def test_the_corpus_covers_the_published_shapes():
    names = " ".join(config.name for config in CONFIGS)
    assert len(CONFIGS) >= 20
    for shape in (
        "linear", "ties", "slerp-gradient-models", "slerp-gradient-slices", "passthrough",
        "task-arithmetic", "dare-ties", "della", "breadcrumbs", "model-stock", "nuslerp",
        "multislerp", "sce", "karcher", "nearswap", "arcee-fusion", "tokenizer-union",
        "chat-template", "lora",
    ):  # fmt: skip
        assert shape in names, shape


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: config.name)
def test_upstack_merges_exactly_as_mergekit_yaml(config, merge_zoo, tmp_path, one_torch_thread):
    text = _filled(config, merge_zoo)
    (tmp_path / "mergekit").mkdir()
    expected_dir = tmp_path / "mergekit" / "out"
    _mergekit_yaml(text, expected_dir, config.clone_tensors)
    got_dir = _upstack(text, tmp_path / "upstack")

    expected, got = _tensors(expected_dir), _tensors(got_dir)
    if config.tokens_in_any_order:
        expected, got = _by_token(expected, expected_dir), _by_token(got, got_dir)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        if name.endswith("#padding"):  # the mean of every token's row: summed in token order
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got[name], tensor), name
    assert json.loads((got_dir / "config.json").read_text()) == json.loads(
        (expected_dir / "config.json").read_text()
    )
    if config.tokens_in_any_order:
        return  # tokenizer.json lists the added tokens in mergekit's order of the day
    # and every other file mergekit wrote (tokenizer, chat template) byte for byte
    for path in expected_dir.iterdir():
        if path.suffix != ".safetensors" and path.name not in ("README.md", "mergekit_config.yml"):
            assert (got_dir / path.name).read_bytes() == path.read_bytes(), path.name
