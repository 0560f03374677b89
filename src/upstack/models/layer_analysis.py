"""How much each block of consecutive layers changes the hidden state (angular distance, Gromov et
al. 2024; Block Influence, ShortGPT), and which block is cheapest to drop or to duplicate at a seam.

The analyze stage measures and writes `analysis.json`; upscale reads it to place a DUS seam. A
block is (start ℓ, size k): the hidden state entering layer ℓ against the one leaving layer
ℓ+k−1. Both uses of a block need the same number: dropping it feeds layer ℓ+k the state it
would have seen at ℓ, and duplicating it (a DUS seam, [0, ℓ+k) + [ℓ, n)) feeds layer ℓ the
state it would have seen at ℓ+k; either way the mismatch is the angle between those two states.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RESULTS = "analysis.json"
TABLE = "analysis.md"
PLOT = "analysis.png"


def decoder_layers(model) -> Any:
    """The model's stack of decoder layers (an nn.ModuleList of num_hidden_layers blocks)."""
    import torch

    n = model.config.num_hidden_layers
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList) and len(layers) == n:
        return layers
    for module in model.modules():  # architectures that name the stack otherwise
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: no stack of {n} decoder layers found")


def measure(model, batches: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Mean over every token of the batches (padding excluded) of, for each pair of depths
    (a, b), the angular distance arccos(cos)/π and 1 − cos between the hidden states there.
    Depth a is the input of layer a (depth n: the last layer's output, before the final norm).

    Returns `angular_distance[k-1][ℓ]` and `block_influence[k-1][ℓ]` for blocks of k = 1..n
    layers starting at ℓ = 0..n−k, and the number of tokens measured."""
    import torch

    layers = decoder_layers(model)
    n = len(layers)
    states: list[Any] = []

    def take_input(module, args, kwargs):
        states.append(args[0] if args else kwargs["hidden_states"])

    def take_output(module, args, output):
        states.append(output[0] if isinstance(output, tuple) else output)

    hooks = [layers[0].register_forward_pre_hook(take_input, with_kwargs=True)]
    hooks += [layer.register_forward_hook(take_output) for layer in layers]
    angle_sum = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    cos_sum = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    tokens = 0
    try:
        with torch.no_grad():
            for batch in batches:
                states.clear()
                model(**batch, use_cache=False)
                keep = batch["attention_mask"].reshape(-1).bool().to(states[0].device)
                # float64: an identity block's two states are equal, and in float32 arccos of
                # their cosine (1 - 6e-8) would read as an angle of 1e-4 instead of 0
                depth = torch.stack([s.reshape(-1, s.shape[-1])[keep] for s in states]).double()
                unit = torch.nn.functional.normalize(depth, dim=-1)
                cos = torch.einsum("ath,bth->abt", unit, unit).clamp(-1.0, 1.0)
                angle_sum += (torch.arccos(cos) / math.pi).sum(-1).cpu()
                cos_sum += cos.sum(-1).cpu()
                tokens += int(keep.sum())
    finally:
        for hook in hooks:
            hook.remove()
    if tokens == 0:
        raise ValueError("no tokens to measure")
    angle, cos = (angle_sum / tokens).tolist(), (cos_sum / tokens).tolist()
    return {
        "layers": n,
        "tokens": tokens,
        "angular_distance": [[angle[i][i + k] for i in range(n - k + 1)] for k in range(1, n + 1)],
        "block_influence": [[1 - cos[i][i + k] for i in range(n - k + 1)] for k in range(1, n + 1)],
    }


def cheapest_blocks(angular_distance: list[list[float]]) -> list[dict[str, Any]]:
    """For each block size k = 1..n: the start of the block that changes the hidden state
    least (cheapest to drop, smoothest to duplicate at a seam), and SOLAR's middle block of that
    size (DUS keeps [0, n−m) + [m, n): the block [m, n−m) is duplicated, or for m > n/2 the
    block [n−m, m) dropped), which exists when n − k is even."""
    n = len(angular_distance)
    out = []
    for k in range(1, n + 1):
        row = angular_distance[k - 1]
        start = min(range(len(row)), key=row.__getitem__)
        entry: dict[str, Any] = {"size": k, "start": start, "angular_distance": row[start]}
        if (n - k) % 2 == 0:
            middle = (n - k) // 2
            entry["solar_start"], entry["solar_angular_distance"] = middle, row[middle]
        out.append(entry)
    return out


def seam_slices(n: int, target_layers: int, start: int) -> list[tuple[int, int]]:
    """The DUS slices that give `target_layers` layers from n with the block of
    k = |target − n| layers at `start` duplicated (growth) or dropped (shrinking); a slice left
    empty (the dropped block at an end) is left out."""
    k = target_layers - n
    slices = [(0, start + k), (start, n)] if k >= 0 else [(0, start), (start - k, n)]
    return [(first, end) for first, end in slices if first < end]


def read(stage_dir: Path) -> dict[str, Any]:
    return json.loads((Path(stage_dir) / RESULTS).read_text())


def table(results: dict[str, Any]) -> str:
    """Per layer, then per block size: markdown for the stage dir and the log."""
    from upstack.core.tables import markdown_table

    n = results["layers"]
    distance, influence = results["angular_distance"][0], results["block_influence"][0]
    per_layer = markdown_table(
        ["layer", "angular distance", "block influence"],
        [[i, f"{distance[i]:.4f}", f"{influence[i]:.4f}"] for i in range(n)],
    )
    rows = []
    for block in results["blocks"]:
        k, start = block["size"], block["start"]
        solar = (
            f"[{block['solar_start']}, {block['solar_start'] + k}): "
            f"{block['solar_angular_distance']:.4f}"
            if "solar_start" in block
            else ""
        )
        rows.append(
            [
                k,
                f"[{start}, {start + k})",
                f"{block['angular_distance']:.4f}",
                solar,
                n - k or "",
                n + k,
            ]
        )
    per_block = markdown_table(
        [
            "k",
            "cheapest block",
            "angular distance",
            "SOLAR's middle block",
            "drop it: layers",
            "duplicate it: layers",
        ],
        rows,
    )
    return f"## Per layer\n\n{per_layer}\n\n## Per block of k layers\n\n{per_block}\n"


def plot(results: dict[str, Any], path: Path, title: str) -> None:
    """Heatmap of the angular distance per block (start × size), the cheapest block of each size
    marked; beside it, per layer, angular distance and Block Influence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = results["layers"]
    grid = np.full((n, n), np.nan)
    for k, row in enumerate(results["angular_distance"], 1):
        grid[k - 1, : len(row)] = row
    fig, (heat, line) = plt.subplots(1, 2, figsize=(11, 4.5), width_ratios=[1.3, 1])
    image = heat.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=heat, label="angular distance")
    cheapest = results["blocks"]
    heat.scatter([b["start"] for b in cheapest], [b["size"] - 1 for b in cheapest], c="red", s=12)
    heat.set(
        xlabel="first layer of the block",
        ylabel="block size k",
        yticks=range(n),
        yticklabels=range(1, n + 1),
        title="per block (red: cheapest of its size)",
    )
    layers = range(n)
    line.plot(layers, results["angular_distance"][0], marker=".", label="angular distance")
    line.plot(layers, results["block_influence"][0], marker=".", label="block influence (1 − cos)")
    line.set(xlabel="layer", title="per layer")
    line.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
