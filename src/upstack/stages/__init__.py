"""The stage kinds: one module each, named in a literal dict, not a plugin system.

Adding a kind is one line here and one module defining `Spec` (a recipe.StageSpec), `run(spec, ctx)`
and optionally `preflight(spec, ctx)` and `LAUNCHABLE = True`. Modules import only pydantic and the
kernel at the top; torch, transformers, mergekit and TRL are imported inside functions.
"""

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
# What a stage's output is, for references that name a stage: `model: sft` must name a model.
MODEL_KINDS = ("init", "upscale", "cpt", "sft", "dpo", "merge")
DATA_KINDS = ("synth", "pairs")
