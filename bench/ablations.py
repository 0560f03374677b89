"""SOLAR's claims at toy scale, with seeds: run the ablation recipes, then write docs/RESULTS.md.

    make ablations                                  # run 3 seeds of both recipes, then write
    .venv/bin/python bench/ablations.py --seeds 1 2 3
    .venv/bin/python bench/ablations.py --report    # only rewrite docs/RESULTS.md from the runs
    .venv/bin/python bench/ablations.py --recipes growth --stages peer dus moe base_continued

Each recipe (recipes/tiny-growth.yaml, recipes/tiny-instruct.yaml) runs once per seed, into
runs/ablations/<recipe>/seed-<n>, through the real CLI; a finished seed is cached like any run.
The document is generated from those runs' files only (eval results and cpt manifests), so it
cannot drift from the numbers: each claim's verdict compares the paired per-seed difference with
its standard error (holds: more than 2 standard errors in the claimed direction; does not hold:
more than 2 against it; otherwise within noise). Writes docs/RESULTS.md, docs/results-*.png and
bench/out/ablations.json.

With `--stages` (and `--recipes`), each seed runs only those stages and what they need (a new
row, without the 42 minutes of the whole set); the rows it did not run keep their per-seed
values from the last bench/out/ablations.json, and the document says which rows were measured
when.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "ablations"
DOCS = ROOT / "docs"
OUT = ROOT / "bench" / "out"
RECIPES = {
    "growth": ROOT / "recipes" / "tiny-growth.yaml",
    "instruct": ROOT / "recipes" / "tiny-instruct.yaml",
}
HAND_WRITTEN = "RESULTS-single-runs.md"  # other measurements, one seed each, reported by hand

# growth: (name, stage, upscale stage it starts from or None for the base, from scratch?)
GROWTH = [
    ("base, continued", "base_continued"),
    ("DUS, m=1 (4 -> 6)", "dus"),
    ("repetition, m=0 (4 -> 8, = Gstack x2)", "repeat"),
    ("LLaMA Pro expand (4 -> 6)", "expand"),
    ("MoE upcycling, 4 experts, top 1", "moe"),
    ("PEER, 64^2 experts in every layer, 4 heads x top 8", "peer"),
    ("6 layers from scratch, same total compute", "scratch_deep"),
]
MODELS = ["pretrain", "sft_general", "sft_synth", "sft_math", "dpo_general", "dpo_synth", "merge"]
# (claim, measure, a, b): a should beat b; measures: loss (lower wins) or an eval's accuracy
CLAIMS = [
    ("DUS beats the base continued, same compute", "loss", "dus", "base_continued"),
    ("DUS (m=1) beats plain repetition (m=0)", "loss", "dus", "repeat"),
    ("DUS beats a deeper model trained from scratch", "loss", "dus", "scratch_deep"),
    ("DUS beats MoE upcycling at the same compute per token", "loss", "dus", "moe"),
    ("PEER beats the base continued, same compute", "loss", "peer", "base_continued"),
    ("PEER beats DUS at the same compute", "loss", "peer", "dus"),
    ("PEER beats MoE upcycling at the same compute", "loss", "peer", "moe"),
    ("Synth.Math-Instruct in SFT raises math", "eval_math", "sft_synth", "sft_general"),
    ("... and keeps general accuracy", "eval_general", "sft_synth", "sft_general"),
    ("Synth.Math-Alignment in DPO raises math", "eval_math", "dpo_synth", "dpo_general"),
    ("DPO (+ Synth.Math-Alignment) improves on its SFT", "eval_math", "dpo_synth", "sft_synth"),
    ("the merge beats its general-heavy candidate on math", "eval_math", "merge", "sft_synth"),
    ("the merge beats its math-heavy candidate on general", "eval_general", "merge", "sft_math"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--report", action="store_true", help="only write the document")
    parser.add_argument(
        "--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES), help="run these"
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        help="run only these stages (and what they need); the other rows keep their last values",
    )
    args = parser.parse_args()
    started = time.time()
    if not args.report:
        for name in args.recipes:
            for seed in args.seeds:
                run(name, RECIPES[name], seed, args.stages or [])
    wall = time.time() - started
    results = collect(args.seeds)
    if args.stages or args.report:  # rows not in these runs: their last measurement
        results = kept_from(OUT / "ablations.json", results)
    results["wall_seconds"] = None if args.report else round(wall)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ablations.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_growth(results, DOCS / "results-growth.png")
    plot_instruct(results, DOCS / "results-instruct.png")
    (DOCS / "RESULTS.md").write_text(document(results))
    for claim in results["claims"]:
        print(
            f"{claim['verdict']:>14}  {claim['claim']}: {claim['difference']:+.4g} ± {claim['se']:.2g}"
        )
    print(
        f"wrote docs/RESULTS.md, docs/results-growth.png, docs/results-instruct.png ({wall / 60:.1f} min)"
    )
    return 0


def run(name: str, recipe: Path, seed: int, stages: list[str]) -> None:
    out = RUNS / name / f"seed-{seed}"
    command = [
        sys.executable, "-m", "upstack", "run", str(recipe), *stages,
        "--set", f"seed={seed}", "--set", f"output_dir={out}",
    ]  # fmt: skip
    print(f"==> {name}, seed {seed}: {' '.join(command[2:])}", flush=True)
    begun = time.time()
    log = RUNS / name / f"seed-{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        done = subprocess.run(
            command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ
        )
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"{name} seed {seed} failed ({log}):\n" + "\n".join(tail))
    print(f"    {time.time() - begun:.0f} s", flush=True)


# --------------------------------------------------------------------------- reading the runs


def _manifest(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "upstack.json").read_text())


def _flops_per_token(model_dir: Path) -> float:
    """6 N, N = the parameters a token passes through: all but the input embedding, of a
    mixture of experts only the experts it is routed to, and of a PEER layer what its retrieval
    and its h k retrieved neurons cost (upstack.models.peer.active_parameters), not its tables."""
    from upstack.models import peer
    from upstack.models.checkpoints import count_parameters

    config = json.loads((model_dir / "config.json").read_text())
    passed = count_parameters(model_dir) - config["vocab_size"] * config["hidden_size"]
    experts = config.get("num_local_experts")
    if experts:
        unused = experts - config["num_experts_per_tok"]
        expert = 3 * config["hidden_size"] * config["intermediate_size"]  # w1, w2, w3
        passed -= unused * expert * config["num_hidden_layers"]
    branch = config.get("peer")
    if branch:
        passed -= _peer_tensors(model_dir)
        passed += len(branch["layers"]) * peer.active_parameters(config["hidden_size"], branch)
    return 6 * passed


def _peer_tensors(model_dir: Path) -> int:
    """Every number a PEER branch stores (tables, keys, query, norm)."""
    from safetensors import safe_open

    total = 0
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                if ".mlp.peer." in key:
                    total += math.prod(handle.get_slice(key).get_shape())
    return total


def _curve(stage_dir: Path, start_flops: float) -> list[list[float]]:
    """(cumulative FLOPs, held-out loss averaged over the sources) at each eval step."""
    metrics = _manifest(stage_dir)["metrics"]
    per_step = metrics["tokens_seen"] / metrics["steps"] * _flops_per_token(stage_dir)
    # the mixture's sources (runs before a fix also logged a MoE's aux loss as a source)
    curves = {name: metrics["eval_curves"][name] for name in metrics["mixture"]}
    steps = sorted({step for points in curves.values() for step, _ in points})
    by_source = {name: dict(points) for name, points in curves.items()}
    return [
        [start_flops + step * per_step, statistics.mean(c[step] for c in by_source.values())]
        for step in steps
        if all(step in c for c in by_source.values())
    ]


def collect(seeds: list[int]) -> dict:
    growth: dict[str, list] = {}
    instruct: dict[str, dict] = {}
    for seed in seeds:
        root = RUNS / "growth" / f"seed-{seed}"
        if (root / "pretrain" / "upstack.json").is_file():
            base = _curve(root / "pretrain", 0.0)
            growth.setdefault("pretrain", []).append({"curve": base, "loss": base[-1][1]})
            for _, stage in GROWTH:
                if not (root / stage / "upstack.json").is_file():
                    continue
                start = 0.0 if stage == "scratch_deep" else base[-1][0]
                curve = _curve(root / stage, start)
                found = {"curve": curve, "loss": curve[-1][1]}
                usage = _manifest(root / stage)["metrics"].get("expert_usage", {}).get("eval")
                if usage:  # a PEER model: its experts on the held-out set, mean over layers
                    found["used"] = statistics.mean(usage["used"])
                    found["entropy_ratio"] = statistics.mean(usage["entropy_ratio"])
                growth.setdefault(stage, []).append(found)
        root = RUNS / "instruct" / f"seed-{seed}"
        for evaluation in ("eval_math", "eval_general"):
            path = root / evaluation / "results.json"
            if not path.is_file():
                continue
            for row in json.loads(path.read_text())["rows"]:
                instruct.setdefault(evaluation, {}).setdefault(row["model"], []).append(
                    {"accuracy": row["math_accuracy"], "total": row["math_total"]}
                )
    results = {"seeds": seeds, "growth": growth, "instruct": instruct}
    results["claims"] = [claim(results, *c) for c in CLAIMS]
    # what a run from nothing costs: every stage's own recorded seconds (a rerun that found most
    # stages cached takes far less, so its wall time would understate it)
    results["stage_seconds"] = round(
        sum(
            _manifest(path.parent)["seconds"]
            for name in RECIPES
            for seed in seeds
            for path in (RUNS / name / f"seed-{seed}").glob("*/upstack.json")
        )
    )
    results["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    results["date"] = date.today().isoformat()
    return results


def kept_from(path: Path, results: dict) -> dict:
    """`results` with every row these runs lack (a stage, an eval) taken from the last full
    document's JSON, and when each row was measured."""
    if not path.is_file():
        return results
    previous = json.loads(path.read_text())
    measured = previous.get("measured") or {}
    dates = {}
    for stage, runs in previous.get("growth", {}).items():
        if stage not in results["growth"]:
            results["growth"][stage] = runs
            dates[stage] = measured.get(stage, previous.get("date"))
    for evaluation, rows in previous.get("instruct", {}).items():
        if evaluation not in results["instruct"]:
            results["instruct"][evaluation] = rows
            dates[evaluation] = measured.get(evaluation, previous.get("date"))
    if not dates:
        return results
    for stage in [*results["growth"], *results["instruct"]]:
        dates.setdefault(stage, results["date"])
    results["measured"] = dates
    results["claims"] = [claim(results, *c) for c in CLAIMS]
    # what the whole set takes from nothing is the last full run's; these runs' own, apart
    results["update_seconds"] = results["stage_seconds"]
    results["stage_seconds"] = previous.get("stage_seconds")
    results["full_date"] = previous.get("full_date") or previous.get("date")
    return results


def _values(results: dict, measure: str, stage: str) -> list[float]:
    if measure == "loss":
        return [run["loss"] for run in results["growth"].get(stage, [])]
    return [run["accuracy"] * 100 for run in results["instruct"].get(measure, {}).get(stage, [])]


def claim(results: dict, text: str, measure: str, a: str, b: str) -> dict:
    """The paired difference a - b (per seed), in the claimed direction, against its noise."""
    first, second = _values(results, measure, a), _values(results, measure, b)
    pairs = list(zip(first, second, strict=False))
    sign = -1 if measure == "loss" else 1  # lower loss wins
    gains = [sign * (x - y) for x, y in pairs]
    if len(gains) < 2:
        return {"claim": text, "measure": measure, "a": a, "b": b, "difference": float("nan"),
                "se": float("nan"), "verdict": "not run", "seeds": len(gains)}  # fmt: skip
    mean, se = statistics.mean(gains), statistics.stdev(gains) / math.sqrt(len(gains))
    if measure != "loss":
        # the eval's own sampling noise, for a difference of two accuracies on n problems
        n = results["instruct"][measure][a][0]["total"]
        p, q = statistics.mean(first) / 100, statistics.mean(second) / 100
        binomial = 100 * math.sqrt((p * (1 - p) + q * (1 - q)) / (n * len(gains)))
        se = max(se, binomial)
    verdict = "holds" if mean > 2 * se else "does not hold" if mean < -2 * se else "within noise"
    found = {"claim": text, "measure": measure, "a": a, "b": b, "difference": mean, "se": se,
             "verdict": verdict, "seeds": len(gains)}  # fmt: skip
    measured = results.get("measured") or {}
    if measure == "loss" and measured.get(a, "") != measured.get(b, ""):
        # paired by seed, but from two runs of the base's pretraining (not bit-reproducible)
        found["runs"] = f"{a} {measured.get(a)}, {b} {measured.get(b)}"
    return found


# --------------------------------------------------------------------------- plots


def plot_growth(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (whole, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    finals = []
    for label, stage in [("base pretraining", "pretrain"), *GROWTH]:
        runs = results["growth"].get(stage)
        if not runs:
            continue
        length = min(len(run["curve"]) for run in runs)
        xs = [runs[0]["curve"][i][0] for i in range(length)]
        ys = [statistics.mean(run["curve"][i][1] for run in runs) for i in range(length)]
        for axis in (whole, zoom):
            axis.plot(xs, ys, label=label, linewidth=1.5 if stage != "pretrain" else 1)
        finals.append(ys[-1])
    base = results["growth"].get("pretrain")
    if base:  # the zoom: from the end of the base's pretraining on
        start = base[0]["curve"][-1][0]
        zoom.set_xlim(start * 0.9, None)
        zoom.set_ylim(min(finals) - 0.03, max(finals) + 0.08)
    for axis in (whole, zoom):
        axis.set_xlabel("cumulative training FLOPs (6 N tokens)")
    whole.set_ylabel("held-out loss (mean of arith, listops)")
    whole.set_ylim(top=min(whole.get_ylim()[1], 3.0))
    whole.set_title(f"growing a 4-layer base, same compute (mean of {len(results['seeds'])} seeds)")
    zoom.set_title("after the base's pretraining")
    zoom.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_instruct(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.4
    for offset, (evaluation, label) in enumerate(
        [("eval_math", "math (arith)"), ("eval_general", "general (listops)")]
    ):
        means, sds = [], []
        for model in MODELS:
            values = _values(results, evaluation, model)
            means.append(statistics.mean(values) if values else 0)
            sds.append(statistics.stdev(values) if len(values) > 1 else 0)
        xs = [i + (offset - 0.5) * width for i in range(len(MODELS))]
        axis.bar(xs, means, width, yerr=sds, capsize=3, label=label)
    axis.set_xticks(range(len(MODELS)), MODELS, rotation=20)
    axis.set_ylabel("accuracy (%), mean ± sd over seeds")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --------------------------------------------------------------------------- the document


def _mean_sd(values: list[float], digits: int) -> str:
    if not values:
        return "not run"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def document(results: dict) -> str:
    from upstack.core.tables import markdown_table

    seeds = results["seeds"]
    took = (
        f"{results['stage_seconds'] / 60:.0f} minutes of stage time for both recipes and all "
        "seeds (the sum of every stage's recorded seconds: what `make ablations` takes from nothing)"
    )
    measured = results.get("measured")
    if measured and len(set(measured.values())) > 1:  # some rows rerun since the full set
        by_date: dict[str, list[str]] = {}
        for row, when in measured.items():
            by_date.setdefault(when, []).append(row)
        latest = max(by_date)
        took = (
            f"{results['stage_seconds'] / 60:.0f} minutes of stage time for both recipes and all "
            f"seeds when last run from nothing ({results['full_date']}); rerun on {latest}: "
            f"{', '.join(sorted(by_date[latest]))} ({results['update_seconds'] / 60:.0f} "
            "minutes of stage time, the base's pretraining included); every other row is "
            "from the full run"
        )
    measured_on = max((results.get("measured") or {"": results["date"]}).values())
    lines = [
        "# Results: SOLAR's claims at toy scale",
        "",
        "Generated by `bench/ablations.py` from the runs under runs/ablations: do not edit by hand",
        "(`make ablations` reruns and rewrites it; `python bench/ablations.py --report` rewrites",
        "it from existing runs).",
        "",
        f"Measured {measured_on} on {results['machine']}, seeds {seeds}; {took}.",
        "Every row is the mean ± standard deviation over seeds. A claim's verdict compares the",
        "per-seed paired difference with its standard error (for accuracies, at least the",
        "binomial standard error of the eval): **holds** above 2 standard errors in the claimed",
        "direction, **does not hold** beyond 2 against it, **within noise** otherwise.",
        "",
        "## Claims",
        "",
        markdown_table(
            ["claim", "measure", "difference (claimed direction)", "standard error", "verdict"],
            [
                [
                    c["claim"],
                    "held-out loss" if c["measure"] == "loss" else c["measure"] + " (points)",
                    f"{c['difference']:+.4f}"
                    if c["measure"] == "loss"
                    else f"{c['difference']:+.1f}",
                    f"{c['se']:.4f}" if c["measure"] == "loss" else f"{c['se']:.1f}",
                    f"**{c['verdict']}**" + (" (rows of two runs)" if c.get("runs") else ""),
                ]
                for c in results["claims"]
            ],
        ),
        "",
    ]
    mixed = [c for c in results["claims"] if c.get("runs")]
    if mixed:
        lines += [
            "*Rows of two runs*: the two rows were measured in different runs of the recipe ("
            + "; ".join(c["runs"] for c in mixed)
            + "); paired by seed, but each run pretrained its own base (the same seed, not "
            "bit-reproducible on a busy CPU), so the pairing is looser than within one run.",
            "",
        ]
    lines += [
        "## 1. Growth under the same compute (recipes/tiny-growth.yaml)",
        "",
        "A 4-layer base (hidden 64) pretrained at a constant learning rate on arith + listops",
        "text until its held-out loss flattens, then each variant continued with the same",
        "FLOPs (6 N tokens, N without the input embedding and, for MoE, without the experts a",
        "token is not routed to; for PEER, per token and PEER layer, the query network, the",
        "sub-key scores of both halves and the h k retrieved neurons: d h key_dim +",
        "h sqrt(N) key_dim + 2 d h k, not its tables; steps in the recipe), each with a cosine",
        "decay to 0. The 6-layer model from scratch gets the base's whole budget, cosine over",
        "all of it.",
        "",
    ]
    growth = results["growth"]
    rows = []
    for label, stage in [("base after pretraining", "pretrain"), *GROWTH]:
        runs = growth.get(stage, [])
        flops = runs[0]["curve"][-1][0] if runs else None
        rows.append(
            [label, f"{flops:.3g}" if flops else "", _mean_sd([r["loss"] for r in runs], 4)]
        )
    lines += [markdown_table(["model", "cumulative FLOPs", "held-out loss"], rows), ""]
    peer_runs = [run for run in growth.get("peer", []) if "used" in run]
    if peer_runs:
        used = _mean_sd([100 * run["used"] for run in peer_runs], 1)
        ratio = _mean_sd([run["entropy_ratio"] for run in peer_runs], 3)
        lines += [
            "PEER's experts on the held-out set, after training (the mean over its 4 layers; "
            f"mean ± sd over seeds): {used} % of the 4096 experts of a layer retrieved at least "
            f"once, retrieval entropy {ratio} of ln N (1: every expert alike).",
            "",
        ]
    if growth.get("pretrain"):
        curve = growth["pretrain"][0]["curve"]
        tail = [point[1] for point in curve[-5:]]
        lines += [
            f"The base's last five held-out losses (seed {seeds[0]}): "
            + ", ".join(f"{v:.3f}" for v in tail)
            + " (is it capacity-limited? the plot shows the whole curve).",
            "",
        ]
    lines += ["![growth](results-growth.png)", ""]
    lines += [
        "## 2. Instruction tuning on two tasks (recipes/tiny-instruct.yaml)",
        "",
        "Accuracy (%) on 500 held-out problems of each task, greedy, scored by the verifier;",
        "`math` is arith word problems, `general` is list/string instructions. The synth seeds",
        "are problems no SFT set contains (by identity), none of the eval problems.",
        "",
    ]
    instruct = results["instruct"]
    rows = [
        [
            model,
            _mean_sd(_values(results, "eval_math", model), 1),
            _mean_sd(_values(results, "eval_general", model), 1),
        ]
        for model in MODELS
        if model in instruct.get("eval_math", {})
    ]
    lines += [
        markdown_table(["model", "math", "general"], rows),
        "",
        "![instruct](results-instruct.png)",
        "",
    ]
    lines += [
        "## Other measurements",
        "",
        "Single-seed measurements reported by hand (partial training, layer analysis, data",
        f"mixtures) are in [{HAND_WRITTEN}]({HAND_WRITTEN}).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
