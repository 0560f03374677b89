"""The stage kinds, one module each (init, upscale, analyze, cpt, synth, pairs, sft, dpo, merge,
eval, push), each satisfying upstack.core.contract.StageKind. They import the layers below
(core, models, train, growth) and never each other; upstack.core.registry names them."""
