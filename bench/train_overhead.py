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

from upstack.core.tables import markdown_table

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
DATA = {"sft": "conversations.jsonl", "dpo": "pairs.jsonl"}


# --------------------------------------------------------------------------- shared with bench/gpu.py


def sft_rows(problems: int, turns: int = 1, seed: int = 42) -> list[dict]:
    """Arith conversations; with turns > 1, row i holds 1..2*turns-1 question/answer turns
    (mean `turns`), so rows differ in length as real chat data does."""
    from data_synth import arith

    pool = arith.problems(problems * turns, seed, "train")
    rows, rng, at = [], random.Random(seed), 0
    while len(rows) < problems:
        count = 1 if turns == 1 else rng.randint(1, 2 * turns - 1)
        messages = []
        for problem in pool[at : at + count] or pool[:count]:
            pick = random.Random(problem.id)
            messages.append({"role": "user", "content": pick.choice(problem.questions())})
            messages.append({"role": "assistant", "content": pick.choice(problem.solutions())})
        at += count
        rows.append({"messages": messages})
    return rows


def write_sft_rows(path: Path, problems: int, turns: int = 1) -> None:
    with path.open("w") as handle:
        for row in sft_rows(problems, turns):
            handle.write(json.dumps(row) + "\n")


def write_pairs(path: Path, count: int = 256, turns: int = 1) -> None:
    """Separable preference pairs; with turns > 1 each prompt opens with turns - 1 earlier
    arith question/answer turns, so prompts reach realistic lengths."""
    rng = random.Random(0)
    context = sft_rows(count, turns - 1) if turns > 1 else [{"messages": []}] * count
    with path.open("w") as handle:
        for earlier in context:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            question = {"role": "user", "content": f"Ana has {a} pens and gets {b} more. How many?"}
            handle.write(
                json.dumps(
                    {
                        "prompt": [*earlier["messages"], question],
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


def upstack_run(task: str, model: Path, data: Path, work: Path, trainer: dict) -> dict:
    """The sft or dpo stage through upstack's runner, on a jsonl file; its manifest's metrics."""
    import yaml

    from upstack.core.recipe import load_recipe
    from upstack.core.runner import run

    stage = {"model": str(model), "datasets": [{"path": str(data)}], "trainer": trainer}
    path = work / f"upstack-{task}.yaml"
    path.write_text(
        yaml.safe_dump({"name": "bench", "output_dir": str(work / "runs"), "stages": {task: stage}})
    )
    run(load_recipe(path), [task], force=True)
    return json.loads((work / "runs" / task / "upstack.json").read_text())["metrics"]


def trl_run(
    task: str, model: Path, data: Path, work: Path, settings: dict, model_kwargs: dict
) -> dict:
    """What a user would write with TRL alone: load, configure, train, save."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    network = AutoModelForCausalLM.from_pretrained(str(model), **model_kwargs)
    rows = datasets.load_dataset("json", data_files=str(data), split="train")
    common = {"output_dir": str(work / "trl-out"), "report_to": "none", "seed": 42}
    if task == "sft":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**common, **settings, assistant_only_loss=True)
        trainer = SFTTrainer(
            model=network, args=config, train_dataset=rows, processing_class=tokenizer
        )
    else:
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**common, **settings)
        trainer = DPOTrainer(
            model=network, args=config, train_dataset=rows, processing_class=tokenizer
        )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(str(work / "trl-out" / "final"))
    return {"train_seconds": seconds, "steps": trainer.state.global_step}


def run_worker(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """One worker in a fresh subprocess: the JSON of its last stdout line, its own peak RSS
    (wait4) and wall time. stderr goes to `log` (else nowhere); a failure raises SystemExit."""
    # the checkout first, then whatever the caller had (wheels unpacked elsewhere, say)
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths)), **(env or {})}
    start = time.perf_counter()
    with open(log or os.devnull, "w") as errors:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        where = f"; its stderr: {log}" if log else ""
        raise SystemExit(f"worker failed (exit {code}){where}; rerun by hand: " + " ".join(cmd))
    result = json.loads(stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    return result


# --------------------------------------------------------------------------- workers (one per subprocess)


def upstack_worker(task: str, steps: int, packing: str) -> dict:
    model = WORK / "model" / "runs" / "init"
    if task == "sft":
        trainer = {**SETTINGS, "max_steps": steps, "packing": packing != "none"}
        if packing != "none":
            trainer["packing_strategy"] = packing
    else:
        trainer = {**DPO_SETTINGS, "max_steps": steps}
    metrics = upstack_run(task, model, WORK / DATA[task], WORK, trainer)
    return {
        "train_seconds": metrics["train_seconds"],
        "steps": metrics["steps"],
        "tokens_per_second": metrics["tokens_per_second"],
    }


def trl_worker(task: str, steps: int, packing: str) -> dict:
    cpu = {"max_steps": steps, "bf16": False, "use_cpu": True, "activation_checkpointing": False}
    if task == "sft":
        settings = {**cpu, **SETTINGS}
    else:
        settings = {**cpu, **DPO_SETTINGS, "precompute_ref_log_probs": True}
    model = WORK / "model" / "runs" / "init"
    result = trl_run(task, model, WORK / DATA[task], WORK, settings, {"dtype": "auto"})
    return {**result, "tokens_per_second": None}


# --------------------------------------------------------------------------- orchestration


def measure(contender: str, task: str, steps: int, packing: str = "none") -> dict:
    """One run in a fresh subprocess; its own peak RSS from wait4."""
    cmd = [sys.executable, __file__, "--worker", contender, "--task", task, "--steps", str(steps)]
    cmd += ["--packing", packing]
    result = run_worker(cmd, {"OMP_NUM_THREADS": "1"})
    result["step_ms"] = 1000 * result["train_seconds"] / result["steps"]
    return result


def prepare() -> None:
    import yaml

    from upstack.core.recipe import load_recipe
    from upstack.core.runner import run

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
    write_sft_rows(WORK / DATA["sft"], PROBLEMS)
    write_pairs(WORK / DATA["dpo"])


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
