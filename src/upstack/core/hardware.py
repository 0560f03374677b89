"""The machine a plan is for: GPUs (how many, how much memory, how fast), how a training stage is
launched on them (single device, DDP, ZeRO, FSDP, CPU offload), the MFU and price a plan
assumes. Read from words (`8xH100-80GB`), from the recipe's launch block and accelerate config,
or from this machine (nvidia-smi); nothing here imports torch.

GPU memory sizes are GiB (2**30 bytes): an "80GB" H100 has 80 GiB, and every memory figure a
plan prints is in GiB.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

GIB = 2**30

# name -> (memory in GiB as sold, dense bf16 tensor-core peak in TFLOP/s from NVIDIA's data sheets:
# the figures bench/gpu.py divides by, so an MFU measured there reads the same here)
GPUS: dict[str, tuple[float, float]] = {
    "H100": (80, 989.4),  # SXM, "H100 80GB HBM3"
    "H100-PCIe": (80, 756.0),
    "H100-NVL": (94, 835.0),
    "H200": (141, 989.4),
    "GH200": (96, 989.4),
    "B200": (180, 2250.0),
    "A100": (80, 312.0),  # A100-40GB: the same peak, 40 GiB
    "L40S": (48, 362.1),
}
# The published MFU a plan assumes until one is measured here: Llama 3 405B's pre-training on
# 16,384 H100s with 131k-token sequences, 38% bf16 MFU, the lowest of the 38-43% its paper
# reports (Dubey et al. 2024, "The Llama 3 Herd of Models", Table 4). A fine-tuning job on 8 GPUs
# with ZeRO-3 should reach it; bench/gpu.py measured 7-10% for a 0.85B model at 3.4k tokens
# per step, far from filling an H200 (docs/ARCHITECTURE.md, Known limits).
DEFAULT_MFU = 0.38
MFU_SOURCE = "Llama 3 405B pre-training, 16K H100s (Dubey et al. 2024, Table 4: 38-43%)"
# What the driver, the CUDA context, cuBLAS and NCCL workspaces take on each GPU outside
# torch's allocator (torch.cuda.max_memory_allocated does not count it)
CUDA_RESERVE_GIB = 1.0

# [COUNT x] [NAME] [-MEMORY GB]: 8xH100-80GB, 8x80GB, H200, 8
_GPUS_TEXT = re.compile(
    r"^(?:(?P<count>\d+)\s*(?:[x×*]\s*|$))?"
    r"(?P<name>[A-Za-z][A-Za-z0-9]*(?:-(?:PCIe|NVL|SXM))?)?"
    r"(?:-?(?P<memory>\d+(?:\.\d+)?)\s*(?:GB|GiB|G))?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Gpus:
    """GPUs per node, each with `memory_gib`; `tflops` its dense bf16 peak (None: unknown)."""

    count: int
    memory_gib: float
    name: str
    tflops: float | None
    nodes: int = 1

    @property
    def total(self) -> int:
        return self.count * self.nodes

    def describe(self) -> str:
        nodes = f" x {self.nodes} nodes" if self.nodes > 1 else ""
        return f"{self.count}x {self.name} ({self.memory_gib:g} GiB each){nodes}"


def parse_gpus(
    text: str | None,
    memory: str | float | None = None,
    nodes: int = 1,
    tflops: float | None = None,
) -> Gpus:
    """`8xH100-80GB`, `8xH100`, `4xA100-40GB`, `2x24GB`, `H200`, or a count (`8`) with
    `memory` ("80GB"). ValueError says what is wrong."""
    text = (text or "").strip() or "1"
    match = _GPUS_TEXT.match(text)
    if not match or not (match["name"] or match["memory"] or match["count"]):
        raise ValueError(f"{text!r} is not a GPU description like 8xH100-80GB, 8x80GB or H200")
    count = int(match["count"] or 1)
    if count < 1:
        raise ValueError(f"{text!r}: at least one GPU")
    name = match["name"]
    known = {k.lower(): k for k in GPUS}
    if name and name.lower() not in known:
        raise ValueError(
            f"{text!r}: unknown GPU {name} (known: {', '.join(GPUS)}); give its memory instead, "
            "e.g. 8x48GB, with the plan's --tflops for times"
        )
    canonical = known[name.lower()] if name else None
    size = _gib(memory) if memory is not None else None
    if size is None and match["memory"]:
        size = float(match["memory"])
    if size is None and canonical:
        size = GPUS[canonical][0]
    if size is None:
        raise ValueError(f"{text!r}: how much memory has each GPU? (e.g. {count}x80GB)")
    if size <= 0:
        raise ValueError(f"{text!r}: GPU memory must be positive")
    peak = tflops if tflops is not None else (GPUS[canonical][1] if canonical else None)
    label = f"{canonical}-{size:g}GB" if canonical else f"{size:g}GB"
    return Gpus(count=count, memory_gib=size, name=label, tflops=peak, nodes=max(1, nodes))


def _gib(value: str | float) -> float:
    if isinstance(value, int | float):
        return float(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GB|GiB|G)?\s*", value, re.IGNORECASE)
    if not match:
        raise ValueError(f"{value!r} is not a memory size like 80GB")
    return float(match[1])


def gpus_problem(text: str) -> str | None:
    try:
        parse_gpus(text)
    except ValueError as err:
        return str(err)
    return None


def detect() -> Gpus | None:
    """This machine's GPUs (nvidia-smi: no torch import), None without any."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [line.split(",") for line in out.strip().splitlines() if "," in line]
    if not rows:
        return None
    name, mib = rows[0][0].strip(), float(rows[0][1])
    found = next(
        (k for k in sorted(GPUS, key=len, reverse=True) if k.lower() in name.lower()), None
    )
    return Gpus(
        count=len(rows),
        memory_gib=round(mib / 1024, 1),
        name=name,
        tflops=GPUS[found][1] if found else None,
    )


# --------------------------------------------------------------------------- the launch


@dataclass(frozen=True)
class Strategy:
    """How a training stage's model state is spread over `world` processes, one per GPU.

    name: single (one device), ddp (a full copy per GPU), zero1/zero2/zero3 (DeepSpeed: optimizer
    state; and gradients; and parameters sharded), fsdp (PyTorch FSDP2: everything sharded).
    offload_optimizer / offload_params: that state lives in host memory (DeepSpeed's
    offload_*_device: cpu, FSDP's fsdp_offload_params)."""

    name: str = "single"
    world: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    source: str = ""  # the accelerate config it was read from

    def describe(self) -> str:
        label = {
            "single": "single device",
            "ddp": "DDP",
            "zero1": "ZeRO-1",
            "zero2": "ZeRO-2",
            "zero3": "ZeRO-3",
            "fsdp": "FSDP2",
        }[self.name]
        offload = [
            w
            for w, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params))
            if on
        ]
        if offload:
            label += f", {' and '.join(offload)} offloaded to CPU"
        gpus = "GPU" if self.world == 1 else "GPUs"
        return label if self.name == "single" else f"{label} over {self.world} {gpus}"


def launch_strategy(launch: Any, world: int | None = None) -> Strategy:
    """The strategy a recipe's `launch` block (and ACCELERATE=/NPROC=, which override it) gives a
    training stage, over `world` GPUs (default: the processes the launch starts)."""
    config_path = os.environ.get("ACCELERATE") or launch.accelerate_config
    nproc = os.environ.get("NPROC") or launch.num_processes
    config: dict = {}
    if config_path:
        try:
            config = yaml.safe_load(Path(config_path).expanduser().read_text()) or {}
        except (OSError, yaml.YAMLError):
            config = {}
    machines = int(config.get("num_machines") or 1)
    extra = list(launch.extra_args)
    if "--num_machines" in extra[:-1]:
        machines = int(extra[extra.index("--num_machines") + 1])
    processes = int(nproc or config.get("num_processes") or 1) * (machines if nproc else 1)
    kind = str(config.get("distributed_type", "MULTI_GPU" if processes > 1 else "NO")).upper()
    if kind == "NO" or (not config_path and processes <= 1):
        return Strategy("single", 1, source=str(config_path or ""))
    world = world or processes
    if kind == "DEEPSPEED":
        ds = config.get("deepspeed_config") or {}
        stage, opt_device, param_device = (
            ds.get("zero_stage"),
            ds.get("offload_optimizer_device"),
            ds.get("offload_param_device"),
        )
        if ds.get("deepspeed_config_file"):
            stage, opt_device, param_device = _deepspeed_json(ds["deepspeed_config_file"])
        stage = int(stage if stage is not None else 2)
        return Strategy(
            f"zero{max(1, min(stage, 3))}" if stage else "ddp",
            world,
            offload_optimizer=str(opt_device or "none").lower() not in ("none", ""),
            offload_params=stage == 3 and str(param_device or "none").lower() not in ("none", ""),
            source=str(config_path),
        )
    if kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        offload = bool(fsdp.get("fsdp_offload_params"))
        return Strategy("fsdp", world, offload, offload, source=str(config_path))
    return Strategy("ddp", world, source=str(config_path or ""))


def _deepspeed_json(path: str) -> tuple[Any, Any, Any]:
    try:
        zero = json.loads(Path(path).expanduser().read_text()).get("zero_optimization", {})
    except (OSError, ValueError):
        return None, None, None
    return (
        zero.get("stage"),
        (zero.get("offload_optimizer") or {}).get("device"),
        (zero.get("offload_param") or {}).get("device"),
    )


# --------------------------------------------------------------------------- what a plan is for


@dataclass(frozen=True)
class Machine:
    """What a plan is computed for: the GPUs, the strategy over them, the MFU and price assumed."""

    gpus: Gpus
    strategy: Strategy
    mfu: float = DEFAULT_MFU
    price: float | None = None  # per GPU-hour

    def with_strategy(self, strategy: Strategy) -> Machine:
        return replace(self, strategy=strategy)


def machine_for(
    launch: Any,
    gpus: Gpus,
    mfu: float = DEFAULT_MFU,
    price: float | None = None,
    world: int | None = None,
) -> Machine:
    """The recipe's launch over these GPUs: a distributed launch uses every GPU of every node
    (or `world`), a single-device one the first."""
    if gpus.nodes == 1:
        gpus = replace(gpus, nodes=launch_machines(launch))
    strategy = launch_strategy(launch, world or gpus.total)
    return Machine(gpus=gpus, strategy=strategy, mfu=mfu, price=price)


def launch_machines(launch: Any) -> int:
    """Machines the launch spans, read as the runner launches them (upstack.core.runner.nodes):
    env NNODES, else `launch.num_machines`, else `--num_machines` in extra_args, else the
    accelerate config's."""
    env = os.environ.get("NNODES", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    if launch.num_machines:
        return launch.num_machines
    extra = list(launch.extra_args)
    if "--num_machines" in extra[:-1]:
        return max(1, int(extra[extra.index("--num_machines") + 1]))
    config_path = os.environ.get("ACCELERATE") or launch.accelerate_config
    if not config_path:
        return 1
    try:
        config = yaml.safe_load(Path(config_path).expanduser().read_text()) or {}
    except (OSError, yaml.YAMLError):
        return 1
    return max(1, int(config.get("num_machines") or 1))


def run_machine(launch: Any) -> Machine | None:
    """What a run's fit check compares with: `launch.gpus` where the recipe declares them (over
    every GPU they count), else this machine's GPUs over the processes the launch starts; None
    on a machine without GPUs and no declaration."""
    if launch.gpus is not None:
        return machine_for(launch, parse_gpus(launch.gpus))
    found = detect()
    if found is None:
        return None
    processes = os.environ.get("NPROC") or launch.num_processes
    return machine_for(launch, found, world=int(processes) if processes else None)
