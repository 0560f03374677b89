"""The memory model (upstack.models.memory) against the peaks measured on a GPU: bench/gpu.py's
runs on an NVIDIA H200 (bench/out/gpu.json, torch.cuda.max_memory_allocated; a ~0.85B Llama in
bf16, 8 rows per step, max_length 2048, 20 steps), computed here on CPU.

    .venv/bin/python bench/memory_model.py

The peak depends on the longest micro-batch, which gpu.json does not record: this rebuilds the
bench's tokenizer and data (bench/gpu.py's code and seeds), builds upstack's sft and dpo trainers
on a tiny model with that tokenizer, and reads the 20 micro-batches' shapes from their data
loaders (the same seeded sampler the GPU run drew from). For each step the model counts the
0.85B model's weights, AdamW's state from the second step on, and the larger of that batch's
activations and the gradients (one micro-batch per step: the last step's gradients are freed
before the forward); the largest over the steps is compared with the measured peak. The CUDA
reserve of a plan is left out: max_memory_allocated does not see it.
Writes bench/out/memory_model.{json,md}.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import SMOKE_SHAPE, build_model
from train_overhead import ROOT, write_pairs, write_sft_rows

from upstack.core.tables import markdown_table
from upstack.models.memory import GIB, Architecture, Batch, Precision, Strategy, Trained, memory

OUT = ROOT / "bench" / "out"
WORK = OUT / "memory-model-work"


def batch_shapes(task: str, trainer_settings: dict, model: Path, data: Path, steps: int) -> list:
    """(rows, tokens per row) of each of the first `steps` micro-batches the stage trains on."""
    import yaml

    from upstack.core.recipe import load_recipe
    from upstack.core.runner import context
    from upstack.stages import dpo, sft

    stage = {"model": str(model), "datasets": [{"path": str(data)}], "trainer": trainer_settings}
    path = WORK / f"{task}.yaml"
    path.write_text(
        yaml.safe_dump({"name": "bench", "output_dir": str(WORK / "runs"), "stages": {task: stage}})
    )
    recipe = load_recipe(path)
    ctx = context(recipe, task, "", work=WORK / "work" / task)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    module = {"sft": sft, "dpo": dpo}[task]
    trainer = module.build_trainer(recipe.stages[task], ctx)
    shapes = []
    for batch in trainer.get_train_dataloader():
        shapes.append(tuple(batch["input_ids"].shape))
        if len(shapes) == steps:
            break
    return shapes


def predicted_peak(arch: Architecture, shapes: list, liger: bool, reference: bool) -> dict:
    """The largest of each step's count (see the module's docstring), in GiB, and its parts."""
    precision = Precision(weight_bytes=2, mixed=True, device="cuda")
    trained = Trained.everything(arch)
    best = None
    for step, (rows, length) in enumerate(shapes, 1):
        batch = Batch(rows=rows, length=length, masked=True, liger=liger)
        counted = memory(arch, trained, batch, precision, Strategy(), reference_copy=reference)
        optimizer = counted.optimizer.bytes if step > 1 else 0
        peak = (
            counted.weights.bytes
            + optimizer
            + max(counted.activations.bytes, counted.gradients.bytes)
        )
        at_step = counted.weights.bytes + counted.gradients.bytes + counted.optimizer.bytes
        value = max(peak, at_step)
        if best is None or value > best["gib"] * GIB:
            best = {
                "gib": value / GIB,
                "step": step,
                "batch": [rows, length],
                "weights": counted.weights.gib,
                "optimizer": counted.optimizer.gib if step > 1 else 0.0,
                "gradients": counted.gradients.gib,
                "activations": counted.activations.gib,
                "activation_parts": {k: v / GIB for k, v in counted.parts.items()},
            }
    return best


def main() -> None:
    measured = json.loads((OUT / "gpu.json").read_text())
    settings = measured["settings"]
    steps, batch, max_length, turns = (
        settings["steps"],
        settings["batch"],
        settings["max_length"],
        settings["turns"],
    )
    WORK.mkdir(parents=True, exist_ok=True)
    # the bench's tokenizer (built from its vocab size and seed), on a tiny model
    model = WORK / "model"
    build_model(model, {**SMOKE_SHAPE, "vocab_size": settings["shape"]["vocab_size"]}, 4096, False)
    sft_data, dpo_data = WORK / "sft.jsonl", WORK / "dpo.jsonl"
    rows_per_pack = max(1, math.ceil(max_length / (60 * turns)))
    write_sft_rows(sft_data, steps * batch * rows_per_pack * 3 // 2, turns)
    write_pairs(dpo_data, steps * batch, turns)
    common = {
        "per_device_train_batch_size": batch,
        "max_length": max_length,
        "max_steps": steps,
        "learning_rate": 1e-5,
    }
    shapes = {
        "padded": batch_shapes("sft", {**common, "packing": False}, model, sft_data, steps),
        "bfd": batch_shapes(
            "sft",
            {**common, "packing": True, "padding_free": True, "packing_strategy": "bfd"},
            model,
            sft_data,
            steps,
        ),
        "dpo": batch_shapes("dpo", {**common, "beta": 0.1}, model, dpo_data, steps),
    }
    shape = {**settings["shape"], "tie_word_embeddings": False}
    arch = Architecture.from_shape(shape)
    rows, out = [], {}
    for name, run in measured["runs"].items():
        if "peak_memory_gib" not in run or run["contender"] != "upstack":
            continue
        config = run["config"]
        if run["task"] == "sft":
            key = "bfd" if config["packing"] == "bfd" else "padded"
            liger, reference = config["liger"], False
        else:
            key, liger, reference = "dpo", False, not config["precompute"]
        predicted = predicted_peak(arch, shapes[key], liger, reference)
        ratio = predicted["gib"] / run["peak_memory_gib"]
        out[name] = {"measured_gib": run["peak_memory_gib"], "predicted": predicted, "ratio": ratio}
        rows.append(
            [
                name.removesuffix("/upstack"),
                f"{predicted['batch'][0]} x {predicted['batch'][1]}",
                f"{predicted['weights']:.2f}",
                f"{predicted['optimizer']:.2f}",
                f"{predicted['activations']:.2f}",
                f"{predicted['gib']:.2f}",
                f"{run['peak_memory_gib']:.2f}",
                f"{ratio:.3f}",
            ]
        )
    table = markdown_table(
        [
            "run (H200, bf16)",
            "largest micro-batch",
            "weights",
            "optimizer",
            "activations",
            "modelled peak GiB",
            "measured GiB",
            "ratio",
        ],
        rows,
    )
    (OUT / "memory_model.json").write_text(
        json.dumps({"shapes": shapes, "runs": out}, indent=2) + "\n"
    )
    (OUT / "memory_model.md").write_text(
        "The memory model against bench/out/gpu.json's peaks (torch.cuda.max_memory_allocated; "
        "bench/memory_model.py)\n\n" + table + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
