"""What a training stage's worker needs from accelerate beyond `accelerate launch`: FSDP on CPU.

accelerate 1.15 turns an FSDP config into FSDP only on accelerator devices (GPU, NPU, XPU...): on
a machine without one the workers come up as MULTI_CPU and train plain DDP, the FSDP settings
silently ignored (AcceleratorState.__init__ lists the device types it honours FSDP on). torch's
FSDP2 (`fully_shard`) itself runs on CPU over gloo, so `fsdp_on_cpu` makes the FSDP config mean
FSDP there too: the same sharding, full-state save and sharded checkpoints a GPU run has, which
is what lets the CPU tests check them.
"""

from __future__ import annotations

import os


def fsdp_on_cpu() -> None:
    """When `accelerate launch` asked for FSDP (ACCELERATE_USE_FSDP) and the workers are on CPU,
    make the AcceleratorState they create FSDP with the plugin accelerate built from the config,
    where accelerate itself would fall back to DDP. Idempotent; nothing changes on a GPU."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    import torch

    if torch.cuda.is_available():
        return
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "upstack_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # every AcceleratorState() copies PartialState's MULTI_CPU back over the shared state:
        # set again each time, from the plugin the first (the Accelerator's) left there
        if fsdp_plugin is not None and not getattr(self, "fsdp_plugin", None):
            self.fsdp_plugin = fsdp_plugin
        if (
            getattr(self, "fsdp_plugin", None)
            and self.distributed_type == DistributedType.MULTI_CPU
        ):
            self.distributed_type = DistributedType.FSDP

    __init__.upstack_fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__


def described(accelerator) -> str:
    """How the processes shared the training, for the manifest: single, ddp, fsdp1, fsdp2,
    deepspeed-zero<stage> (what ran, not what was asked for: accelerate may fall back)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if accelerator.num_processes > 1:
        return "ddp"
    return "single"
