"""The kernel: the recipe, references, sweeps, the stage contract and its registry, the run
directory and the runner. It knows no stage kind by name: what it needs of a kind, the kind's
module declares (upstack.core.contract)."""
