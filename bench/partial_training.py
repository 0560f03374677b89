"""What training part of a grown model saves: peak memory of seam-only and new-only cpt against
training everything, side by side.

    .venv/bin/python bench/partial_training.py [--steps 3] [--repeats 1]

One Llama (the init stage, hidden 512, 8 layers), grown two ways: DUS (m = 2: 12 layers, the
seam is layers 5 and 6) and LLaMA Pro's expand (4 identity blocks: 12 layers). Each grown model gets the same
few cpt steps (AdamW, fp32, CPU) with `train_layers: all` and with `seam` / `new`, every run its
own subprocess, so its peak RSS (wait4) is its own. Beside the measured difference, the one the
counts predict: gradient plus AdamW's two moments, 12 bytes per trained fp32 parameter, taken from
what the optimizer actually held (the manifest's `trained` record). Writes
bench/out/partial_training.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from upstack.core.tables import markdown_table

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
WORK = OUT / "partial-training"
ARCHITECTURE = {
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
TRAINER = {
    "per_device_train_batch_size": 2,
    "max_length": 128,
    "learning_rate": 1e-4,
    "logging_steps": 1,
    "save_steps": 10_000,  # no checkpoint inside the measured window
}
# (stage, grown model, train_layers); each pair compares a part against `all` on the same model
CONTENDERS = [
    ("dus_all", "up_dus", "all"),
    ("dus_seam", "up_dus", "seam"),
    ("expand_all", "up_expand", "all"),
    ("expand_new", "up_expand", "new"),
]


def recipe_path(steps: int) -> Path:
    import yaml

    stages = {
        "init": {
            "tokenizer": {"vocab_size": 1024, "corpus_problems": 500},
            "architecture": ARCHITECTURE,
        },
        "up_dus": {"kind": "upscale", "model": "init", "drop_layers": 2},
        "up_expand": {"kind": "upscale", "model": "init", "method": "expand", "new_layers": 4},
    }
    for name, model, layers in CONTENDERS:
        stages[name] = {
            "kind": "cpt",
            "model": model,
            "datasets": [{"arith": {"problems": 400}}],
            "train_layers": layers,
            "trainer": {**TRAINER, "max_steps": steps},
        }
    path = WORK / "recipe.yaml"
    WORK.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump({"name": "bench", "output_dir": str(WORK / "runs"), "stages": stages})
    )
    return path


def worker(stage: str, steps: int) -> dict:
    from upstack.core.recipe import load_recipe
    from upstack.core.runner import run

    run(load_recipe(recipe_path(steps)), [stage], force=True)
    metrics = json.loads((WORK / "runs" / stage / "upstack.json").read_text())["metrics"]
    return {
        "train_seconds": metrics["train_seconds"],
        "steps": metrics["steps"],
        **metrics["trained"],
    }


def measure(stage: str, steps: int) -> dict:
    """One cpt stage in a fresh subprocess; its own peak RSS from wait4."""
    cmd = [sys.executable, __file__, "--worker", stage, "--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{stage} failed; rerun the worker by hand: {' '.join(cmd)}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="runs per contender")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return

    from upstack.core.recipe import load_recipe
    from upstack.core.runner import run

    run(load_recipe(recipe_path(args.steps)), ["up_dus", "up_expand"])  # once, in this process
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in CONTENDERS}
    for i in range(args.repeats):
        order = CONTENDERS if i % 2 == 0 else CONTENDERS[::-1]  # drift hits both sides
        for name, _, _ in order:
            result = measure(name, args.steps)
            runs[name].append(result)
            print(f"{name}: {result['peak_rss_mb']:.0f} MB peak RSS", file=sys.stderr, flush=True)

    summary, rows = {}, []
    for part, whole in (("dus_seam", "dus_all"), ("expand_new", "expand_all")):
        rss = {n: statistics.median(r["peak_rss_mb"] for r in runs[n]) for n in (whole, part)}
        record = {n: runs[n][0] for n in (part, whole)}
        # gradient + two AdamW moments: 12 bytes per trained fp32 parameter, from what the
        # optimizer held (its state's own size is counted too: the two moments and a step)
        counted = {
            n: record[n]["optimizer_state_mb"] + record[n]["parameters_trainable"] * 4 / 2**20
            for n in (part, whole)
        }
        summary[part] = {
            "peak_rss_mb": rss,
            "ratio": rss[part] / rss[whole],
            "saved_mb": rss[whole] - rss[part],
            "saved_mb_counted": counted[whole] - counted[part],
            "trained": record,
            "runs": {n: runs[n] for n in (part, whole)},
        }
        rows.append(
            [
                f"{whole} vs {part}",
                f"{record[part]['layers']}",
                f"{record[whole]['parameters_trainable'] / 1e6:.1f}M / "
                f"{record[part]['parameters_trainable'] / 1e6:.1f}M",
                f"{record[whole]['optimizer_state_mb']:.0f} / {record[part]['optimizer_state_mb']:.0f}",
                f"{rss[whole]:.0f} / {rss[part]:.0f}",
                f"{rss[part] / rss[whole]:.2f}",
                f"{rss[whole] - rss[part]:.0f}",
                f"{counted[whole] - counted[part]:.0f}",
            ]
        )
    table = markdown_table(
        [
            "all vs part",
            "layers trained (part)",
            "trainable params (all / part)",
            "optimizer state MB (all / part)",
            "peak RSS MB (all / part)",
            "RSS ratio part/all",
            "saved MB measured",
            "saved MB counted",
        ],
        rows,
    )
    print(table)
    summary["settings"] = {
        "steps": args.steps,
        "repeats": args.repeats,
        "architecture": ARCHITECTURE,
        "trainer": TRAINER,
        "threads": 1,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "partial_training.json").write_text(json.dumps(summary, indent=2) + "\n")
    (OUT / "partial_training.md").write_text(table + "\n")
    plot(summary, OUT / "partial_training.png")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels, values = [], []
    for part in ("dus_seam", "expand_new"):
        for name, mb in summary[part]["peak_rss_mb"].items():
            labels.append(name)
            values.append(mb)
    ax.bar(labels, values, color=["tab:gray", "tab:blue", "tab:gray", "tab:blue"][: len(values)])
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title("cpt on a grown 12-layer model: train all vs a part")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
