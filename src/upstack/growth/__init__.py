"""Growth operators: the methods of the upscale stage, by family.

A family is one module: its methods' settings models (upstack.growth.base.GrowthSpec, one per
method, `SETTINGS` by method name) and the hooks the upscale stage hands each method's stage to:
preflight, output_shape, planned_layer_map, check_at_load, run and card_tags, as the stage
contract (upstack.core.contract) takes them. A new operator is its module and its line in FAMILIES.
"""

from __future__ import annotations

from types import ModuleType

from upstack.growth import moe, passthrough, peer
from upstack.growth.base import GrowthSpec

# method -> the module of its family
FAMILIES: dict[str, ModuleType] = {
    "dus": passthrough,  # SOLAR's depth up-scaling, the default
    "stack": passthrough,
    "expand": passthrough,
    "layers": passthrough,
    "moe": moe,
    "peer": peer,
}
# method -> its settings model: the members of the upscale stage's settings union
SETTINGS: dict[str, type[GrowthSpec]] = {
    method: family.SETTINGS[method] for method, family in FAMILIES.items()
}
