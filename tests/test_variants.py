"""Mistakes generated, not listed: every numeric setting of every stage kind, upstack's and TRL's
alike, set to NaN, infinity, 0 and -1 through `--set`, as a user would. Each variant is either
taken (a value its field's declared domain allows) or refused at load in one line naming the key
(exit 2) — never a traceback, never a NaN taken. New settings join the run by themselves: the
fields are read from the settings models and TRL's configs, and a numeric field that no recipe
here sets, or that declares no domain, fails the test."""

from __future__ import annotations

import math
import textwrap
import types
import typing
from pathlib import Path

import annotated_types as at
import pytest
from conftest import ROOT
from pydantic import BaseModel

from upstack.commands import cli
from upstack.core import registry
from upstack.core.recipe import load_recipe
from upstack.train import trl_fields
from upstack.train.spec import OWNED

VALUES = {".nan": math.nan, ".inf": math.inf, "0": 0, "-1": -1}

# Settings models the repository's recipes leave out, so every numeric field has a stage that
# sets it: a LoRA adapter, lm-eval, each teacher, hf seeds with a limit, mixtures with rows...
EXTRA = """\
name: variants
output_dir: {out}
stages:
  init: {{}}
  cpt:
    model: init
    datasets: [{{path: data.jsonl, max_samples: 10, max_tokens: 100}}, {{path: b.jsonl, weight: 0.5}}]
    adapter: {{type: lora, r: 8, alpha: 16, dropout: 0.1}}
  cpt_mixed:
    kind: cpt
    model: init
    datasets: [{{path: data.jsonl}}, {{arith: {{problems: 10}}}}]
    mixture: {{weights: entropy, sample_rows: 100, rows: 100}}
  sft:
    model: init
    datasets: [{{generated: {{task: listops, problems: 10}}, max_samples: 5}}]
    eval_fraction: 0.1
  synth_openai:
    kind: synth
    seeds: [{{source: hf, path: org/set, limit: 5}}, {{source: arith, count: 5, seed: 3}}]
    teacher: {{kind: openai, model: m, base_urls: ["http://localhost:1/v1"]}}
  synth_vllm:
    kind: synth
    seeds: [{{source: listops, count: 5, seed: 1}}, {{source: jsonl, path: p.jsonl, limit: 3}}]
    teacher: {{kind: vllm, model: org/teacher, max_model_len: 512}}
  synth_local:
    kind: synth
    seeds: [{{source: champ, limit: 5}}]
    teacher: {{kind: transformers, model: init}}
  moe:
    kind: upscale
    model: init
    method: moe
    experts: [{{noise_scale: 0.01}}, {{noise_scale: 0.02}}]
    experts_per_token: 1
    router_aux_loss_coef: 0.01
  stack: {{kind: upscale, model: init, method: stack, copies: 2}}
  expand: {{kind: upscale, model: init, method: expand, new_layers: 2}}
  dus: {{kind: upscale, model: init, target_layers: 12}}
  merge:
    merge_method: linear
    models: [{{model: init, parameters: {{weight: 1.0}}}}]
    out_shard_size: 100000000
  eval:
    models: [init]
    lm_eval: {{tasks: [arc_easy], num_fewshot: 5, limit: 10, batch_size: 4}}
"""


def numeric(annotation) -> bool:
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(numeric(a) for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:
        return numeric(typing.get_args(annotation)[0])
    return False


def models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in models_in(arg)]


def declared_numeric_fields() -> dict[tuple[str, str], object]:
    """(settings model, field) -> FieldInfo of every numeric field any stage kind has."""
    found, seen = {}, set()

    def walk(cls) -> None:
        if cls in seen:
            return
        seen.add(cls)
        for name, info in cls.model_fields.items():
            if numeric(info.annotation):
                found[cls.__name__, name] = info
            for inner in models_in(info.annotation):
                walk(inner)

    for kind in registry.kinds():
        for spec_class in kind.spec_classes:
            walk(spec_class)
    return found


def numeric_leaves(spec: BaseModel) -> list[tuple[str, str, str]]:
    """(key path in the stage, settings model, field) of every number a validated stage holds,
    its defaults included. Numbers inside a library's own mapping are left to that library's
    check (`trainer:` has a test of its own; mergekit's weights may be negative)."""
    out = []

    def walk(value, path: tuple, owner: str, field: str) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name), (*path, name), type(value).__name__, name)
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                walk(item, (*path, i), owner, field)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append((".".join(map(str, path)), owner, field))

    walk(spec, (), "", "")
    return out


def bounds(info) -> list:
    """A field's declared bounds: on the field, or on the numeric member of its annotation."""
    found = list(info.metadata)

    def inner(annotation) -> None:
        if typing.get_origin(annotation) is typing.Annotated:
            _, *meta = typing.get_args(annotation)
            found.extend(m for field in meta for m in getattr(field, "metadata", [field]))
        for arg in typing.get_args(annotation):
            inner(arg)

    inner(info.annotation)
    return found


def allowed(info, value: float) -> bool:
    """Whether the field's declared bounds admit `value`."""
    for bound in bounds(info):
        if (
            (isinstance(bound, at.Ge) and not value >= bound.ge)
            or (isinstance(bound, at.Gt) and not value > bound.gt)
            or (isinstance(bound, at.Le) and not value <= bound.le)
            or (isinstance(bound, at.Lt) and not value < bound.lt)
        ):
            return False
    return math.isfinite(value)


def recipes(tmp_path: Path) -> list[Path]:
    extra = tmp_path / "variants.yaml"
    extra.write_text(EXTRA.format(out=tmp_path / "runs"))
    return [*sorted((ROOT / "recipes").glob("*.yaml")), extra]


def one_variant_each(paths: list[Path]) -> dict[tuple[str, str], tuple[Path, str, str]]:
    """(settings model, field) -> one (recipe, stage, key path) that holds it."""
    cases = {}
    for path in paths:
        recipe = load_recipe(path, deep=False)
        variants = {v.name for plan in recipe.sweeps.values() for v in plan.variants}
        for stage, spec in recipe.stages.items():
            if stage in variants:
                continue  # a variant's settings are set on its sweep stage
            for key, owner, field in numeric_leaves(spec):
                cases.setdefault((owner, field), (path, stage, key))
    return cases


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("variants")
    return one_variant_each(recipes(tmp))


# Counts a model validator checks against other settings (2 <= experts, top-k <= experts),
# and sizes parsed from text ("5B"): no single bound a field could state.
CHECKED_BY_VALIDATORS = {"experts", "experts_per_token", "out_shard_size"}


def test_every_numeric_setting_declares_its_domain_and_is_exercised(cases):
    declared = declared_numeric_fields()
    unbounded = sorted(
        f"{cls}.{name}"
        for (cls, name), info in declared.items()
        if name not in CHECKED_BY_VALIDATORS
        and not any(isinstance(m, at.Ge | at.Gt) for m in bounds(info))
    )
    assert not unbounded, f"numeric settings without a declared lower bound: {unbounded}"
    missing = sorted(f"{cls}.{name}" for cls, name in set(declared) - set(cases))
    assert not missing, f"numeric settings no recipe here sets (add them to EXTRA): {missing}"


def test_every_numeric_trl_field_has_a_domain():
    for config in ("SFTConfig", "DPOConfig"):
        unknown = set(trl_fields.numeric_fields(config)) - set(trl_fields.DOMAINS)
        assert not unknown, f"trl.{config} numeric fields with no domain: {sorted(unknown)}"


def run_show(path: Path, override: str, capsys) -> tuple[int, list[str]]:
    code = cli.main(["show", str(path), "--set", override])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def check_variant(path: Path, key: str, text: str, info, capsys) -> None:
    value = VALUES[text]
    code, lines = run_show(path, f"{key}={text}", capsys)
    assert code in (0, 2), lines
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("error: --set "), lines
        assert "Traceback" not in "\n".join(lines)
        return
    assert lines == [] or all(not line.startswith("error") for line in lines)
    # taken: the field's declared domain allows it (NaN and infinity never)
    assert allowed(info, value) if info is not None else math.isfinite(value), (key, text)


def test_nan_inf_zero_and_minus_one_in_every_upstack_setting(cases, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes' relative paths (launch configs) are the checkout's
    declared = declared_numeric_fields()
    for (owner, field), (path, stage, key) in sorted(cases.items(), key=str):
        for text in VALUES:
            check_variant(path, f"stages.{stage}.{key}", text, declared.get((owner, field)), capsys)


@pytest.mark.parametrize("config, stage", [("SFTConfig", "sft"), ("DPOConfig", "dpo")])
def test_nan_inf_zero_and_minus_one_in_every_trl_field(config, stage, capsys, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name: t
            output_dir: {tmp_path / "runs"}
            stages:
              init: {{}}
              {stage}:
                model: init
                datasets: [{{path: data.jsonl}}]
            """
        )
    )
    for field in trl_fields.numeric_fields(config):
        if field in OWNED:  # refused whatever the value: the stage sets it
            continue
        low, inclusive, high, sentinels = trl_fields.DOMAINS[field]
        for text, value in VALUES.items():
            code, lines = run_show(path, f"stages.{stage}.trainer.{field}={text}", capsys)
            fits = (
                math.isfinite(value)
                and (value in sentinels or value > low or (inclusive and value == low))
                and (high is None or value <= high)
            )
            assert code == (0 if fits else 2), (field, text, lines)
            if code == 2:
                assert len(lines) == 1 and f"trainer.{field}" in lines[0], lines
