"""The stage contract: every stage module satisfies it, and the kernel reaches kinds only through it."""

from __future__ import annotations

import ast
import difflib
import inspect
import types

import pytest
from conftest import ROOT

from upstack.core import registry
from upstack.core.contract import HOOKS, ContractError, Kind, contract_problems


@pytest.mark.parametrize("name", list(registry.STAGE_MODULES))
def test_every_stage_module_satisfies_the_contract(name):
    kind = registry.kind(name)
    assert contract_problems(kind.module) == []
    assert kind.output in ("model", "data", "analysis", "results", "nothing")
    assert kind.layer_map in ("writes", "keeps", "none")
    assert kind.layer_map == "none" or kind.output == "model"  # only models have layers
    # every class of its settings says which kind it is
    for spec_class in kind.spec_classes:
        assert spec_class.model_fields["kind"].default == name
    # a function named almost like a hook is a typo the kernel would never call
    public = [n for n, f in vars(kind.module).items() if inspect.isfunction(f)]
    for function in public:
        close = difflib.get_close_matches(function, list(HOOKS), n=1, cutoff=0.8)
        assert not close or close[0] == function, f"{name}.{function}: did you mean {close[0]}?"


def test_what_the_kinds_declare():
    """The declarations the kernel acts on, written down once here as the design says them."""
    declared = {k.name: (k.output, k.layer_map, k.launchable) for k in registry.kinds()}
    assert declared == {
        "init": ("model", "none", False),
        "upscale": ("model", "writes", False),
        "analyze": ("analysis", "none", False),
        "cpt": ("model", "keeps", True),
        "synth": ("data", "none", False),
        "pairs": ("data", "none", False),
        "sft": ("model", "keeps", True),
        "dpo": ("model", "keeps", True),
        "merge": ("model", "keeps", False),
        "eval": ("results", "none", False),
        "push": ("nothing", "none", False),
    }
    assert registry.kinds_making("data") == ["synth", "pairs"]


def test_a_module_that_breaks_the_contract_is_refused():
    module = types.ModuleType("upstack.stages.broken")
    module.OUTPUT, module.LAYER_MAP, module.LAUNCHABLE = "weights", "none", "yes"

    def preflight(spec):  # one parameter short
        return None

    module.preflight = preflight
    problems = contract_problems(module)
    assert "declares no Spec" in problems
    assert any(p.startswith("OUTPUT = 'weights'") for p in problems)
    assert any(p.startswith("LAUNCHABLE = 'yes'") for p in problems)
    assert "defines no run()" in problems
    assert "preflight(spec) should take (spec, ctx)" in problems
    with pytest.raises(ContractError, match=r"upstack\.stages\.broken"):
        Kind.of("broken", module)


def test_hooks_a_module_leaves_out_get_the_contract_defaults():
    pairs = registry.kind("pairs")  # defines run and preflight only
    assert pairs.output_shape(None, None) is None
    assert pairs.measures(None) == ()
    assert pairs.card_tags(None) == []
    assert pairs.preflight is pairs.module.preflight


def test_the_kernel_never_names_a_kind():
    """core/ decides by what a kind declares, never by its name: a kind name as a value in the
    kernel's code (not its docstrings or messages) is a kind hard-coded."""
    kinds = set(registry.STAGE_MODULES)
    found = []
    for path in sorted((ROOT / "src" / "upstack" / "core").glob("*.py")):
        if path.name == "registry.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        messages = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and node.value in kinds
                and id(node) not in docstrings | messages
            ):
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert not found, "\n".join(found)
