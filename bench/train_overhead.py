"""What upstack's training stages cost over a plain TRL script: step time and peak RSS, side by side.

    .venv/bin/python bench/train_overhead.py [--steps 40] [--repeats 2]

The same tiny Llama (the init stage), the same data (arith conversations for sft, separable
preference pairs for dpo) and the same trainer settings, trained (a) by upstack's sft/dpo stage
through the runner and (b) by a bare TRL script. Every run is its own subprocess, so its peak RSS
is its own; contenders alternate (A B B A ...) so drift on a shared machine hits both. Step time is
the trainer loop's wall time per step. Targets: both ratios <= 1.05. Also sft tokens/s (non-padding)
without packing and with TRL's two packing strategies (bfd: whole documents, padding-free
attention; wrapped: concatenate and cut). Writes bench/out/train_overhead.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from upstack.tables import markdown_table

ROOT = Path(__file__).resolve().parent.parent

OUT = ROOT / "bench" / "out"
WORK = OUT / "train-overhead"
SETTINGS = {
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-3,
    "max_length": 256,
    "logging_steps": 10,
}
DPO_SETTINGS = {**SETTINGS, "max_length": 128, "beta": 0.1}
PROBLEMS = 512


# --------------------------------------------------------------------------- workers (one per subprocess)


def upstack_worker(task: str, steps: int, packing: str) -> dict:
    import yaml

    from upstack.recipe import load_recipe
    from upstack.runner import run

    model = WORK / "model" / "runs" / "init"
    if task == "sft":
        stage = {
            "model": str(model),
            "datasets": [{"arith": {"problems": PROBLEMS}}],
            "trainer": {**SETTINGS, "max_steps": steps, "packing": packing != "none"},
        }
        if packing != "none":
            stage["trainer"]["packing_strategy"] = packing
    else:
        stage = {
            "model": str(model),
            "datasets": [{"path": str(WORK / "pairs.jsonl")}],
            "trainer": {**DPO_SETTINGS, "max_steps": steps},
        }
    path = WORK / f"upstack-{task}.yaml"
    path.write_text(
        yaml.safe_dump({"name": "bench", "output_dir": str(WORK / "runs"), "stages": {task: stage}})
    )
    run(load_recipe(path), [task], force=True)
    metrics = json.loads((WORK / "runs" / task / "upstack.json").read_text())["metrics"]
    return {
        "train_seconds": metrics["train_seconds"],
        "steps": metrics["steps"],
        "tokens_per_second": metrics["tokens_per_second"],
    }


def trl_worker(task: str, steps: int, packing: str) -> dict:
    """What a user would write with TRL alone: load, configure, train, save."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_synth import arith

    model_path = str(WORK / "model" / "runs" / "init")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    common = {
        "output_dir": str(WORK / "trl-out"),
        "max_steps": steps,
        "bf16": False,
        "use_cpu": True,
        "activation_checkpointing": False,
        "report_to": "none",
        "seed": 42,
    }
    if task == "sft":
        from trl import SFTConfig, SFTTrainer

        rows = []
        for problem in arith.problems(PROBLEMS, 42, "train"):
            rng = random.Random(problem.id)
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": rng.choice(problem.questions())},
                        {"role": "assistant", "content": rng.choice(problem.solutions())},
                    ]
                }
            )
        data = datasets.Dataset.from_list(rows).shuffle(seed=42)
        config = SFTConfig(**common, **SETTINGS, assistant_only_loss=True)
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=data, processing_class=tokenizer
        )
    else:
        from trl import DPOConfig, DPOTrainer

        data = datasets.load_dataset("json", data_files=str(WORK / "pairs.jsonl"), split="train")
        config = DPOConfig(**common, **DPO_SETTINGS, precompute_ref_log_probs=True)
        trainer = DPOTrainer(
            model=model, args=config, train_dataset=data, processing_class=tokenizer
        )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(WORK / "trl-out" / "final"))
    return {"train_seconds": seconds, "steps": trainer.state.global_step, "tokens_per_second": None}


# --------------------------------------------------------------------------- orchestration


def measure(contender: str, task: str, steps: int, packing: str = "none") -> dict:
    """One run in a fresh subprocess; its own peak RSS from wait4."""
    cmd = [sys.executable, __file__, "--worker", contender, "--task", task, "--steps", str(steps)]
    cmd += ["--packing", packing]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(
            f"{contender} {task} failed (exit {proc.returncode}); rerun the worker by hand: "
            + " ".join(cmd)
        )
    result = json.loads(stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    result["step_ms"] = 1000 * result["train_seconds"] / result["steps"]
    return result


def prepare() -> None:
    import yaml

    from upstack.recipe import load_recipe
    from upstack.runner import run

    WORK.mkdir(parents=True, exist_ok=True)
    recipe = WORK / "model" / "init.yaml"
    recipe.parent.mkdir(exist_ok=True)
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "bench-model",
                "output_dir": str(WORK / "model" / "runs"),
                "stages": {"init": {}},
            }
        )
    )
    run(load_recipe(recipe), ["init"])
    rng = random.Random(0)
    with (WORK / "pairs.jsonl").open("w") as handle:
        for _ in range(256):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            handle.write(
                json.dumps(
                    {
                        "prompt": [
                            {
                                "role": "user",
                                "content": f"Ana has {a} pens and gets {b} more. How many?",
                            }
                        ],
                        "chosen": [
                            {
                                "role": "assistant",
                                "content": f"{a} + {b} = {a + b}. \\boxed{{{a + b}}}",
                            }
                        ],
                        "rejected": [
                            {"role": "assistant", "content": "Marbles and shells are in rows."}
                        ],
                    }
                )
                + "\n"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2, help="runs per contender and task")
    parser.add_argument("--worker", choices=["upstack", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=["sft", "dpo"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--packing", choices=["none", "bfd", "wrapped"], default="none", help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        worker = upstack_worker if args.worker == "upstack" else trl_worker
        print(json.dumps(worker(args.task, args.steps, args.packing)))
        return

    prepare()
    runs: dict[str, dict[str, list[dict]]] = {
        "sft": {"upstack": [], "trl": []},
        "dpo": {"upstack": [], "trl": []},
    }
    for task in ("sft", "dpo"):
        for i in range(args.repeats):
            order = ("upstack", "trl") if i % 2 == 0 else ("trl", "upstack")
            for contender in order:
                result = measure(contender, task, args.steps)
                runs[task][contender].append(result)
                print(
                    f"{task} {contender}: {result['step_ms']:.1f} ms/step, {result['peak_rss_mb']:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
    packing = {
        name: measure("upstack", "sft", args.steps, packing=name)["tokens_per_second"]
        for name in ("none", "bfd", "wrapped")
    }

    rows, summary = [], {}
    for task, by in runs.items():
        step = {c: statistics.median(r["step_ms"] for r in by[c]) for c in by}
        rss = {c: statistics.median(r["peak_rss_mb"] for r in by[c]) for c in by}
        wall = {c: statistics.median(r["wall_seconds"] for r in by[c]) for c in by}
        summary[task] = {
            "step_ms": step,
            "peak_rss_mb": rss,
            "wall_seconds": wall,
            "step_time_ratio": step["upstack"] / step["trl"],
            "peak_rss_ratio": rss["upstack"] / rss["trl"],
            "runs": by,
        }
        rows.append(
            [
                task,
                f"{step['upstack']:.1f}",
                f"{step['trl']:.1f}",
                f"{step['upstack'] / step['trl']:.3f}",
                f"{rss['upstack']:.0f}",
                f"{rss['trl']:.0f}",
                f"{rss['upstack'] / rss['trl']:.3f}",
                f"{wall['upstack']:.1f} / {wall['trl']:.1f}",
            ]
        )
    print(
        markdown_table(
            [
                "task",
                "upstack ms/step",
                "trl ms/step",
                "step ratio (<=1.05)",
                "upstack RSS MB",
                "trl RSS MB",
                "RSS ratio (<=1.05)",
                "process s (upstack / trl)",
            ],
            rows,
        )
    )
    print()
    print(
        markdown_table(
            [
                "sft tokens/s (non-padding)",
                "padded",
                "packed: bfd",
                "packed: wrapped",
                "bfd / padded",
                "wrapped / padded",
            ],
            [
                [
                    "upstack",
                    f"{packing['none']:.0f}",
                    f"{packing['bfd']:.0f}",
                    f"{packing['wrapped']:.0f}",
                    f"{packing['bfd'] / packing['none']:.2f}",
                    f"{packing['wrapped'] / packing['none']:.2f}",
                ]
            ],
        )
    )
    summary["sft_tokens_per_second"] = packing
    summary["settings"] = {
        "steps": args.steps,
        "repeats": args.repeats,
        "sft": SETTINGS,
        "dpo": DPO_SETTINGS,
        "threads": 1,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train_overhead.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, OUT / "train_overhead.png")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in (
        (axes[0], "step_ms", "ms per step"),
        (axes[1], "peak_rss_mb", "peak RSS (MB)"),
    ):
        tasks = ["sft", "dpo"]
        for offset, contender in ((-0.2, "upstack"), (0.2, "trl")):
            ax.bar(
                [i + offset for i in range(2)],
                [summary[t][key][contender] for t in tasks],
                0.4,
                label=contender,
            )
        ax.set_xticks(range(2), tasks)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("upstack stage vs plain TRL script (same model, data, settings)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
