"""The malformed-recipe corpus: realistic mistakes, each through the real CLI in a temp dir.

Every case must end as one line `error: FILE:LINE: key.path: what is wrong` (or `--set ...`),
exit code 2, no traceback, and nothing written under the output dir. The cases are grouped by
category (the test id's first word), so `pytest tests/test_corpus.py -q` reads as a scoreboard.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from upstack.commands import cli

SMALL = (
    "tokenizer: {corpus_problems: 100, vocab_size: 400}\n"
    "    architecture: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,\n"
    "                   num_attention_heads: 2, num_key_value_heads: 2}"
)
SYNTH = "seeds: [{source: arith, count: 5}]\n    teacher: {kind: scripted}"
# the shipped ZeRO-3 config, whose mistakes the zero3-* cases make one at a time
ZERO3 = (Path(__file__).resolve().parent.parent / "recipes/accelerate/zero3.yaml").read_text()
FAST = "trainer: {max_steps: 1, per_device_train_batch_size: 2, max_length: 64}"


@dataclass
class Case:
    category: str
    name: str
    recipe: (
        str | bytes
    )  # {out}: the output dir; {model}: a tiny finished model; {tmp}: the temp dir
    expect: str  # in the error line: the key path and what is wrong
    line: int | None = None  # the recipe line the error must name
    args: list[str] = field(default_factory=lambda: ["run", "recipe.yaml"])
    setup: Callable[[Path, Path], None] | None = None  # (tmp, model) -> files the case needs
    env: dict[str, str] = field(default_factory=dict)
    runtime: bool = False  # found while a stage runs: stage headers may precede the error line

    @property
    def id(self) -> str:
        return f"{self.category}-{self.name}"


def jsonl(name: str, *lines: str) -> Callable[[Path, Path], None]:
    def write(tmp: Path, model: Path) -> None:
        (tmp / name).write_text("".join(line + "\n" for line in lines))

    return write


def model_copy(name: str, keep: tuple[str, ...], extra: dict[str, bytes] | None = None):
    """A copy of the tiny model holding only `keep` (and `extra` files)."""

    def write(tmp: Path, model: Path) -> None:
        target = tmp / name
        target.mkdir()
        for path in model.iterdir():
            if path.name in keep:
                shutil.copy(path, target / path.name)
        for file_name, data in (extra or {}).items():
            (target / file_name).write_bytes(data)

    return write


def truncated_model(tmp: Path, model: Path) -> None:
    shutil.copytree(model, tmp / "cut")
    weights = (tmp / "cut" / "model.safetensors").read_bytes()
    (tmp / "cut" / "model.safetensors").write_bytes(weights[: len(weights) // 2])


def lock_held(tmp: Path, model: Path) -> None:
    import fcntl

    (tmp / "out" / ".upstack").mkdir(parents=True)
    handle = (tmp / "out" / ".upstack" / "lock").open("a+")
    fcntl.flock(handle, fcntl.LOCK_EX)
    handle.write("4242")
    handle.flush()
    lock_held.handle = handle  # held until the case ends


def a_file_at(name: str) -> Callable[[Path, Path], None]:
    def write(tmp: Path, model: Path) -> None:
        (tmp / name).write_text("not a directory\n")

    return write


def sft(model: str = "{model}", datasets: str = "[{path: data.jsonl}]", extra: str = "") -> str:
    return (
        f"name: c\noutput_dir: {{out}}\nstages:\n  sft:\n    model: {model}\n"
        f"    datasets: {datasets}\n    {FAST}\n{extra}"
    )


def model_copy_b(tmp: Path, model: Path) -> None:
    """A second local model to merge with the tiny one (a merge takes each input once)."""
    shutil.copytree(model, tmp / "b")


def merge(block: str) -> str:
    """A recipe with one merge stage of these mergekit settings (under `  merge:`)."""
    return "name: c\noutput_dir: {out}\nstages:\n  merge:\n" + block


SLERP_HUB = (
    "    merge_method: slerp\n    base_model: x/a\n    models: [{model: x/a}, {model: x/b}]\n"
)
LOCAL_PAIR = "    models:\n      - model: {model}\n"  # then the first model's parameters, then b
SWEEP = (
    "name: c\noutput_dir: {out}\nstages:\n  soup:\n    kind: merge\n    merge_method: linear\n"
    "    models:\n      - {model: x/a, parameters: {weight: 0.5}}\n"
    "      - {model: x/b, parameters: {weight: 0.5}}\n"
    "    sweep:\n      grid:\n        - key: models.0.parameters.weight\n"
    "          values: [0.3, 0.5, 0.7]\n"
)
EVAL = "  eval:\n    after: [soup]\n    math: null\n"
MOE = (
    "name: c\noutput_dir: {out}\nstages:\n  up:\n    kind: upscale\n    model: {model}\n"
    "    method: moe\n"
)
PEER = (
    "name: c\noutput_dir: {out}\nstages:\n  up:\n    kind: upscale\n    model: {model}\n"
    "    method: peer\n"
)
BRANCH = "    experts: 64\n    heads: 2\n    top_k: 4\n    key_dim: 8\n"  # then layers etc.


def retyped_model(name: str, model_type: str, architecture: str):
    """A copy of the tiny model whose config.json names another architecture."""

    def write(tmp: Path, model: Path) -> None:
        import json

        shutil.copytree(model, tmp / name)
        config = json.loads((tmp / name / "config.json").read_text())
        config.update(model_type=model_type, architectures=[architecture])
        (tmp / name / "config.json").write_text(json.dumps(config))

    return write


GOOD_CHAT = jsonl(
    "data.jsonl",
    '{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}',
)

CASES = [
    # ---------------------------------------------------------------- yaml
    Case(
        "yaml",
        "unclosed-quote",
        'name: c\nstages:\n  init:\n    dtype: "float32\n  x: 1\n',
        "not valid YAML: while scanning a quoted scalar that is never closed",
        line=4,
    ),
    Case(
        "yaml",
        "bad-indent",
        "name: c\nstages:\n  init: {}\n   pretrain: {}\n",
        "not valid YAML",
        line=4,
    ),
    Case("yaml", "tab", "name: c\nstages:\n\tinit: {}\n", "not valid YAML", line=3),
    Case(
        "yaml",
        "not-utf8",
        b"name: c\nstages:\n  init: {}\n# caf\xe9\n",
        "not UTF-8 text (byte 0xe9)",
        line=4,
    ),
    Case("yaml", "empty-file", "", "a recipe is a mapping"),
    Case("yaml", "a-list", "- name: c\n", "a recipe is a mapping"),
    Case(
        "yaml",
        "missing-file",
        "name: c\nstages: {init: {}}\n",
        "recipe file not found",
        args=["run", "nope.yaml"],
    ),
    # ---------------------------------------------------------------- duplicates
    Case(
        "duplicates",
        "stage-copied",
        "name: c\noutput_dir: {out}\nstages:\n  a: {kind: init}\n"
        "  b: {kind: init}\n  a: {kind: init, dtype: bfloat16}\n",
        "stages.a: given twice (lines 4 and 6)",
        line=6,
    ),
    Case(
        "duplicates",
        "trainer-key",
        sft(datasets="[{path: data.jsonl}]").replace(
            FAST, "trainer:\n      max_steps: 1\n      learning_rate: 1.0e-4\n      max_steps: 5"
        ),
        "stages.sft.trainer.max_steps: given twice (lines 8 and 10)",
        line=10,
        setup=GOOD_CHAT,
    ),
    Case(
        "duplicates",
        "top-level",
        "name: c\nseed: 1\nseed: 2\nstages: {init: {}}\n",
        "seed: given twice (lines 2 and 3)",
        line=3,
    ),
    Case(
        "duplicates",
        "inside-a-list",
        sft(datasets="\n      - {path: data.jsonl, split: train, split: test}"),
        "stages.sft.datasets.0.split: given twice",
        line=7,
        setup=GOOD_CHAT,
    ),
    # ---------------------------------------------------------------- keys
    Case(
        "keys",
        "stage-for-stages",
        "name: c\nstage:\n  init: {}\n",
        "stage: unknown key; did you mean 'stages'?",
        line=2,
    ),
    Case(
        "keys",
        "nested-typo",
        "name: c\nstages:\n  init:\n    tokenizer: {vocab_sise: 500}\n",
        "stages.init.tokenizer.vocab_sise: unknown key; did you mean 'vocab_size'?",
        line=4,
    ),
    Case(
        "keys",
        "stage-field-typo",
        sft().replace("    model:", "    modle:"),
        "stages.sft.modle: unknown key; did you mean 'model'?",
        line=5,
        setup=GOOD_CHAT,
    ),
    Case(
        "keys",
        "trainer-typo",
        sft().replace("max_steps", "max_stepz"),
        "stages.sft.trainer.max_stepz: unknown key (not a field of trl.SFTConfig; did you mean "
        "max_steps?)",
        line=7,
        setup=GOOD_CHAT,
    ),
    Case(
        "keys",
        "trainer-owned",
        sft().replace("max_steps: 1", "output_dir: /tmp/x"),
        "stages.sft.trainer.output_dir: set by the stage",
        line=7,
        setup=GOOD_CHAT,
    ),
    Case(
        "keys",
        "kind-typo",
        "name: c\nstages:\n  tune: {kind: sfft}\n",
        "stages.tune.kind: unknown stage kind 'sfft'; did you mean 'sft'?",
        line=3,
    ),
    Case(
        "keys",
        "teacher-field-no-union-tag",
        "name: c\nstages:\n  synth:\n    seeds: [{source: arith}]\n"
        "    teacher: {kind: openai, model: m, base_url: ['http://x:1/v1']}\n",
        "stages.synth.teacher.base_url: unknown key; did you mean 'base_urls'?",
        line=5,
    ),
    Case(
        "keys",
        "seed-source-field",
        "name: c\nstages:\n  synth:\n    seeds: [{source: arith, splt: eval}]\n"
        "    teacher: {kind: scripted}\n",
        "stages.synth.seeds.0.splt: unknown key; did you mean 'split'?",
        line=4,
    ),
    # ---------------------------------------------------------------- types
    Case(
        "types",
        "trainer-int",
        sft().replace("max_steps: 1", "max_steps: ten"),
        "stages.sft.trainer.max_steps: expected int (trl.SFTConfig), got 'ten'",
        line=7,
        setup=GOOD_CHAT,
    ),
    Case(
        "types",
        "trainer-float-list",
        sft().replace("max_steps: 1", "learning_rate: [3.0e-3]"),
        "stages.sft.trainer.learning_rate: expected float (trl.SFTConfig), got [0.003]",
        line=7,
        setup=GOOD_CHAT,
    ),
    Case(
        "types",
        "trainer-bool",
        sft().replace("max_steps: 1", "max_steps: true"),
        "stages.sft.trainer.max_steps: expected int",
        line=7,
        setup=GOOD_CHAT,
    ),
    Case(
        "types",
        "architecture",
        "name: c\nstages:\n  init:\n    architecture: {hidden_size: lots}\n",
        "stages.init.architecture.hidden_size: Input should be a valid integer",
        line=4,
    ),
    Case(
        "types",
        "teacher-concurrency",
        "name: c\nstages:\n  synth:\n    seeds: [{source: arith}]\n"
        "    teacher: {kind: openai, model: m, base_urls: ['http://x:1/v1'], concurrency: many}\n",
        "stages.synth.teacher.concurrency: Input should be a valid integer",
        line=5,
    ),
    Case(
        "types",
        "temperature",
        f"name: c\nstages:\n  synth:\n    {SYNTH}\n    sampling: {{temperature: hot}}\n",
        "stages.synth.sampling.temperature: Input should be a valid number",
        line=6,
    ),
    Case(
        "types",
        "eval-shots",
        "name: c\nstages:\n  init: {}\n  eval:\n    models: [init]\n"
        "    lm_eval: {tasks: [arc_easy], num_fewshot: five}\n",
        "stages.eval.lm_eval.num_fewshot:",
        line=6,
    ),
    # ---------------------------------------------------------------- ranges
    Case(
        "ranges",
        "seed-too-large",
        "name: c\nseed: 99999999999\nstages: {init: {}}\n",
        "seed: Input should be less than 4294967296",
        line=2,
    ),
    Case("ranges", "seed-negative", "name: c\nseed: -1\nstages: {init: {}}\n", "seed:", line=2),
    Case(
        "ranges",
        "test-fraction",
        f"name: c\nstages:\n  synth:\n    {SYNTH}\n  pairs: {{test_fraction: 1.5}}\n",
        "stages.pairs.test_fraction: Input should be less than 1",
        line=6,
    ),
    Case(
        "ranges",
        "batch-size",
        "name: c\nstages:\n  init: {}\n  eval: {models: [init], math: {batch_size: 0}}\n",
        "stages.eval.math.batch_size: Input should be greater than or equal to 1",
        line=4,
    ),
    Case(
        "ranges",
        "num-processes",
        "name: c\nlaunch: {num_processes: 0}\nstages: {init: {}}\n",
        "launch.num_processes: Input should be greater than or equal to 1",
        line=2,
    ),
    Case(
        "references",
        "accelerate-config-missing",
        "name: c\nlaunch: {accelerate_config: configs/zero3.yaml}\nstages: {init: {}}\n",
        "launch.accelerate_config: configs/zero3.yaml: file not found",
        line=2,
    ),
    Case(
        "references",
        "accelerate-config-not-a-mapping",
        "name: c\nlaunch:\n  accelerate_config: {tmp}/ddp.yaml\nstages: {init: {}}\n",
        "launch.accelerate_config: {tmp}/ddp.yaml: an accelerate config is a mapping",
        line=3,
        setup=lambda tmp, model: (tmp / "ddp.yaml").write_text("- multi_gpu\n"),
    ),
    Case(
        "references",
        "accelerate-env-missing",
        "name: c\noutput_dir: {out}\nstages:\n  init:\n    " + SMALL + "\n  cpt:\n    model: init\n"
        "    datasets: [{arith: {problems: 5}}]\n    " + FAST + "\n",
        "ACCELERATE=recipes/accelerate/zero9.yaml: file not found",
        env={"ACCELERATE": "recipes/accelerate/zero9.yaml"},
    ),
    Case(
        "references",
        "zero3-save-sharded",
        "name: c\nlaunch:\n  accelerate_config: {tmp}/zero3.yaml\nstages: {init: {}}\n",
        "launch.accelerate_config: {tmp}/zero3.yaml: deepspeed_config.zero3_save_16bit_model: "
        "must be true",
        line=3,
        setup=lambda tmp, model: (tmp / "zero3.yaml").write_text(
            ZERO3.replace("zero3_save_16bit_model: true", "zero3_save_16bit_model: false")
        ),
    ),
    Case(
        "references",
        "zero3-json-save-sharded",
        "name: c\nlaunch:\n  accelerate_config: {tmp}/zero3.yaml\nstages: {init: {}}\n",
        "launch.accelerate_config: {tmp}/zero3.yaml: {tmp}/ds.json: "
        "zero_optimization.stage3_gather_16bit_weights_on_model_save: must be true",
        line=3,
        setup=lambda tmp, model: (
            (tmp / "ds.json").write_text('{"zero_optimization": {"stage": 3}}'),
            (tmp / "zero3.yaml").write_text(
                f"distributed_type: DEEPSPEED\ndeepspeed_config:\n"
                f"  deepspeed_config_file: {tmp}/ds.json\n"
            ),
        ),
    ),
    Case(
        "references",
        "fsdp-sharded-state-dict",
        "name: c\nlaunch:\n  accelerate_config: {tmp}/fsdp.yaml\nstages: {init: {}}\n",
        "launch.accelerate_config: {tmp}/fsdp.yaml: fsdp_config.fsdp_state_dict_type: "
        "SHARDED_STATE_DICT: must be FULL_STATE_DICT",
        line=3,
        setup=lambda tmp, model: (tmp / "fsdp.yaml").write_text(
            "distributed_type: FSDP\nfsdp_config: {fsdp_version: 2, "
            "fsdp_state_dict_type: SHARDED_STATE_DICT}\n"
        ),
    ),
    Case(
        "references",
        "zero3-precision-disagrees",
        "name: c\noutput_dir: {out}\nlaunch:\n  accelerate_config: {tmp}/zero3.yaml\n"
        "stages:\n  cpt:\n    model: {model}\n    datasets: [{arith: {problems: 5}}]\n"
        "    " + FAST + "\n",
        "launch.accelerate_config: {tmp}/zero3.yaml: mixed_precision: 'bf16', but stages.cpt "
        "trains in fp32 on this machine",
        line=4,
        setup=lambda tmp, model: (tmp / "zero3.yaml").write_text(
            ZERO3.replace("mixed_precision: 'no'", "mixed_precision: bf16")
        ),
    ),
    Case(
        "references",
        "zero3-accumulation-disagrees",
        "name: c\noutput_dir: {out}\nstages:\n  sft:\n    model: {model}\n"
        "    datasets: [{arith: {problems: 5}}]\n    " + FAST + "\n",
        "ACCELERATE=zero3.yaml: deepspeed_config.gradient_accumulation_steps: 4, but "
        "stages.sft accumulates 1 (trainer.gradient_accumulation_steps)",
        env={"ACCELERATE": "zero3.yaml"},
        setup=lambda tmp, model: (tmp / "zero3.yaml").write_text(
            ZERO3.replace("zero_stage: 3", "zero_stage: 3\n  gradient_accumulation_steps: 4")
        ),
    ),
    Case(
        "ranges",
        "kv-heads",
        "name: c\nstages:\n  init:\n    architecture: {num_attention_heads: 4,\n"
        "                   num_key_value_heads: 3}\n",
        "stages.init.architecture.num_key_value_heads: 3 key/value heads do not divide 4",
        line=5,
    ),
    Case(
        "ranges",
        "heads-hidden",
        "name: c\nstages:\n  init:\n    architecture: {hidden_size: 128,\n"
        "                   num_attention_heads: 3, num_key_value_heads: 3}\n",
        "stages.init.architecture.num_attention_heads: 3 heads do not divide hidden_size 128",
        line=5,
    ),
    Case(
        "ranges",
        "dus-beyond-planned-init",
        f"name: c\noutput_dir: {{out}}\nstages:\n  init:\n    {SMALL}\n"
        "  up: {kind: upscale, model: init, drop_layers: 2}\n",
        "stages.up.drop_layers: must be less than the source's 2 layers",
        line=8,
    ),
    Case(
        "ranges",
        "expand-planned",
        f"name: c\noutput_dir: {{out}}\nstages:\n  init:\n    {SMALL}\n"
        "  up: {kind: upscale, model: init, method: expand, new_layers: 3}\n",
        "stages.up.new_layers: must divide the source's 2 layers",
        line=8,
    ),
    Case(
        "ranges",
        "slice-beyond-model",
        "name: c\noutput_dir: {out}\nstages:\n  up:\n    kind: upscale\n"
        "    model: {model}\n    method: layers\n    slices: [{layer_range: [0, 4]}, {layer_range: [6, 9]}]\n",
        "stages.up.slices.1.layer_range: [6, 9) goes past the 8 layers",
        line=8,
    ),
    Case(
        "ranges",
        "dus-odd-target",
        "name: c\nstages:\n  up: {kind: upscale, model: {model}, target_layers: 13}\n",
        "stages.up.target_layers: must be even",
        line=3,
    ),
    Case(
        "ranges",
        "method-key",
        "name: c\nstages:\n  up: {kind: upscale, model: {model}, drop_layers: 2, copies: 2}\n",
        "stages.up.copies: only for method stack, not dus",
        line=3,
    ),
    # ---------------------------------------------------------------- references
    Case(
        "references",
        "stage-typo",
        "name: c\nstages:\n  pretrain: {kind: init}\n"
        "  up: {kind: upscale, model: pretrian, drop_layers: 1}\n",
        "stages.up.model: 'pretrian' is not a stage of this recipe, an existing path, or a Hub id "
        "(org/name); did you mean 'pretrain'?",
        line=4,
    ),
    Case(
        "references",
        "model-is-data",
        f"name: c\nstages:\n  synth:\n    {SYNTH}\n  pairs: {{}}\n"
        "  up: {kind: upscale, model: pairs, drop_layers: 1}\n",
        "stages.up.model: 'pairs' is a stage of kind pairs, not a model",
        line=7,
    ),
    Case(
        "references",
        "data-is-model",
        sft(datasets="[{stage: init, split: instruct}]", model="init") + "  init: {}\n",
        "stages.sft.datasets.0.stage: 'init' is a stage of kind init, not a pairs stage",
        line=6,
    ),
    Case(
        "references",
        "after-typo",
        "name: c\nstages:\n  init: {}\n  eval: {after: [int]}\n",
        "stages.eval.after.0: no stage 'int'; did you mean 'init'?",
        line=4,
    ),
    Case(
        "references",
        "eval-a-data-stage",
        f"name: c\nstages:\n  synth:\n    {SYNTH}\n  eval: {{models: [synth]}}\n",
        "stages.eval.models.0: 'synth' is a stage of kind synth, not a model",
        line=6,
    ),
    Case(
        "references",
        "records-not-synth",
        "name: c\nstages:\n  init: {}\n  pairs: {records: init}\n",
        "stages.pairs.records: 'init' is a stage of kind init, not a synth stage",
        line=4,
    ),
    Case(
        "references",
        "merge-missing-path",
        "name: c\noutput_dir: {out}\nstages:\n  merge:\n"
        "    merge_method: linear\n    models: [{model: ./nowhere, parameters: {weight: 1.0}}]\n",
        "stages.merge.models.0.model: nowhere: no such directory",
        line=6,
    ),
    # ---------------------------------------------------------------- cycles
    Case(
        "cycles",
        "two-stages",
        "name: c\nstages:\n  a: {kind: init, after: [b]}\n  b: {kind: init, after: [a]}\n",
        "dependency cycle a -> b -> a",
        line=3,
    ),
    Case(
        "cycles",
        "self",
        "name: c\nstages:\n  a: {kind: init, after: [a]}\n",
        "dependency cycle a -> a",
        line=3,
    ),
    Case(
        "cycles",
        "through-models",
        "name: c\nstages:\n  a: {kind: upscale, model: b, drop_layers: 1}\n"
        "  b: {kind: upscale, model: a, drop_layers: 1}\n",
        "dependency cycle a -> b -> a",
        line=3,
    ),
    # ---------------------------------------------------------------- data files
    Case(
        "data",
        "no-assistant-turn",
        sft(),
        "stages.sft.datasets.0: none of its 2 rows teaches anything: no assistant turn with text",
        line=6,
        setup=jsonl(
            "data.jsonl",
            '{"messages": [{"role": "user", "content": "1+1?"}]}',
            '{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": " "}]}',
        ),
        runtime=True,
    ),
    Case(
        "data",
        "identical-pairs",
        "name: c\noutput_dir: {out}\nstages:\n  dpo:\n    model: {model}\n"
        "    datasets: [{path: pairs.jsonl}]\n    " + FAST + "\n",
        "stages.dpo.datasets.0: none of its 2 rows teaches anything: chosen equal to rejected",
        line=6,
        setup=jsonl(
            "pairs.jsonl",
            '{"prompt": "1+1?", "chosen": "It is 2.", "rejected": "It is 2."}',
            '{"prompt": "2+2?", "chosen": "4", "rejected": " 4 "}',
        ),
        runtime=True,
    ),
    Case(
        "data",
        "missing-file",
        sft(datasets="[{path: typo.jsonl}]"),
        "stages.sft.datasets.0.path: typo.jsonl: no such file or dataset dir",
        line=6,
    ),
    Case(
        "data",
        "wrong-suffix",
        sft(datasets="[{path: data.xlsx}]"),
        "stages.sft.datasets.0.path: data.xlsx: expected one of .jsonl",
        line=6,
        setup=jsonl("data.xlsx", "x"),
    ),
    Case(
        "data",
        "missing-column",
        sft(),
        "stages.sft.datasets.0: data.jsonl: missing column 'completion' for sft data",
        line=6,
        setup=jsonl("data.jsonl", '{"prompt": "1+1?", "answer": "2"}'),
    ),
    Case(
        "data",
        "first-line-not-json",
        sft(),
        "stages.sft.datasets.0.path: data.jsonl:1: not valid JSON",
        line=6,
        setup=jsonl("data.jsonl", '{"messages": [}'),
    ),
    Case(
        "data",
        "bad-line-mid-file",
        sft(),
        "stages.sft.datasets.0.path: data.jsonl:3: not valid JSON",
        line=6,
        runtime=True,
        setup=jsonl(
            "data.jsonl",
            '{"prompt": "a", "completion": "b"}',
            '{"prompt": "c", "completion": "d"}',
            '{"prompt": "e", "completion": }',
        ),
    ),
    Case(
        "data",
        "exclude-column",
        sft(datasets="[{path: data.jsonl, exclude: [{column: id, prefixes: [x]}]}]"),
        "stages.sft.datasets.0.exclude.0.column: data.jsonl: no column 'id'",
        line=6,
        setup=GOOD_CHAT,
    ),
    Case(
        "data",
        "columns-mapping",
        sft(datasets="[{path: data.jsonl, columns: {question: prompt}}]"),
        "stages.sft.datasets.0.columns.question: data.jsonl: no column 'question'",
        line=6,
        setup=GOOD_CHAT,
    ),
    Case(
        "data",
        "seed-file-bad-line",
        "name: c\nstages:\n  synth:\n    seeds: [{source: jsonl, path: s.jsonl}]\n"
        "    teacher: {kind: openai, model: m, base_urls: ['http://127.0.0.1:9/v1']}\n",
        "stages.synth.seeds.0.path: s.jsonl:2: field 'answer' (columns.answer) is missing",
        line=4,
        setup=jsonl(
            "s.jsonl",
            '{"question": "q", "solution": "s", "answer": "1"}',
            '{"question": "q2", "solution": "s"}',
        ),
    ),
    Case(
        "data",
        "eval-problems-missing",
        "name: c\noutput_dir: {out}\nstages:\n  init: {}\n"
        "  eval:\n    models: [init]\n    math: {problems: {source: jsonl, path: test.jsonl}}\n",
        "stages.eval.math.problems.path: test.jsonl: no such file",
        line=7,
    ),
    Case(
        "data",
        "eval-loss-missing",
        "name: c\noutput_dir: {out}\nstages:\n  init: {}\n"
        "  eval: {models: [init], math: null, loss: {path: heldout.jsonl}}\n",
        "stages.eval.loss.path: heldout.jsonl: no such file",
        line=5,
    ),
    # ---------------------------------------------------------------- model dirs
    Case(
        "models",
        "no-weights",
        sft(model="{tmp}/noweights"),
        "stages.sft.model: {tmp}/noweights has no weights (*.safetensors)",
        line=5,
        setup=lambda t, m: (
            GOOD_CHAT(t, m),
            model_copy("noweights", ("config.json", "tokenizer.json", "tokenizer_config.json"))(
                t, m
            ),
        ),
    ),
    Case(
        "models",
        "config-cut-short",
        sft(model="{tmp}/cut"),
        "stages.sft.model: {tmp}/cut/config.json is not readable JSON",
        line=5,
        setup=lambda t, m: (
            GOOD_CHAT(t, m),
            model_copy(
                "cut",
                ("model.safetensors", "tokenizer.json", "tokenizer_config.json"),
                {"config.json": b'{"architectures": ["LlamaForCausalLM"], "hidden_'},
            )(t, m),
        ),
    ),
    Case(
        "models",
        "no-tokenizer",
        sft(model="{tmp}/notok"),
        "stages.sft.model: {tmp}/notok has no tokenizer (tokenizer.json, tokenizer.model, ...)",
        line=5,
        setup=lambda t, m: (
            GOOD_CHAT(t, m),
            model_copy("notok", ("config.json", "model.safetensors"))(t, m),
        ),
    ),
    Case(
        "models",
        "no-chat-template",
        sft(model="{tmp}/plain"),
        "stages.sft: model {tmp}/plain has no chat template; set `chat_template:`",
        line=4,
        setup=lambda t, m: (
            GOOD_CHAT(t, m),
            model_copy("plain", ("config.json", "model.safetensors", "tokenizer.json"))(t, m),
        ),
    ),
    Case(
        "data",
        "eval-problems-other-columns",
        "name: c\noutput_dir: {out}\nstages:\n  eval:\n    models: [{model}]\n"
        "    math: {problems: {source: jsonl, path: probs.jsonl}}\n    loss: null\n",
        "stages.eval.math.problems",
        line=6,
        setup=jsonl("probs.jsonl", '{"q": "1+1?", "a": "2"}'),
    ),
    Case(
        "data",
        "lm-eval-task-typo",
        "name: c\noutput_dir: {out}\nstages:\n  eval:\n    models: [{model}]\n    math: null\n"
        "    loss: null\n    lm_eval: {tasks: [arc_easyy]}\n",
        "stages.eval.lm_eval.tasks: lm-eval has no task arc_easyy (did you mean arc_easy?)",
        line=8,
    ),
    Case(
        "ranges",
        "logging-steps-zero",
        sft(extra="").replace(FAST, "trainer: {max_steps: 1, logging_steps: 0}"),
        "stages.sft.trainer.logging_steps: must be > 0, got 0",
        line=7,
    ),
    Case(
        "ranges",
        "batch-size-zero",
        sft().replace(FAST, "trainer: {per_device_train_batch_size: 0}"),
        "stages.sft.trainer.per_device_train_batch_size: must be > 0, got 0",
        line=7,
    ),
    Case(
        "ranges",
        "accumulation-zero",
        sft().replace(FAST, "trainer: {gradient_accumulation_steps: 0}"),
        "stages.sft.trainer.gradient_accumulation_steps: must be > 0, got 0",
        line=7,
    ),
    Case(
        "ranges",
        "learning-rate-overflow",
        sft().replace(FAST, "trainer: {learning_rate: 1e999}"),
        "stages.sft.trainer.learning_rate: not a finite number (got '1e999')",
        line=7,
    ),
    Case(
        "ranges",
        "merge-weight-nan",
        "name: c\nstages:\n  init: {}\n  merge:\n    merge_method: linear\n"
        "    models: [{model: init, parameters: {weight: .nan}}]\n",
        "stages.merge.models.0.parameters.weight: not a finite number (got nan)",
        line=6,
    ),
    Case(
        "yaml",
        "alias-bomb",
        "name: c\nstages: {init: {}}\nx: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
        + "".join(
            f"x{i}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(6)
        ),
        "its aliases (*name) expand it to over 100,000 values",
    ),
    Case(
        "yaml",
        "python-tag",
        "name: c\nstages: !!python/object:os.system {init: {}}\n",
        "recipe.yaml:2: not plain YAML data",
    ),
    Case(
        "sweep",
        "a-grid-too-large",
        "name: c\nstages:\n  init: {}\n  soup:\n    kind: merge\n    merge_method: linear\n"
        "    models: [{model: init, parameters: {weight: 1.0}}]\n"
        "    sweep: {grid: [{key: models.0.parameters.weight, values: ["
        + ", ".join(["0.5"] * 100)
        + "]}, {key: dtype, values: ["
        + ", ".join(["float32"] * 100)
        + "]}]}\n  eval: {after: [soup]}\n",
        "stages.soup.sweep.grid: 100 x 100 = 10,000 variants",
        line=8,
    ),
    Case(
        "models",
        "lora-target-absent",
        sft(extra="    adapter: {target_modules: [query, value]}\n"),
        "stages.sft.adapter.target_modules: query, value: no module of LlamaForCausalLM is named so",
        line=8,
        setup=GOOD_CHAT,
        runtime=True,
    ),
    Case(
        "models",
        "chat-template-unknown-name",
        sft(extra="    chat_template: llama-3\n"),
        "stages.sft.chat_template: 'llama-3' is no chat template upstack knows (names: chatml, "
        "llama3, zephyr",
        line=8,
        setup=GOOD_CHAT,
    ),
    Case(
        "models",
        "chat-template-file-missing",
        sft(extra="    chat_template: templates/mine.jinja\n"),
        "stages.sft.chat_template: templates/mine.jinja: no such template file",
        line=8,
        setup=GOOD_CHAT,
    ),
    Case(
        "models",
        "chat-template-of-another-family",
        sft(extra="    chat_template: llama3\n"),
        "stages.sft.chat_template: the llama3 template writes <|eot_id|>, <|start_header_id|>, "
        "<|end_header_id|>, which the tokenizer of {model} does not have as tokens",
        line=8,
        setup=GOOD_CHAT,
    ),
    Case(
        "models",
        "no-config",
        sft(model="{tmp}/noconfig"),
        "has no config.json: not a transformers model dir",
        line=5,
        setup=lambda t, m: (GOOD_CHAT(t, m), model_copy("noconfig", ("model.safetensors",))(t, m)),
    ),
    Case(
        "models",
        "pickle-only",
        sft(model="{tmp}/pickled"),
        "holds only pickled weights (pytorch_model.bin), which upstack does not load",
        line=5,
        setup=lambda t, m: (
            GOOD_CHAT(t, m),
            model_copy("pickled", ("config.json",), {"pytorch_model.bin": b"never unpickled"})(
                t, m
            ),
        ),
    ),
    Case(
        "models",
        "truncated-safetensors",
        sft(model="{tmp}/cut"),
        "model.safetensors: not a readable safetensors file",
        line=5,
        setup=lambda t, m: (GOOD_CHAT(t, m), truncated_model(t, m)),
    ),
    Case(
        "models",
        "merge-input-pickled",
        "name: c\noutput_dir: {out}\nstages:\n  merge:\n"
        "    merge_method: linear\n    models: [{model: {tmp}/pickled, parameters: {weight: 1.0}}]\n",
        "stages.merge.models.0.model: {tmp}/pickled holds only pickled weights",
        line=6,
        setup=model_copy("pickled", ("config.json",), {"pytorch_model.bin": b"x"}),
    ),
    Case(
        "models",
        "merge-planned-shapes",
        "name: c\noutput_dir: {out}\nstages:\n"
        "  a: {kind: init, architecture: {hidden_size: 64, num_attention_heads: 2, num_key_value_heads: 2}}\n"
        "  b: {kind: init}\n  merge:\n    merge_method: linear\n"
        "    models: [{model: a, parameters: {weight: 0.5}}, {model: b, parameters: {weight: 0.5}}]\n",
        "stages.merge.models.1.model: 'b' does not match 'a' (models.0.model): hidden_size: 128 vs 64",
        line=8,
    ),
    Case(
        "models",
        "upscale-missing-dir",
        "name: c\noutput_dir: {out}\nstages:\n"
        "  up: {kind: upscale, model: ./nowhere, drop_layers: 1}\n",
        "stages.up.model: nowhere: no such directory",
        line=4,
    ),
    Case(
        "models",
        "hub-offline",
        sft(model="some-org/not-cached-model"),
        "stages.sft.model: some-org/not-cached-model is not in the local Hugging Face cache, and "
        "HF_HUB_OFFLINE is set",
        line=5,
        setup=GOOD_CHAT,
        env={"HF_HUB_OFFLINE": "1"},
    ),
    # ---------------------------------------------------------------- output dirs
    Case(
        "output",
        "is-a-file",
        "name: c\noutput_dir: {tmp}/taken\nstages: {init: {}}\n",
        "output_dir ({tmp}/taken): {tmp}/taken is a file, not a directory",
        line=2,
        setup=a_file_at("taken"),
    ),
    Case(
        "output",
        "under-a-file",
        "name: c\noutput_dir: {tmp}/taken/runs\nstages: {init: {}}\n",
        "is a file, not a directory",
        line=2,
        setup=a_file_at("taken"),
    ),
    Case(
        "output",
        "unwritable",
        "name: c\noutput_dir: /sys/upstack-corpus\nstages: {init: {}}\n",
        "output_dir (/sys/upstack-corpus): cannot write",
        line=2,
    ),
    Case(
        "output",
        "locked",
        "name: c\noutput_dir: {out}\nstages: {init: {}}\n",
        "another upstack run is using this output dir (pid 4242)",
        setup=lock_held,
    ),
    Case(
        "cycles",
        "through-moe-models",
        "name: c\nstages:\n  a: {kind: upscale, model: b, method: moe, experts: 2}\n"
        "  b: {kind: upscale, model: a, method: moe, experts: 2}\n",
        "stages.a: dependency cycle a -> b -> a",
        line=3,
    ),
    # ---------------------------------------------------------------- paths: upstack writes
    # only under output_dir, and replaces only what it wrote there for this recipe
    Case(
        "paths",
        "stage-name-climbs-out",
        "name: c\noutput_dir: {out}\nstages:\n  ../../shared-base: {kind: init}\n",
        "stages.../../shared-base: a stage name is letters, digits, _ and -",
        line=4,
    ),
    Case(
        "paths",
        "stage-name-absolute",
        "name: c\noutput_dir: {out}\nstages:\n  /tmp/base: {kind: init}\n",
        "a stage name is letters, digits, _ and -",
        line=4,
    ),
    Case(
        "paths",
        "stage-name-nested",
        "name: c\noutput_dir: {out}\nstages:\n  base/wide: {kind: init}\n",
        "a stage name is letters, digits, _ and -",
        line=4,
    ),
    Case(
        "paths",
        "output-dir-root",
        "name: c\noutput_dir: /\nstages: {init: {}}\n",
        "output_dir: / is the file system's root",
        line=2,
    ),
    Case(
        "paths",
        "output-dir-home",
        'name: c\noutput_dir: "~"\nstages: {init: {}}\n',
        "output_dir: ~ is your home directory",
        line=2,
    ),
    Case(
        "paths",
        "a-users-dir-where-a-stage-goes",
        "name: c\noutput_dir: {out}\nstages:\n  init: {}\n  eval: {models: [init], loss: null}\n",
        "stages.eval: {out}/eval exists and upstack did not write it, and running the stage "
        "would replace it",
        line=5,
        setup=lambda tmp, model: (
            (tmp / "out" / "eval").mkdir(parents=True),
            (tmp / "out" / "eval" / "problems.jsonl").write_text("{}\n"),
        ),
    ),
    Case(
        "paths",
        "another-recipes-output-dir",
        "name: c\noutput_dir: {out}\nstages: {init: {}}\n",
        "output_dir: {out} holds the runs of recipe 'other'",
        line=2,
        setup=lambda tmp, model: (
            (tmp / "out" / ".upstack").mkdir(parents=True),
            (tmp / "out" / ".upstack" / "recipe.json").write_text('{"recipe": "other"}'),
        ),
    ),
    Case(
        "paths",
        "another-recipes-stage",
        "name: c\noutput_dir: {out}\nstages: {init: {}}\n",
        "stages.init: {out}/init is stage 'init' of recipe 'other'",
        line=3,
        setup=lambda tmp, model: (
            (tmp / "out" / "init").mkdir(parents=True),
            (tmp / "out" / "init" / "upstack.json").write_text('{"recipe": "other"}'),
        ),
    ),
    Case(
        "paths",
        "input-inside-a-stage-dir",
        sft(datasets="[{path: {out}/sft/data.jsonl}]"),
        "stages.sft.datasets.0.path: {out}/sft/data.jsonl is inside {out}/sft, stage 'sft''s "
        "output, which a run replaces",
        line=6,
    ),
    Case(
        "paths",
        "a-stage-output-by-path",
        "name: c\noutput_dir: {out}\nstages:\n  init: {}\n  up: {kind: upscale, model: {out}/init, drop_layers: 1}\n",
        "stages.up.model: {out}/init is the output of stage 'init': name the stage (init)",
        line=5,
    ),
    # ---------------------------------------------------------------- --set
    Case(
        "set",
        "no-equals",
        "name: c\nstages: {init: {}}\n",
        "--set stages.init.dtype: expected key.path=value",
        args=["run", "recipe.yaml", "--set", "stages.init.dtype"],
    ),
    Case(
        "set",
        "bad-value",
        "name: c\nstages: {init: {}}\n",
        "--set stages.init.dtype=int3: stages.init.dtype:",
        args=["run", "recipe.yaml", "--set", "stages.init.dtype=int3"],
    ),
    Case(
        "set",
        "through-a-value",
        "name: c\nstages: {init: {dtype: float32}}\n",
        "--set stages.init.dtype.x=1: stages.init.dtype is not a mapping",
        args=["run", "recipe.yaml", "--set", "stages.init.dtype.x=1"],
    ),
    Case(
        "set",
        "unknown-key",
        "name: c\nstages: {init: {}}\n",
        "--set stages.init.dtyp=float32: stages.init.dtyp: unknown key; did you mean 'dtype'?",
        args=["run", "recipe.yaml", "--set", "stages.init.dtyp=float32"],
    ),
    Case(
        "set",
        "secret-not-echoed",
        f"name: c\nstages:\n  synth:\n    {SYNTH}\n",
        "--set stages.synth.teacher.api_key_env=<redacted>",
        args=[
            "run",
            "recipe.yaml",
            "--set",
            "stages.synth.teacher.api_key_env=sk-abcdef0123456789abcdef",
        ],
    ),
    # ---------------------------------------------------------------- push
    Case(
        "push",
        "repo-id",
        "name: c\nstages:\n  init: {}\n  push: {model: init, repo_id: not-a-repo}\n",
        "stages.push.repo_id: String should match pattern",
        line=4,
    ),
    Case(
        "push",
        "model-is-data",
        f"name: c\nstages:\n  synth:\n    {SYNTH}\n  push: {{model: synth, repo_id: me/x}}\n",
        "stages.push.model: 'synth' is a stage of kind synth, not a model",
        line=6,
    ),
    Case(
        "push",
        "unfinished",
        "name: c\noutput_dir: {out}\nstages: {init: {}}\n",
        "stages.init is missing: run `upstack run",
        args=["push", "recipe.yaml", "init", "--repo-id", "me/x", "--dry-run"],
    ),
    Case(
        "push",
        "cli-repo-id",
        "name: c\noutput_dir: {out}\nstages: {init: {}}\n",
        "--repo-id nope: expected org/name",
        args=["push", "recipe.yaml", "init", "--repo-id", "nope", "--dry-run"],
    ),
    # ---------------------------------------------------------------- teacher settings
    Case(
        "teacher",
        "key-pasted-as-env-name",
        "name: c\nstages:\n  synth:\n    seeds: [{source: arith}]\n"
        "    teacher: {kind: openai, model: m, base_urls: ['http://x:1/v1'],\n"
        "              api_key_env: sk-proj-abcdefghijklmnop0123456789}\n",
        "stages.synth.teacher.api_key_env: must be the name of an environment variable",
        line=6,
    ),
    Case(
        "teacher",
        "env-unset",
        "name: c\nstages:\n  synth:\n    seeds: [{source: arith}]\n"
        "    teacher: {kind: openai, model: m, base_urls: ['http://x:1/v1'], api_key_env: UPSTACK_CORPUS_KEY}\n",
        "stages.synth.teacher.api_key_env: environment variable UPSTACK_CORPUS_KEY is not set",
        line=5,
        env={"UPSTACK_CORPUS_KEY": ""},
    ),
    Case(
        "teacher",
        "key-in-url",
        "name: c\nstages:\n  synth:\n    seeds: [{source: arith}]\n"
        "    teacher: {kind: openai, model: m, base_urls: ['http://x:1/v1', 'https://me:s3cretKEY@h/v1']}\n",
        "stages.synth.teacher.base_urls: entry 1 has credentials, a query or a fragment, which "
        "manifests and logs would keep",
        line=5,
    ),
    Case(
        "teacher",
        "not-http",
        "name: c\nstages:\n  synth:\n    seeds: [{source: arith}]\n"
        "    teacher: {kind: openai, model: m, base_urls: ['localhost:8000']}\n",
        "stages.synth.teacher.base_urls: 'localhost:8000' is not an http(s) URL",
        line=5,
    ),
    Case(
        "teacher",
        "scripted-jsonl",
        "name: c\nstages:\n  synth:\n    seeds: [{source: jsonl, path: s.jsonl}]\n"
        "    teacher: {kind: scripted}\n",
        "stages.synth: the scripted teacher only knows `arith` and `listops` seeds",
        line=3,
        setup=jsonl("s.jsonl", '{"question": "q", "solution": "s", "answer": "1"}'),
    ),
    Case(
        "teacher",
        "new-numbers-without-arith",
        "name: c\nstages:\n  synth:\n    seeds: [{source: listops}]\n"
        "    teacher: {kind: scripted}\n    augmentations: {new_numbers: 1}\n",
        "stages.synth: augmentations.new_numbers draws new numbers with the `arith` generator, "
        "and no seed source is arith: set it to 0",
        line=3,
    ),
    Case(
        "teacher",
        "vllm-missing",
        "name: c\nstages:\n  synth:\n    seeds: [{source: arith}]\n"
        "    teacher: {kind: vllm, model: {model}}\n",
        "stages.synth.teacher.kind: vllm is not installed",
        line=5,
    ),
    Case(
        "teacher",
        "local-model-is-data",
        f"name: c\nstages:\n  synth:\n    {SYNTH}\n  pairs: {{}}\n"
        "  synth2:\n    kind: synth\n    seeds: [{source: arith}]\n    teacher: {kind: transformers, model: pairs}\n",
        "stages.synth2.teacher.model: 'pairs' is a stage of kind pairs, not a model",
        line=10,
    ),
    # ---------------------------------------------------------------- mixtures (BiMix)
    Case(
        "mixture",
        "shares-count",
        "name: c\nstages:\n  cpt:\n    model: {model}\n"
        "    datasets: [{arith: {problems: 10}}, {generated: {task: noise, problems: 10}}]\n"
        "    mixture: {weights: [0.5, 0.3, 0.2]}\n",
        "stages.cpt.mixture.weights: 3 shares for 2 datasets: one each",
        line=6,
    ),
    Case(
        "mixture",
        "shares-sum",
        "name: c\nstages:\n  cpt:\n    model: {model}\n"
        "    datasets: [{arith: {problems: 10}}, {generated: {task: noise, problems: 10}}]\n"
        "    mixture: {weights: [0.5, 0.6]}\n",
        "stages.cpt.mixture.weights: shares must be positive and sum to 1 (sum 1.1)",
        line=6,
    ),
    Case(
        "mixture",
        "weight-beside-mixture",
        "name: c\nstages:\n  cpt:\n    model: {model}\n    datasets:\n"
        "      - {arith: {problems: 10}, weight: 0.5}\n"
        "      - {generated: {task: noise, problems: 10}}\n    mixture: {weights: entropy}\n",
        "stages.cpt.datasets.0.weight: the mixture decides how much of each source to use",
        line=6,
    ),
    Case(
        "mixture",
        "noise-as-conversations",
        sft(datasets="[{generated: {task: noise, problems: 10}}]"),
        "stages.sft.datasets.0.generated.task: noise gives text only, not sft data",
        line=6,
    ),
    # ---------------------------------------------------------------- layers
    Case(
        "layers",
        "seam-without-upscale",
        "name: c\noutput_dir: {out}\nstages:\n  cpt:\n    model: {model}\n"
        "    datasets: [{arith: {problems: 5}}]\n    train_layers: seam\n",
        "stages.cpt.train_layers: seam needs the layer map of an upscale stage, and model "
        "{model} is no stage of this recipe nor a dir an upscale stage wrote",
        line=7,
    ),
    Case(
        "layers",
        "seam-of-init",
        f"name: c\noutput_dir: {{out}}\nstages:\n  init:\n    {SMALL}\n"
        "  cpt: {model: init, datasets: [{arith: {problems: 5}}], train_layers: duplicates}\n",
        "stages.cpt.train_layers: duplicates needs the layer map of an upscale stage, and model "
        "stage 'init' has none in its lineage",
        line=8,
    ),
    Case(
        "layers",
        "index-out-of-range",
        "name: c\noutput_dir: {out}\nstages:\n  up: {kind: upscale, model: {model}, drop_layers: 3}\n"
        "  cpt:\n    model: up\n    datasets: [{arith: {problems: 5}}]\n"
        "    train_layers: [0, 10]\n",
        "stages.cpt.train_layers.1: layer 10 is out of range: the model has 10 layers (0 to 9)",
        line=8,
    ),
    Case(
        "layers",
        "index-out-of-range-two-down",
        "name: c\noutput_dir: {out}\nstages:\n  up: {kind: upscale, model: {model}, drop_layers: 3}\n"
        "  cpt: {model: up, datasets: [{arith: {problems: 5}}]}\n"
        "  sft:\n    model: cpt\n    datasets: [{arith: {problems: 5}}]\n"
        "    train_layers: [12]\n",
        "stages.sft.train_layers.0: layer 12 is out of range: the model has 10 layers",
        line=9,
    ),
    Case(
        "layers",
        "new-on-dus",
        "name: c\noutput_dir: {out}\nstages:\n  up: {kind: upscale, model: {model}, drop_layers: 3}\n"
        "  cpt:\n    model: up\n    datasets: [{arith: {problems: 5}}]\n    train_layers: new\n",
        "stages.cpt.train_layers: the layer map of 'up' has no new layers "
        "(it has: duplicate, original, seam)",
        line=8,
    ),
    Case(
        "layers",
        "keyword-typo",
        "name: c\nstages:\n  cpt:\n    model: {model}\n    datasets: [{arith: {problems: 5}}]\n"
        "    train_layers: seams\n",
        "stages.cpt.train_layers: expected all, new, seam, duplicates, experts, peer or a list of "
        "layer indices, got 'seams'",
        line=6,
    ),
    Case(
        "layers",
        "index-twice",
        "name: c\nstages:\n  cpt:\n    model: {model}\n    datasets: [{arith: {problems: 5}}]\n"
        "    train_layers: [1, 3, 1]\n",
        "stages.cpt.train_layers.2: layer 1 is listed twice",
        line=6,
    ),
    Case(
        "layers",
        "analyze-not-a-model",
        f"name: c\nstages:\n  synth:\n    {SYNTH}\n  pairs: {{}}\n"
        "  analyze:\n    model: pairs\n    datasets: [{arith: {problems: 5}}]\n",
        "stages.analyze.model: 'pairs' is a stage of kind pairs, not a model",
        line=8,
    ),
    Case(
        "layers",
        "analysis-not-an-analyze-stage",
        "name: c\nstages:\n  init: {}\n"
        "  up: {kind: upscale, model: init, target_layers: 3, analysis: init}\n",
        "stages.up.analysis: 'init' is a stage of kind init, not an analyze stage",
        line=4,
    ),
    Case(
        "layers",
        "analysis-for-stack",
        "name: c\nstages:\n  analyze: {model: {model}, datasets: [{arith: {problems: 5}}]}\n"
        "  up: {kind: upscale, model: {model}, method: stack, copies: 2, analysis: analyze}\n",
        "stages.up.analysis: only for method dus, not stack",
        line=4,
    ),
    # ---------------------------------------------------------------- moe (upscale method moe)
    Case(
        "moe",
        "one-expert",
        MOE + "    experts: 1\n",
        "stages.up.experts: a mixture needs at least 2 experts, got 1",
        line=8,
    ),
    Case(
        "moe",
        "top-k-above-experts",
        MOE + "    experts: 2\n    experts_per_token: 3\n",
        "stages.up.experts_per_token: must be between 1 and the 2 experts, got 3",
        line=9,
    ),
    Case(
        "moe",
        "top-k-zero",
        MOE + "    experts: 4\n    experts_per_token: 0\n",
        "stages.up.experts_per_token: must be between 1 and the 4 experts, got 0",
        line=9,
    ),
    Case(
        "moe",
        "no-experts",
        MOE,
        "stages.up: method moe needs experts",
        line=4,
    ),
    Case(
        "moe",
        "experts-on-dus",
        "name: c\nstages:\n  up: {kind: upscale, model: {model}, drop_layers: 1, experts: 2}\n",
        "stages.up.experts: only for method moe or peer, not dus",
        line=3,
    ),
    Case(
        "moe",
        "hidden-gate-on-a-count",
        MOE + "    experts: 4\n    gate_mode: hidden\n",
        "stages.up.gate_mode: gate_mode hidden routes by each expert's positive_prompts",
        line=9,
    ),
    Case(
        "moe",
        "hidden-gate-without-prompts",
        MOE + "    gate_mode: cheap_embed\n    experts:\n      - positive_prompts: [add]\n"
        "      - negative_prompts: [add]\n",
        "stages.up.experts.1: gate_mode cheap_embed needs positive_prompts for every expert",
        line=11,
    ),
    Case(
        "moe",
        "same-prompts-for-all",
        MOE + "    gate_mode: hidden\n    experts:\n      - positive_prompts: [add, sum]\n"
        "      - positive_prompts: [add, sum]\n",
        "stages.up.experts.1.positive_prompts: every expert has the same prompts",
        line=11,
    ),
    Case(
        "moe",
        "prompts-with-random-gate",
        MOE + "    experts:\n      - {}\n      - positive_prompts: [add]\n",
        "stages.up.experts.1.positive_prompts: gate_mode random does not read prompts",
        line=10,
    ),
    Case(
        "moe",
        "expert-of-another-shape",
        MOE + "    experts:\n      - {}\n      - model: small\n"
        f"  small:\n    kind: init\n    {SMALL}\n",
        "stages.up.experts.1.model: small does not have the shape of the base {model} "
        "(hidden_size: 128 vs 64; intermediate_size: 384 vs 128",
        line=10,
    ),
    Case(
        "moe",
        "expert-of-another-architecture",
        MOE + "    experts: 2\n  up2:\n    kind: upscale\n    model: {model}\n"
        "    method: moe\n    experts: [{}, {model: up}]\n",
        "stages.up2.experts.1.model: up is MixtralForCausalLM, the base {model} LlamaForCausalLM",
        line=13,
    ),
    Case(
        "moe",
        "base-not-llama",
        MOE.replace("{model}", "{tmp}/qwen") + "    experts: 2\n",
        "stages.up.model: method moe upcycles a Llama or Mistral (into a Mixtral) or a Qwen3 "
        "(into a Qwen3-MoE), the mixtures mergekit-moe writes; {tmp}/qwen is Qwen2ForCausalLM",
        line=6,
        setup=retyped_model("qwen", "qwen2", "Qwen2ForCausalLM"),
    ),
    Case(
        "moe",
        "experts-keyword-on-dus",
        "name: c\noutput_dir: {out}\nstages:\n  up: {kind: upscale, model: {model}, drop_layers: 3}\n"
        "  cpt:\n    model: up\n    datasets: [{arith: {problems: 5}}]\n    train_layers: experts\n",
        "stages.cpt.train_layers: the layer map of 'up' has no expert layers "
        "(it has: duplicate, original, seam)",
        line=8,
    ),
    # ---------------------------------------------------------------- peer (upscale method peer)
    Case(
        "peer",
        "experts-not-a-square",
        PEER + "    experts: 1000\n",
        "stages.up.experts: must be a perfect square of at least 4 (N = n^2: two sets of n "
        "sub-keys), got 1000; e.g. 1024 (32^2)",
        line=8,
    ),
    Case("peer", "no-experts", PEER, "stages.up: method peer needs experts", line=4),
    Case(
        "peer",
        "top-k-above-sub-keys",
        PEER + "    experts: 64\n    top_k: 9\n",
        "stages.up.top_k: 9 is more than the 8 sub-keys of each half (sqrt of 64 experts)",
        line=9,
    ),
    Case(
        "peer",
        "odd-key-dim",
        PEER + "    experts: 64\n    top_k: 4\n    key_dim: 9\n",
        "stages.up.key_dim: must be even (two halves of key_dim/2), got 9",
        line=10,
    ),
    Case(
        "peer",
        "layer-out-of-range",
        PEER + BRANCH + "    layers: [2, 8]\n",
        "stages.up.layers.1: layer 8 is out of range: {model} has 8 layers (0 to 7)",
        line=12,
    ),
    Case(
        "peer",
        "layer-twice",
        PEER + BRANCH + "    layers: [2, 3, 2]\n",
        "stages.up.layers.2: layer 2 is named twice",
        line=12,
    ),
    Case(
        "peer",
        "peer-keys-on-dus",
        "name: c\nstages:\n  up: {kind: upscale, model: {model}, drop_layers: 1, heads: 4}\n",
        "stages.up.heads: only for method peer, not dus",
        line=3,
    ),
    Case(
        "peer",
        "base-a-mixture",
        PEER.replace("{model}", "{tmp}/mix") + BRANCH,
        "stages.up.model: {tmp}/mix is MixtralForCausalLM, whose FFN upstack's PEER model "
        "classes do not extend (a mixture's experts take no branch)",
        line=6,
        setup=retyped_model("mix", "mixtral", "MixtralForCausalLM"),
    ),
    Case(
        "peer",
        "peer-of-peer",
        PEER + BRANCH + "  up2: {kind: upscale, model: up, method: peer, experts: 16, top_k: 2}\n",
        "stages.up2.model: up has PEER layers already",
        line=12,
    ),
    Case(
        "peer",
        "dus-of-peer",
        PEER + BRANCH + "  dus: {kind: upscale, model: up, drop_layers: 2}\n",
        "stages.dus.model: up is a PEER model (PeerLlamaForCausalLM, upscale method peer): "
        "mergekit has no definition of its PEER layers",
        line=12,
    ),
    Case(
        "peer",
        "merge-of-peer",
        PEER + BRANCH + "  merge:\n    merge_method: linear\n"
        "    models: [{model: up, parameters: {weight: 0.5}}, {model: {model}, parameters: {weight: 0.5}}]\n",
        "stages.merge.models.0.model: up is a PEER model (PeerLlamaForCausalLM, upscale method "
        "peer): mergekit has no definition of its PEER layers",
        line=14,
    ),
    Case(
        "peer",
        "vllm-teacher-of-peer",
        PEER + BRANCH + "  synth:\n    seeds: [{source: arith}]\n"
        "    teacher: {kind: vllm, model: up}\n",
        "stages.synth.teacher.model: up is a PEER model (PeerLlamaForCausalLM, upscale method "
        "peer): vLLM has no PEER model class",
        line=14,
    ),
    Case(
        "peer",
        "adapter-on-peer-branches",
        PEER + BRANCH + "  cpt:\n    model: up\n    datasets: [{arith: {problems: 5}}]\n"
        "    train_layers: peer\n    adapter: {r: 4}\n",
        "stages.cpt.adapter: train_layers peer trains the PEER tables",
        line=16,
    ),
    Case(
        "peer",
        "peer-keyword-on-dus",
        "name: c\noutput_dir: {out}\nstages:\n  up: {kind: upscale, model: {model}, drop_layers: 3}\n"
        "  cpt:\n    model: up\n    datasets: [{arith: {problems: 5}}]\n    train_layers: peer\n",
        "stages.cpt.train_layers: the layer map of 'up' has no peer layers "
        "(it has: duplicate, original, seam)",
        line=8,
    ),
    # ---------------------------------------------------------------- merge (mergekit's config)
    Case(
        "merge",
        "filter-list-value",
        merge(
            SLERP_HUB
            + "    parameters:\n      t:\n        - {filter: self_attn, value: [0, hot]}\n"
            "        - {value: 0.5}\n"
        ),
        "stages.merge.parameters.t.0.value.1: not a valid value for slerp's 't' ('hot')",
        line=10,
    ),
    Case(
        "merge",
        "filter-key-typo",
        merge(
            SLERP_HUB + "    parameters:\n      t:\n        - {filer: mlp, value: 1}\n"
            "        - {value: 0.5}\n"
        ),
        "stages.merge.parameters.t.0.filer: unknown key (mergekit's ConditionalParameter has no "
        "such key; did you mean 'filter'?)",
        line=10,
    ),
    Case(
        "merge",
        "top-level-typo",
        merge(SLERP_HUB + "    paramters: {t: 0.5}\n"),
        "stages.merge.paramters: unknown key (not upstack's, nor in mergekit's config; did you "
        "mean 'parameters'?)",
        line=8,
    ),
    Case(
        "merge",
        "shared-parameter-per-model",
        merge(
            "    merge_method: slerp\n    base_model: x/a\n"
            "    models: [{model: x/a}, {model: x/b, parameters: {t: 0.5}}]\n"
        ),
        "stages.merge.models.1.parameters.t: 't' applies to the whole slerp merge: set it under "
        "parameters",
        line=7,
    ),
    Case(
        "merge",
        "filter-list-without-fallback",
        merge(
            "    merge_method: linear\n"
            + LOCAL_PAIR
            + "        parameters:\n          weight: [{filter: mlp, value: 1}, {filter: self_attn, value: 0}]\n"
            "      - {model: {tmp}/b, parameters: {weight: 1}}\n"
        ),
        "stages.merge.models.0.parameters.weight: no 'weight' for tensor model.embed_tokens.weight",
        line=9,
        setup=model_copy_b,
    ),
    Case(
        "merge",
        "filter-in-no-tensor",
        merge(
            "    merge_method: linear\n"
            + LOCAL_PAIR
            + "        parameters:\n          weight: [{filter: attn_out, value: 1}, {value: 0.5}]\n"
            "      - {model: {tmp}/b, parameters: {weight: 1}}\n"
        ),
        "stages.merge.models.0.parameters.weight.0.filter: 'attn_out' is in no tensor name",
        line=9,
        setup=model_copy_b,
    ),
    Case(
        "merge",
        "int-gradient-between-points",
        merge(
            "    merge_method: karcher\n    models: [{model: {model}}, {model: {tmp}/b}]\n"
            "    parameters: {max_iter: [10, 15]}\n"
        ),
        "stages.merge.parameters.max_iter: not a valid 'max_iter' for tensor model.layers.1.",
        line=7,
        setup=model_copy_b,
    ),
    Case(
        "merge",
        "slice-past-the-layers",
        merge(
            "    merge_method: passthrough\n    slices:\n"
            "      - sources: [{model: {model}, layer_range: [0, 6]}]\n"
            "      - sources: [{model: {model}, layer_range: [4, 12]}]\n"
        ),
        "stages.merge.slices.1.sources.0.layer_range: [4, 12) goes past the 8 layers",
        line=8,
    ),
    Case(
        "merge",
        "slice-sources-unequal",
        merge(
            "    merge_method: slerp\n    base_model: x/a\n    parameters: {t: 0.5}\n"
            "    slices:\n      - sources:\n          - {model: x/a, layer_range: [0, 32]}\n"
            "          - {model: x/b, layer_range: [0, 30]}\n"
        ),
        "stages.merge.slices.0.sources: every source of a slice needs as many layers",
        line=9,
    ),
    Case(
        "merge",
        "slices-base-not-a-source",
        merge(
            "    merge_method: ties\n    base_model: x/base\n"
            "    slices:\n      - sources:\n"
            "          - {model: x/a, layer_range: [0, 32], parameters: {weight: 1}}\n"
        ),
        "stages.merge.slices.0.sources: merge_method 'ties': Base input is not present in merge "
        "inputs",
        line=8,
    ),
    Case(
        "merge",
        "lora-adapter-missing",
        merge(
            "    merge_method: linear\n"
            "    models: [{model: '{model}+./adapters/mine', parameters: {weight: 1}}]\n"
        ),
        "stages.merge.models.0.model.lora: adapters/mine is not a LoRA adapter dir "
        "(no adapter_config.json)",
        line=6,
    ),
    Case(
        "merge",
        "lora-adapter-is-a-stage",
        "name: c\noutput_dir: {out}\nstages:\n  init: {}\n  merge:\n    merge_method: linear\n"
        "    models: [{model: '{model}+init', parameters: {weight: 1}}]\n",
        "stages.merge.models.0.model.lora: 'init' after `+` is a LoRA adapter",
        line=7,
    ),
    Case(
        "merge",
        "upscale-slice-scale-typo",
        "name: c\noutput_dir: {out}\nstages:\n  up:\n    kind: upscale\n    model: {model}\n"
        "    method: layers\n    slices: [{layer_range: [0, 8], parameters: {scael: 0.5}}]\n",
        "stages.up.slices.0.parameters.scael: unknown parameter 'scael' for passthrough",
        line=8,
    ),
    # ---------------------------------------------------------------- sweeps
    Case(
        "sweep",
        "value-of-the-wrong-type",
        SWEEP.replace("[0.3, 0.5, 0.7]", "[0.3, half]") + EVAL,
        "stages.soup.sweep.grid.0.values.1: not a valid value for linear's 'weight' ('half')",
        line=13,
    ),
    Case(
        "sweep",
        "key-past-a-list",
        SWEEP.replace("models.0.parameters", "models.2.parameters") + EVAL,
        "stages.soup.sweep.grid.0.key: models has 2 entries: no entry 2",
        line=12,
    ),
    Case(
        "sweep",
        "no-eval-stage",
        SWEEP,
        "stages.soup.sweep: name the eval stage that scores the variants in sweep.scored_by "
        "(this recipe has no eval stages; add one, kind: eval)",
        line=10,
    ),
    Case(
        "sweep",
        "metric-the-eval-does-not-measure",
        SWEEP + "      metric: math_accuracy\n" + EVAL,
        "stages.soup.sweep.metric: eval stage 'eval' does not measure math_accuracy",
        line=14,
    ),
    Case(
        "sweep",
        "sweep-name-as-a-model",
        SWEEP + EVAL + "  up: {kind: upscale, model: soup, drop_layers: 1}\n",
        "stages.up.model: 'soup' is a sweep of several merges: take 'soup.best'",
        line=17,
    ),
    Case(
        "sweep",
        "set-a-variant",
        SWEEP + EVAL,
        "--set stages.soup-weight-0p5.dtype=float16: stages.soup-weight-0p5: this name belongs "
        "to a variant of sweep 'soup'",
        args=["run", "recipe.yaml", "--set", "stages.soup-weight-0p5.dtype=float16"],
    ),
    Case(
        "sweep",
        "set-a-grid-value",
        SWEEP + EVAL,
        "--set stages.soup.sweep.grid.0.values=[0.3,heavy]: stages.soup.sweep.grid.0.values.1: "
        "not a valid value for linear's 'weight'",
        args=["run", "recipe.yaml", "--set", "stages.soup.sweep.grid.0.values=[0.3,heavy]"],
    ),
    # ---------------------------------------------------------------- cli
    Case(
        "cli",
        "unknown-target",
        "name: c\noutput_dir: {out}\nstages: {pretrain: {kind: init}}\n",
        "no stage or stage kind named 'pretrian'; did you mean 'pretrain'?",
        args=["run", "recipe.yaml", "pretrian"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_corpus(case: Case, tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    fill = {"{out}": tmp_path / "out", "{model}": tiny_model, "{tmp}": tmp_path}

    def filled(text: str) -> str:
        for placeholder, value in fill.items():
            text = text.replace(placeholder, str(value))
        return text

    text = case.recipe if isinstance(case.recipe, bytes) else filled(case.recipe)
    (tmp_path / "recipe.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    if case.setup:
        case.setup(tmp_path, tiny_model)
    out = tmp_path / "out"
    before = sorted(out.rglob("*")) if out.exists() else None

    code = cli.main(case.args)

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert code == 2, err
    if not case.runtime:
        assert len(lines) == 1, err
    last = lines[-1]
    assert last.startswith("error: ") and filled(case.expect) in last, last
    if case.line is not None:
        assert f"recipe.yaml:{case.line}: " in last, last
    # nothing written under the output dir (the runner's own lock file aside)
    if before is not None:
        assert sorted(p for p in out.rglob("*")) == before
    elif case.runtime:  # the run started: the failed stage left no output that counts as done
        assert not [p for p in out.iterdir() if not p.name.startswith(".")]
    else:
        assert not out.exists()


def test_the_corpus_is_large_and_covers_every_category():
    categories = {case.category for case in CASES}
    assert len(CASES) >= 50
    assert {
        "yaml",
        "keys",
        "types",
        "ranges",
        "references",
        "cycles",
        "duplicates",
        "data",
        "models",
        "output",
        "paths",
        "set",
        "push",
        "teacher",
        "layers",
        "merge",
        "sweep",
        "moe",
        "peer",
    } <= categories
