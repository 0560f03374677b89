"""`upstack plan RECIPE`: what each stage will need before anything runs or is rented: for the
training stages, parameters, memory per GPU by component under the recipe's launch and whether
it fits, tokens, time at an MFU, GPU-hours and cost; for synth, requests and tokens to generate;
for a DUS upscale, the largest depth the GPUs can train (`--fit`). A table for people, or JSON.
Every number comes from the stages' `plan` hooks (upstack.train.plan, upstack.models.memory)."""

from __future__ import annotations

import argparse
from typing import Any

from upstack.core.errors import UserError
from upstack.core.hardware import (
    DEFAULT_MFU,
    MFU_SOURCE,
    Gpus,
    Machine,
    detect,
    machine_for,
    parse_gpus,
)
from upstack.core.tables import markdown_table
from upstack.models.memory import FLOPS_FORMULA


def add_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--gpus",
        help="GPUs per node: 8xH100-80GB, 8x80GB, H200, or a count with --gpu-memory "
        "(default: the recipe's launch.gpus, else this machine's)",
    )
    cmd.add_argument("--gpu-memory", metavar="SIZE", help="memory of each GPU, e.g. 80GB")
    cmd.add_argument("--nodes", type=int, help="machines (default: the launch's)")
    cmd.add_argument(
        "--mfu",
        type=float,
        default=DEFAULT_MFU,
        help=f"model FLOPs utilization times are estimated at (default {DEFAULT_MFU}: "
        f"{MFU_SOURCE})",
    )
    cmd.add_argument("--price", type=float, help="price of a GPU-hour, for the cost")
    cmd.add_argument(
        "--tflops", type=float, help="dense bf16 TFLOP/s of a GPU the plan does not know"
    )
    cmd.add_argument(
        "--fit",
        action="store_true",
        help="for each DUS upscale, every depth tried: the largest that trains on these GPUs",
    )
    cmd.add_argument("--json", action="store_true", help="JSON for tools instead of tables")


def gpus_of(args: argparse.Namespace, declared: str | None) -> Gpus:
    text = args.gpus if args.gpus is not None else declared
    if text is None and args.gpu_memory is None:
        found = detect()
        if found is None:
            raise UserError(
                "which GPUs? give --gpus (e.g. 8xH100-80GB, or --gpus 8 --gpu-memory 80GB), "
                "or launch.gpus in the recipe"
            )
        return found
    try:
        return parse_gpus(text, args.gpu_memory, args.nodes or 1, args.tflops)
    except ValueError as err:
        raise UserError(f"--gpus: {err}") from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the recipe for the GPUs asked (so `target_layers: auto` sizes for them), ask every
    stage its plan, print it; returns the plan."""
    from upstack.core import registry
    from upstack.core.recipe import load_recipe
    from upstack.core.runner import context, states

    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu: a fraction in (0, 1], got {args.mfu}")
    if args.gpus is None and args.gpu_memory is None:
        recipe = load_recipe(args.recipe, args.overrides)
        gpus = gpus_of(args, recipe.launch.gpus)
    else:  # the recipe as it would load on these GPUs (target_layers: auto sizes for them)
        gpus = gpus_of(args, None)
        overrides = [*args.overrides, f"launch.gpus={gpus.count}x{gpus.name}"]
        recipe = load_recipe(args.recipe, overrides)
    machine = machine_for(recipe.launch, gpus, args.mfu, args.price)
    state = states(recipe)
    pending = frozenset(name for name, s in state.items() if s != "done")
    plans = []
    for name in recipe.order():
        spec = recipe.stages[name]
        ctx = context(recipe, name, "", pending)
        ctx.machine = machine
        found = registry.kind(spec.kind).plan(spec, ctx)
        if found:
            plans.append({**found, "state": state[name]})
    result = summary(recipe, machine, plans)
    if args.json:
        import json

        print(json.dumps(result, indent=2, default=float))
    else:
        print(text(result, fit=args.fit), end="")
    return result


def summary(recipe, machine: Machine, plans: list[dict]) -> dict[str, Any]:
    training = [p for p in plans if "fits" in p]
    timed = [p for p in training if "gpu_hours" in p]
    total: dict[str, Any] = {
        "stages_timed": [p["stage"] for p in timed],
        "stages_untimed": [p["stage"] for p in training if "gpu_hours" not in p],
        "hours": sum(p["hours"] for p in timed),
        "gpu_hours": sum(p["gpu_hours"] for p in timed),
        "tokens": sum(p.get("tokens", 0) for p in timed),
        "all_fit": all(p["fits"] for p in training),
    }
    if machine.price is not None:
        total["cost"] = sum(p.get("cost", 0.0) for p in timed)
    return {
        "recipe": recipe.source,
        "gpus": {
            "count": machine.gpus.count,
            "nodes": machine.gpus.nodes,
            "name": machine.gpus.name,
            "memory_gb": machine.gpus.memory_gib,
            "peak_tflops": machine.gpus.tflops,
        },
        "launch": machine.strategy.describe(),
        "accelerate_config": machine.strategy.source or None,
        "mfu": machine.mfu,
        "mfu_source": MFU_SOURCE if machine.mfu == DEFAULT_MFU else "--mfu",
        "price_per_gpu_hour": machine.price,
        "flops_formula": FLOPS_FORMULA,
        "units": "memory in GiB (2**30 bytes), as GPU memory is sold",
        "stages": plans,
        "total": total,
    }


# --------------------------------------------------------------------------- for people


def text(result: dict[str, Any], fit: bool = False) -> str:
    gpus = result["gpus"]
    lines = [
        f"plan: {result['recipe']} on {gpus['count']}x {gpus['name']}"
        + (f" x {gpus['nodes']} nodes" if gpus["nodes"] > 1 else "")
        + f"; training stages launched as {result['launch']}"
        + (f" ({result['accelerate_config']})" if result["accelerate_config"] else ""),
        "",
    ]
    plans = result["stages"]
    training = [p for p in plans if "fits" in p]
    unknown = [p for p in plans if p.get("known") is False]
    if training:
        rows = []
        for p in training:
            mb = p["micro_batch"]
            c = p["components_gb"]
            verdict = "yes" if p["fits"] else "NO"
            held = "" if p["gradients_held"] else "*"
            rows.append(
                [
                    p["stage"],
                    _count(p["parameters"]),
                    f"{_count(p['trainable'])} ({p['trains']})",
                    f"{mb['rows']}x{mb['length']}"
                    + (f" x{mb['accumulation']}" if mb["accumulation"] > 1 else "")
                    + (", ckpt" if mb["activation_checkpointing"] else ""),
                    f"{c['weights']:.2f}",
                    f"{c['gradients']:.2f}{held}",
                    f"{c['optimizer']:.2f}",
                    f"{c['activations']:.2f}",
                    f"{c['buffers']:.2f}",
                    f"{p['memory_per_gpu_gb']:.1f}",
                    f"{verdict}, {p['headroom_gb']:+.1f}",
                ]
            )
        lines += [
            f"memory per GPU, GiB, of {gpus['memory_gb']:g} (micro-batch: rows x tokens "
            "x accumulation; ckpt: activation checkpointing)",
            markdown_table(
                [
                    "stage",
                    "params",
                    "trains",
                    "micro-batch",
                    "weights",
                    "grads",
                    "optimizer",
                    "activations",
                    "buffers",
                    "total",
                    "fits, headroom",
                ],
                rows,
            ),
        ]
        if any(not p["gradients_held"] for p in training):
            lines.append(
                "* freed before each forward (one micro-batch per step): the total counts the "
                "larger of gradients and activations"
            )
        lines.append("")
        peak = gpus["peak_tflops"]
        compute_rows, unknown_rows = [], False
        for p in training:
            if p.get("steps") is None:
                compute_rows.append([p["stage"], "?", "?", "", "", "", ""])
                unknown_rows = True
                continue
            hours = p.get("hours")
            compute_rows.append(
                [
                    p["stage"],
                    f"{p['steps']:,}",
                    ("" if p["tokens_exact"] else "<= ") + _count(p["tokens"]),
                    f"{p['flops_per_token'] / 1e9:,.1f}",
                    _duration(hours) if hours is not None else "?",
                    f"{p['gpu_hours']:,.0f}" if hours is not None else "?",
                    f"${p['cost']:,.0f}" if "cost" in p else "",
                ]
            )
        headers = ["stage", "steps", "tokens", "GFLOP/token", "time", "GPU-hours", "cost"]
        if result["price_per_gpu_hour"] is None:
            headers, compute_rows = headers[:-1], [row[:-1] for row in compute_rows]
        lines += [
            f"compute at MFU {result['mfu']:g}"
            + (f" of {peak:g} TFLOP/s per GPU" if peak else " (peak unknown: --tflops)")
            + (
                f", ${result['price_per_gpu_hour']:g} per GPU-hour"
                if result["price_per_gpu_hour"] is not None
                else " (--price for the cost)"
            ),
            markdown_table(headers, compute_rows),
        ]
        if unknown_rows:
            lines.append(
                "? rows not known before the run (Hub data sets): set max_samples or max_steps"
            )
        total = result["total"]
        line = (
            f"total: {_duration(total['hours'])}, {total['gpu_hours']:,.0f} GPU-hours"
            + (f", ${total['cost']:,.0f}" if "cost" in total else "")
            + f" for {', '.join(total['stages_timed']) or 'no stage'}"
        )
        if total["stages_untimed"]:
            line += f" (not counted: {', '.join(total['stages_untimed'])})"
        lines += [line, ""]
    for p in plans:
        if p["kind"] == "synth":
            if p.get("requests") is not None:
                what = (
                    f"at most {p['requests']:,} requests ({p['requests_per_seed']} per seed, "
                    f"{p['seeds']:,} seeds), {_count(p['tokens_to_generate'])} tokens to generate"
                )
            else:
                what = (
                    f"{p['requests_per_seed']} requests per seed, each up to {p['max_tokens']} "
                    "tokens; seeds unknown before the run"
                )
            lines.append(f"{p['stage']}: {what}")
        if "depth" in p:
            lines += _depth_lines(p, fit)
    for p in unknown:
        lines.append(f"{p['stage']}: {'; '.join(p['notes'])}")
    notes = [f"{p['stage']}: {note}" for p in training for note in p.get("notes", [])]
    if notes:
        lines += ["", *notes]
    lines += [
        "",
        f"MFU {result['mfu']:g}: {result['mfu_source']}. FLOPs per token: 6N + 12LWS for full "
        "training (PaLM), the reference's 2N + 4LWS added for DPO; --json states the formula.",
        "",
    ]
    return "\n".join(lines)


def _depth_lines(p: dict, fit: bool) -> list[str]:
    search = p["depth"]
    if "problem" in search:
        return [f"{p['stage']}: {search['problem']}"]
    bound, n, depth = search["bound_by"], search["source_layers"], search["target_layers"]
    largest = f"the deepest DUS model these GPUs train is {depth} layers" + (
        f" (2n, the most DUS makes from {n})" if depth == 2 * n else ""
    )
    largest += f", {search['need_gb']:.1f} GiB per GPU"
    if bound:
        largest += (
            f"; {bound['target_layers']} would need {bound['memory_per_gpu_gb']:.1f} in "
            f"{bound['stage']}, {bound['largest']} the largest part "
            f"({bound['components_gb'][bound['largest']]:.1f})"
        )
    if p["auto"]:
        head = f"{p['stage']}: target_layers auto -> {depth}: {largest}"
    else:
        head = f"{p['stage']}: {p['target_layers']} layers as written; {largest}"
    lines = [head]
    if fit:
        rows = [
            [
                row["target_layers"],
                row["drop_layers"] if row["drop_layers"] is not None else "",
                row["stage"],
                f"{row['memory_per_gpu_gb']:.1f}",
                row["largest"],
                "yes" if row["fits"] else "no",
            ]
            for row in search["tried"]
        ]
        lines.append(
            markdown_table(
                ["target_layers", "drop_layers", "stage", "GiB per GPU", "largest", "fits"], rows
            )
        )
    return lines


def _count(n: float) -> str:
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.1f}{suffix}" if n / size < 100 else f"{n / size:.0f}{suffix}"
    return f"{n:.0f}"


def _duration(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:.1f} days"
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.0f} min"
