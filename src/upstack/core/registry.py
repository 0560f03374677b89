"""The stage kinds: one module each, named in a literal dict, not a plugin system.

Adding a kind is one line here and one module satisfying upstack.core.contract.StageKind. This
is the one place the kernel reaches a stage module, and it does so by name (importlib), only for
the kinds a recipe uses: a stage module imports torch, transformers, mergekit and TRL inside its
functions, so loading a recipe stays quick. tests/test_layers.py allows no other module to
import by name.
"""

from __future__ import annotations

import functools
import importlib

from upstack.core.contract import Kind

STAGE_MODULES: dict[str, str] = {
    "init": "upstack.stages.init",
    "upscale": "upstack.stages.upscale",
    "analyze": "upstack.stages.analyze",
    "cpt": "upstack.stages.cpt",
    "synth": "upstack.stages.synth",
    "pairs": "upstack.stages.pairs",
    "sft": "upstack.stages.sft",
    "dpo": "upstack.stages.dpo",
    "merge": "upstack.stages.merge",
    "eval": "upstack.stages.eval",
    "push": "upstack.stages.push",
}


def known(name: str) -> bool:
    return name in STAGE_MODULES


@functools.cache
def kind(name: str) -> Kind:
    """The stage kind `name` (a key of STAGE_MODULES), its module imported on first use."""
    return Kind.of(name, importlib.import_module(STAGE_MODULES[name]))


def kinds() -> list[Kind]:
    """Every kind (imports every stage module: for tests and documentation, not for loading)."""
    return [kind(name) for name in STAGE_MODULES]


def kinds_making(output: str) -> list[str]:
    """The kinds whose stage dir holds `output` ("model", "data", ...), for messages."""
    return [k.name for k in kinds() if k.output == output]
