"""Benchmark: the eval stage's batched greedy generation against one problem at a time.

    .venv/bin/python bench/eval.py               # the tiny recipe's upscaled shape: 16 layers, 3.6M params
    .venv/bin/python bench/eval.py --threads 2   # torch threads (default 1: see the note in tests/test_eval.py)

Same model, same 64 arith eval problems, same greedy settings; only the batch size changes.
Also checks that every batch size gives the same answers (left padding must not change them).
Prints a table with problems/s and the speedup over batch 1; writes bench/out/eval.json and
bench/out/eval.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    args = parser.parse_args()

    import torch
    import yaml

    from data_synth.seeds import ArithSeeds, load_problems
    from upstack.core.recipe import load_recipe
    from upstack.core.runner import run
    from upstack.core.tables import markdown_table
    from upstack.stages.eval import MathEval, load_model, solve

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    recipe = {
        "name": "bench-eval",
        "output_dir": str(work / "runs"),
        "stages": {"init": {"architecture": {"num_hidden_layers": 16}}},
    }
    (work / "init.yaml").write_text(yaml.safe_dump(recipe))
    run(load_recipe(work / "init.yaml"), ["init"])  # a random 16-layer tiny Llama
    model_dir = work / "runs" / "init"
    model, tokenizer = load_model(str(model_dir))
    problems = load_problems(ArithSeeds(split="eval", count=args.problems), seed=42)

    results, answers = {}, {}
    for batch_size in map(int, args.batch_sizes.split(",")):
        settings = MathEval(max_new_tokens=args.max_new_tokens, batch_size=batch_size)
        started = time.perf_counter()
        records = solve(model, tokenizer, problems, settings, desc=f"batch {batch_size}")
        seconds = time.perf_counter() - started
        answers[batch_size] = [r["prediction"] for r in records]
        results[batch_size] = {
            "seconds": round(seconds, 2),
            "problems_per_second": round(len(problems) / seconds, 2),
        }
    baseline = results[min(results)]["seconds"]
    same = {b: answers[b] == answers[min(answers)] for b in answers}
    rows = [
        [b, r["seconds"], r["problems_per_second"], f"{baseline / r['seconds']:.1f}x", same[b]]
        for b, r in results.items()
    ]
    print(
        f"{args.problems} problems, greedy, max_new_tokens={args.max_new_tokens}, "
        f"16-layer tiny Llama, {args.threads} torch thread(s)"
    )
    print(markdown_table(["batch size", "seconds", "problems/s", "speedup", "same answers"], rows))

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "eval.json").write_text(
        json.dumps({"args": vars(args), "results": results, "same_answers": same}, indent=2)
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    bars = axis.bar([str(b) for b in results], [r["problems_per_second"] for r in results.values()])
    axis.bar_label(bars, fmt="%.1f")
    axis.set_xlabel("batch size")
    axis.set_ylabel("problems / s")
    figure.tight_layout()
    figure.savefig(OUT / "eval.png", dpi=100)
    print(f"wrote {OUT / 'eval.json'} and {OUT / 'eval.png'}")


if __name__ == "__main__":
    main()
